"""Read items and queries from Parquet or CSV tables, with errors that name file and row.

Columns (all optional but at least one of text / image / embedding):
    key        the caller's identifier of the row (default: the row number)
    text       caption or document text
    image      path of an image file, relative to the table's folder (or absolute)
    embedding  a list of floats (precomputed), then `modality` is required
    modality   image | text | image_text (derived from text/image when absent)
    target     (query tables) the key of the relevant corpus item
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from genius.errors import InvalidInputError
from genius.items import Items


class TableError(InvalidInputError):
    """A table, or one of its rows, cannot be used; the message names the file and the row."""

    def __init__(self, path: str | Path, row: int | None, reason: str):
        self.path = Path(path)
        super().__init__(row, reason)

    def __str__(self) -> str:
        where = f"row {self.index}: " if self.index is not None else ""
        return f"{self.path}: {where}{self.reason}"

    def __reduce__(self):
        return (type(self), (str(self.path), self.index, self.reason))


@dataclass
class ItemTable:
    items: Items
    targets: list[str] | None  # target keys, for query tables


def read_table(path: str | Path) -> pa.Table:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"table not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pq.read_table(path)
        if suffix in (".csv", ".tsv"):
            opts = pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")
            return pacsv.read_csv(path, parse_options=opts)
    except (pa.ArrowInvalid, OSError) as exc:
        raise TableError(path, None, f"cannot read table: {exc}") from None
    raise TableError(path, None, f"unsupported table format {suffix!r}: use .parquet, .csv or .tsv")


def read_items(path: str | Path, require_target: bool = False) -> ItemTable:
    """Items (or queries, with `require_target`) from a table; a bad row raises TableError."""
    path = Path(path)
    table = read_table(path)
    columns = set(table.column_names)
    if not columns & {"text", "image", "embedding"}:
        raise TableError(path, None, f"needs a text, image or embedding column; has {sorted(columns)}")
    if require_target and "target" not in columns:
        raise TableError(path, None, "query tables need a `target` column (key of the relevant corpus item)")
    n = table.num_rows
    if n == 0:
        raise TableError(path, None, "table has no rows")
    col = lambda name: table.column(name).to_pylist() if name in columns else None  # noqa: E731
    texts, image_paths, embeddings, modality = col("text"), col("image"), col("embedding"), col("modality")
    keys = [str(k) for k in col("key")] if "key" in columns else [str(i) for i in range(n)]
    images = None
    if image_paths is not None:
        images = [None if p is None else _read_image_file(path, row, p) for row, p in enumerate(image_paths)]
    if texts is not None:
        for row, text in enumerate(texts):
            if text is not None and (not isinstance(text, str) or not text.strip()):
                raise TableError(path, row, "text is empty")
    emb = None
    if embeddings is not None:
        if modality is None:
            raise TableError(path, None, "an embedding column needs a modality column")
        dims = {len(e) for e in embeddings if e is not None}
        if None in embeddings or len(dims) != 1:
            bad = next(r for r, e in enumerate(embeddings) if e is None or len(e) != max(dims))
            raise TableError(path, bad, f"embedding missing or of another length than the others ({sorted(dims)})")
        emb = np.asarray(embeddings, dtype=np.float32)
        if not np.isfinite(emb).all():
            raise TableError(path, int(np.flatnonzero(~np.isfinite(emb).all(1))[0]), "embedding has NaN or inf")
    for row in range(n):
        has_any = (texts is not None and texts[row] is not None) or (images is not None and images[row] is not None)
        if emb is None and not has_any:
            raise TableError(path, row, "row has neither text nor image")
    try:
        items = Items(texts=texts if emb is None else None, images=images if emb is None else None,
                      embeddings=emb, modality=None if modality is None else np.array(modality, dtype=object), keys=keys)
    except ValueError as exc:
        raise TableError(path, None, str(exc)) from None
    targets = [str(t) for t in col("target")] if require_target else None
    if targets is not None and any(t in ("None", "nan") or t == "" for t in targets):
        bad = next(r for r, t in enumerate(targets) if t in ("None", "nan", ""))
        raise TableError(path, bad, "target is empty")
    return ItemTable(items, targets)


def _read_image_file(table_path: Path, row: int, value: object) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, float) and math.isnan(value):
        raise TableError(table_path, row, "image path is empty")
    image_path = Path(str(value))
    if not image_path.is_absolute():
        image_path = table_path.parent / image_path
    if not image_path.is_file():
        raise TableError(table_path, row, f"image file not found: {image_path}")
    return image_path.read_bytes()
