"""Any folder of images or any table → WebDataset shards.

* `convert_folder`: every image under a folder (recursively); ``<stem>.txt`` next to an
  image is its caption, ``<stem>.json`` its metadata (an object). Keys come from the
  relative path (``cats/tom.jpg`` → ``cats-tom``).
* `convert_table`: a Parquet/CSV/TSV table read with `genius.tables.read_table`; columns
  for the key, the image (a path relative to the table's folder, absolute, or bytes) and
  the text are found by name or given; every other column goes into the JSON metadata.

Images are checked with `genius.encoders.decode_image_bytes` (bounded by `max_pixels`)
and stored as they are, or, with `max_side`, shrunk and re-encoded (PNG when the source
is PNG, else JPEG). A missing caption (no sidecar, null or empty cell) gives an
image-only record, unless `require_caption`. Bad rows and files are counted by reason
and logged with their path or row; they never stop the conversion.
"""
from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from genius.data.shards import (
    DEFAULT_SHARD_SIZE, IMAGE_EXTS, MissingSourceError, ProgressFactory, Record, ShardWriter, make_key,
    open_progress,
)
from genius.encoders import DEFAULT_MAX_IMAGE_PIXELS, decode_image_bytes, validate_text
from genius.tables import TableError, _read_image_file, read_table

log = logging.getLogger(__name__)

TEXT_COLUMNS = ("text", "caption", "title")
IMAGE_COLUMNS = ("image", "image_path", "path", "file", "filename", "filepath")
KEY_COLUMNS = ("key", "id")


