"""Read items and queries from Parquet or CSV tables, with errors that name file and row.

Columns (all optional but at least one of text / image / embedding):
    key        the caller's identifier of the row (default: the row number)
    text       caption or document text
    image      path of an image file, relative to the table's folder (or absolute)
    embedding  a list of floats (precomputed; in CSV/TSV a JSON list "[0.1, 0.2]"), then
               `modality` is required
    modality   image | text | image_text (derived from text/image when absent or empty)
    target     (query tables) the key of the relevant corpus item

Keys, targets and texts are user data and are read verbatim: in CSV/TSV these columns are
read as strings with no null or number interpretation (`nan`, `NA`, `null`, `None`, `007`,
`1e5` stay exactly that text). Only an empty cell (or a Parquet null) means "no value": no
text, no image (a table may mix image rows and text-only rows), no embedding; an empty key
or target is an error.
"""
from __future__ import annotations

import json
import math
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from genius.errors import InvalidInputError
from genius.items import Items
from genius.modality import Modality

# The columns `read_items` reads verbatim as text from CSV/TSV.
STRING_COLUMNS = ("key", "target", "text", "image", "modality", "embedding")


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


def read_table(path: str | Path, string_columns: Collection[str] = ()) -> pa.Table:
    """A Parquet, CSV or TSV table. In CSV/TSV the `string_columns` that are present are read
    verbatim as strings (an empty cell is ""; no null, number or boolean interpretation; not
    UTF-8 is a TableError naming the row); every other column keeps pyarrow's type inference.
    Quoted CSV cells may span lines."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"table not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pq.read_table(path)
        if suffix in (".csv", ".tsv"):
            return _read_csv(path, "\t" if suffix == ".tsv" else ",", tuple(string_columns))
    except UnicodeDecodeError as exc:  # from the header row: pyarrow decodes column names lazily
        raise TableError(path, None, f"cannot read table: the header row is not UTF-8 text ({exc})") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise TableError(path, None, f"cannot read table: {exc}") from None
    raise TableError(path, None, f"unsupported table format {suffix!r}: use .parquet, .csv or .tsv")


def _read_csv(path: Path, delimiter: str, string_columns: tuple[str, ...]) -> pa.Table:
    parse = pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True)

    def convert(kind: pa.DataType) -> pacsv.ConvertOptions:
        # strings_can_be_null=False (pyarrow's default, spelt out): a string cell is never null
        return pacsv.ConvertOptions(column_types={c: kind for c in string_columns}, strings_can_be_null=False)

    try:
        table = pacsv.read_csv(path, parse_options=parse, convert_options=convert(pa.string()))
        table.column_names  # noqa: B018 -- pyarrow decodes the header row only here
        return table
    except pa.ArrowInvalid as exc:
        if "UTF8" not in str(exc) or not string_columns:
            raise
        error = exc
    # A string column holds bytes that are not UTF-8: read those columns as bytes to name the row.
    raw = pacsv.read_csv(path, parse_options=parse, convert_options=convert(pa.binary()))
    found: list[tuple[int, str]] = []
    for name in string_columns:
        if name in raw.column_names:
            for row, value in enumerate(raw.column(name).to_pylist()):
                try:
                    value.decode("utf-8")
                except UnicodeDecodeError:
                    found.append((row, name))
                    break
    if not found:  # not expected: pyarrow's check and Python's agree on UTF-8
        raise TableError(path, None, f"cannot read table: {error}")
    row, name = min(found)
    raise TableError(path, row, f"column {name!r} is not UTF-8 text (save the table as UTF-8)")


def read_items(path: str | Path, require_target: bool = False) -> ItemTable:
    """Items (or queries, with `require_target`) from a table; a bad row raises TableError."""
    path = Path(path)
    table = read_table(path, STRING_COLUMNS)
    columns = set(table.column_names)
    if not columns & {"text", "image", "embedding"}:
        raise TableError(path, None, f"needs a text, image or embedding column; has {sorted(columns)}")
    if require_target and "target" not in columns:
        raise TableError(path, None, "query tables need a `target` column (key of the relevant corpus item)")
    n = table.num_rows
    if n == 0:
        raise TableError(path, None, "table has no rows")
    col = lambda name: table.column(name).to_pylist() if name in columns else None  # noqa: E731
    keys = _keys(path, col("key"), "key") if "key" in columns else [str(i) for i in range(n)]
    texts = col("text")
    if texts is not None:
        texts = [_text(path, row, t) for row, t in enumerate(texts)]
    images = None
    if "image" in columns:
        images = [None if _is_empty(p) else _read_image_file(path, row, p) for row, p in enumerate(col("image"))]
    emb = None
    if "embedding" in columns:
        if "modality" not in columns:
            raise TableError(path, None, "an embedding column needs a modality column")
        emb = _embeddings(path, col("embedding"))
    for row in range(n):
        has_any = (texts is not None and texts[row] is not None) or (images is not None and images[row] is not None)
        if emb is None and not has_any:
            raise TableError(path, row, "row has neither text nor image")
    modality = None
    if "modality" in columns:
        modality = [_modality(path, row, m, emb is not None, texts, images) for row, m in enumerate(col("modality"))]
    try:
        items = Items(texts=texts if emb is None else None, images=images if emb is None else None,
                      embeddings=emb, modality=None if modality is None else np.array(modality, dtype=np.int64),
                      keys=keys)
    except ValueError as exc:
        raise TableError(path, None, str(exc)) from None
    targets = _keys(path, col("target"), "target") if require_target else None
    return ItemTable(items, targets)


def _is_empty(value: object) -> bool:
    """An absent cell: a Parquet null or an empty (or blank) CSV cell."""
    return value is None or (isinstance(value, str) and not value.strip())


def _keys(path: Path, values: list, what: str) -> list[str]:
    """Keys or targets, verbatim: strings as they are, numbers (Parquet) as str(); an absent
    value (null, empty cell) is an error naming the row."""
    out = []
    for row, value in enumerate(values):
        if value is None or value == "":
            raise TableError(path, row, f"{what} is empty")
        if isinstance(value, (bytes, bytearray)):
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise TableError(path, row, f"{what} is not UTF-8 text") from None
        out.append(value if isinstance(value, str) else str(value))
    return out


def _text(path: Path, row: int, value: object) -> str | None:
    if value is None or value == "":
        return None  # no text (an image-only row)
    if not isinstance(value, str):
        raise TableError(path, row, f"text must be a string, not {type(value).__name__}")
    if not value.strip():
        raise TableError(path, row, "text is empty")
    return value


def _embeddings(path: Path, values: list) -> np.ndarray:
    rows = []
    for row, value in enumerate(values):
        if isinstance(value, str):  # CSV/TSV: a JSON list
            if not value.strip():
                value = None
            else:
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as exc:
                    raise TableError(path, row, f"embedding is not a JSON list of numbers: {exc}") from None
                if not isinstance(value, list) or not all(
                        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                    raise TableError(path, row, "embedding is not a JSON list of numbers, e.g. [0.1, 0.2]")
        if value is None:
            raise TableError(path, row, "embedding is missing")
        rows.append(value)
    dims = {len(e) for e in rows}
    if len(dims) != 1:
        common = max(dims, key=lambda d: sum(len(e) == d for e in rows))
        bad = next(r for r, e in enumerate(rows) if len(e) != common)
        raise TableError(path, bad, f"embedding of length {len(rows[bad])}, others have {common} ({sorted(dims)})")
    try:
        emb = np.asarray(rows, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise TableError(path, None, f"embeddings are not lists of numbers: {exc}") from None
    if emb.ndim != 2 or emb.shape[1] == 0:
        raise TableError(path, 0, "embedding is empty")
    if not np.isfinite(emb).all():
        raise TableError(path, int(np.flatnonzero(~np.isfinite(emb).all(1))[0]), "embedding has NaN or inf")
    return emb


def _modality(path: Path, row: int, value: object, has_embedding: bool, texts: list | None,
              images: list | None) -> int:
    if _is_empty(value):
        has_text = texts is not None and texts[row] is not None
        has_image = images is not None and images[row] is not None
        if has_embedding or not (has_text or has_image):
            raise TableError(path, row, "modality is empty")
        return int(Modality.IMAGE_TEXT if has_text and has_image else Modality.TEXT if has_text else Modality.IMAGE)
    if isinstance(value, str) and value.strip().isdigit():  # CSV "1" as Parquet's int 1
        value = int(value)
    try:
        return int(Modality.parse(value))
    except ValueError as exc:
        raise TableError(path, row, str(exc)) from None


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