class _Bad(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def prepare_image(data: bytes, ext: str, *, max_side: int | None, max_pixels: int) -> tuple[bytes, str, dict[str, Any]]:
    """Check an encoded image; shrink it when `max_side` asks. Returns (bytes, ext, size meta)."""
    try:
        image = decode_image_bytes(data, max_pixels)
    except ValueError as e:
        reason = "image_too_large" if "above the bound" in str(e) or "too large" in str(e) else "bad_image"
        raise _Bad(reason, str(e)) from None
    size = {"width": image.width, "height": image.height}
    ext = {"jpeg": "jpg", "tif": "tiff"}.get(ext, ext)
    if max_side is None or max(image.size) <= max_side:
        return data, ext, size
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if ext == "png":
        image.save(buf, format="PNG")
    else:  # photos: JPEG keeps them small
        image.save(buf, format="JPEG", quality=90)
        ext = "jpg"
    return buf.getvalue(), ext, size


def _caption(value: object) -> str | None:
    """None for an absent caption; the validated text otherwise."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, float) and value != value:  # NaN from pandas-made tables
        return None
    try:
        return validate_text(value)
    except ValueError as e:
        raise _Bad("bad_text", str(e)) from None


# ----------------------------------------------------------------------------- folder


def _folder_images(root: Path) -> Iterator[Path]:
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS:
                yield Path(folder) / name


def convert_folder(
    out_dir: str | Path,
    source: str | Path,
    *,
    prefix: str | None = None,
    limit: int | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    max_side: int | None = None,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    require_caption: bool = False,
    progress: ProgressFactory | None = None,
) -> dict[str, Any]:
    """Images (+ sidecar .txt captions, .json metadata) under `source` → shards; the manifest."""
    root = Path(source)
    if not root.is_dir():
        raise MissingSourceError(f"image folder not found: {root}; pass --source PATH to a folder of images")
    paths = list(_folder_images(root))
    if not paths:
        raise MissingSourceError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) under {root}")
    if limit is not None:
        paths = paths[:limit]
    prefix = make_key(prefix or root.resolve().name or "folder")
    options = {"limit": limit, "max_side": max_side, "max_pixels": max_pixels, "require_caption": require_caption}
    bar = open_progress(progress, len(paths), prefix)
    no_caption = 0
    with ShardWriter(out_dir, prefix, shard_size, dataset=prefix, source=str(root), options=options) as writer:
        try:
            for path in paths:
                bar.update()
                rel = path.relative_to(root).as_posix()
                try:
                    record = _folder_record(path, rel, max_side, max_pixels)
                except _Bad as b:
                    writer.skip(b.reason, str(path), b.detail)
                    continue
                if record.text is None:
                    if require_caption:
                        writer.skip("no_caption", str(path), "no .txt sidecar, or an empty one")
                        continue
                    no_caption += 1
                record.key = writer.unique_key(record.key)
                writer.write(record)
            writer.notes["image_only_records"] = no_caption
        finally:
            bar.close()
        return writer.close()


def _folder_record(path: Path, rel: str, max_side: int | None, max_pixels: int) -> Record:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _Bad("unreadable_file", str(e)) from None
    image, ext, size = prepare_image(data, path.suffix.lower().lstrip("."), max_side=max_side, max_pixels=max_pixels)
    text = None
    sidecar = path.with_suffix(".txt")
    if sidecar.is_file():
        try:
            text = _caption(sidecar.read_bytes().decode("utf-8").strip())
        except UnicodeDecodeError as e:
            raise _Bad("bad_text", f"{sidecar}: not UTF-8: {e}") from None
    meta: dict[str, Any] = {}
    meta_file = path.with_suffix(".json")
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _Bad("bad_json", f"{meta_file}: {e}") from None
        if not isinstance(meta, dict):
            raise _Bad("bad_json", f"{meta_file}: not a JSON object")
    meta.update({"path": rel, **size})
    key = make_key(str(Path(rel).with_suffix("").as_posix()))
    return Record(key=key, image=image, image_ext=ext, text=text, meta=meta)


# ----------------------------------------------------------------------------- table


def _pick(columns: list[str], wanted: str | None, names: tuple[str, ...], what: str, path: Path) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise TableError(path, None, f"no {what} column {wanted!r}; columns are {columns}")
        return wanted
    return next((c for c in names if c in columns), None)


def _image_value(value: object) -> tuple[object, str | None]:
    """A cell of the image column → (path or bytes, extension hint). Accepts the
    {'bytes': ..., 'path': ...} structs of Hugging Face datasets too."""
    if isinstance(value, dict):
        data, name = value.get("bytes"), value.get("path")
        if data is not None:
            return data, (Path(name).suffix.lower().lstrip(".") if name else None)
        value = name
    if isinstance(value, (bytes, bytearray)):
        return value, None
    return value, (Path(str(value)).suffix.lower().lstrip(".") if value is not None else None)


def _sniff_ext(data: bytes) -> str:
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = (im.format or "").lower()
    except Exception:
        return "jpg"  # undecodable anyway; prepare_image reports it
    return {"jpeg": "jpg", "tiff": "tiff"}.get(fmt, fmt if fmt in IMAGE_EXTS else "png")


def convert_table(
    out_dir: str | Path,
    source: str | Path,
    *,
    image_column: str | None = None,
    text_column: str | None = None,
    key_column: str | None = None,
    prefix: str | None = None,
    limit: int | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    max_side: int | None = None,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    require_caption: bool = False,
    progress: ProgressFactory | None = None,
) -> dict[str, Any]:
    """Rows of a Parquet/CSV/TSV table → shards; the manifest. Column names default to the
    first present of key/id, image/image_path/path/file/filename/filepath, text/caption/title."""
    path = Path(source)
    if not path.is_file():
        raise MissingSourceError(f"table not found: {path}; pass --source PATH to a .parquet, .csv or .tsv file")
    # Keys, captions and image paths are user data: read them verbatim (a caption "None" or a
    # key "007" stays what it is), whatever pyarrow would infer from a CSV.
    named = [c for c in (key_column, text_column, image_column) if c]
    table = read_table(path, string_columns=(*KEY_COLUMNS, *TEXT_COLUMNS, *IMAGE_COLUMNS, *named))
    columns = table.column_names
    image_col = _pick(columns, image_column, IMAGE_COLUMNS, "image", path)
    text_col = _pick(columns, text_column, TEXT_COLUMNS, "text", path)
    key_col = _pick(columns, key_column, KEY_COLUMNS, "key", path)
    if image_col is None and text_col is None:
        raise TableError(path, None, f"needs an image column ({', '.join(IMAGE_COLUMNS)}) or a text column "
                         f"({', '.join(TEXT_COLUMNS)}), or --image-column/--text-column; has {columns}")
    if limit is not None:
        table = table.slice(0, limit)
    prefix = make_key(prefix or path.stem)
    meta_cols = [c for c in columns if c not in (image_col, text_col, key_col)]
    options = {"limit": limit, "image_column": image_col, "text_column": text_col, "key_column": key_col,
               "max_side": max_side, "max_pixels": max_pixels, "require_caption": require_caption}
    bar = open_progress(progress, table.num_rows, prefix)
    no_caption = 0
    with ShardWriter(out_dir, prefix, shard_size, dataset=prefix, source=str(path), options=options) as writer:
        try:
            row = -1
            for batch in table.to_batches(max_chunksize=1024):
                for values in batch.to_pylist():
                    row += 1
                    bar.update()
                    where = f"{path} row {row}"
                    try:
                        record = _table_record(path, row, values, image_col, text_col, key_col, meta_cols,
                                               max_side, max_pixels)
                    except _Bad as b:
                        writer.skip(b.reason, where, b.detail)
                        continue
                    if record.text is None and record.image is not None:
                        if require_caption:
                            writer.skip("no_caption", where, f"column {text_col!r} is empty")
                            continue
                        no_caption += 1
                    record.key = writer.unique_key(record.key)
                    writer.write(record)
            writer.notes["image_only_records"] = no_caption
        finally:
            bar.close()
        return writer.close()


def _table_record(path: Path, row: int, values: dict[str, Any], image_col: str | None, text_col: str | None,
                  key_col: str | None, meta_cols: list[str], max_side: int | None, max_pixels: int) -> Record:
    text = _caption(values.get(text_col)) if text_col else None
    image = ext = None
    meta: dict[str, Any] = {}
    cell = values.get(image_col) if image_col is not None else None
    if cell is not None and not (isinstance(cell, str) and not cell.strip()):  # CSV: '' is an empty cell
        value, ext = _image_value(cell)
        try:
            data = _read_image_file(path, row, value)
        except TableError as e:
            raise _Bad("missing_image", e.reason) from None
        ext = ext if ext in IMAGE_EXTS else _sniff_ext(data)
        image, ext, size = prepare_image(data, ext, max_side=max_side, max_pixels=max_pixels)
        meta.update(size)
        if isinstance(value, str):
            meta["path"] = value
    if image is None and text is None:
        raise _Bad("no_content", "row has neither an image nor a text")
    raw_key = values.get(key_col) if key_col else None
    if raw_key == "":
        raw_key = None  # an empty key cell: the row number names the record
    key = make_key(str(raw_key)) if raw_key is not None else f"row-{row:09d}"
    for col in meta_cols:  # bytes cannot go into JSON; everything else can (default=str)
        if not isinstance(values[col], (bytes, bytearray)):
            meta[col] = values[col]
    meta["row"] = row
    if raw_key is not None:
        meta["source_key"] = raw_key
    return Record(key=key, image=image, image_ext=ext, text=text, meta=meta)
