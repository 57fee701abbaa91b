"""genius.tables: keys, targets and texts are read verbatim from CSV, TSV and Parquet;
empty cells and bad rows give errors that name the file and the row."""
import csv
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from genius.modality import Modality
from genius.tables import TableError, read_items, read_table

TRICKY = ["nan", "NA", "null", "None", "NaN", "N/A", "#N/A", "NULL", "-nan", "1.0", "007", "1e5", "TRUE",
          "false", "  spaced  ", "café ☕ 日本", "-1", "0x10", "inf", '"quoted"', "a,b", "tab\there", "two\nlines"]


def _write(path, columns: dict[str, list]):
    """A table in the format of `path`'s suffix; CSV/TSV written with Python's csv module."""
    if path.suffix == ".parquet":
        pq.write_table(pa.table(columns), path)
        return
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t" if path.suffix == ".tsv" else ",")
        writer.writerow(list(columns))
        writer.writerows(zip(*columns.values()))


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet"])
def test_tricky_keys_targets_and_texts_round_trip(tmp_path, suffix):
    path = tmp_path / f"q{suffix}"
    _write(path, {"key": TRICKY, "text": TRICKY, "target": TRICKY[::-1], "score": list(range(len(TRICKY)))})
    table = read_items(path, require_target=True)
    assert list(table.items.keys) == TRICKY
    assert list(table.items.texts) == TRICKY
    assert table.targets == TRICKY[::-1]
    assert all(isinstance(k, str) for k in table.items.keys + table.targets)


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_read_table_string_columns_are_verbatim_others_inferred(tmp_path, suffix):
    path = tmp_path / f"t{suffix}"
    _write(path, {"key": ["007", "nan", ""], "score": ["0.5", "1", "2"]})
    table = read_table(path, ["key", "absent"])
    assert table.column("key").to_pylist() == ["007", "nan", ""]
    assert table.column("score").to_pylist() == [0.5, 1.0, 2.0]
    assert read_table(path).column("key").type != pa.string()  # no string_columns: pyarrow's inference


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_target_nan_resolves_to_corpus_key_nan(tmp_path, suffix):
    corpus, queries = tmp_path / f"corpus{suffix}", tmp_path / f"queries{suffix}"
    _write(corpus, {"key": ["nan", "None", "007", "7"], "text": ["not a number", "nobody", "a spy", "seven"]})
    _write(queries, {"text": ["grandmother", "spy", "lucky"], "target": ["nan", "007", "7"]})
    keys = list(read_items(corpus).items.keys)
    targets = read_items(queries, require_target=True).targets
    assert keys == ["nan", "None", "007", "7"] and targets == ["nan", "007", "7"]
    position = {k: i for i, k in enumerate(keys)}
    assert [position[t] for t in targets] == [0, 2, 3]


@pytest.mark.parametrize("column", ["key", "target"])
def test_empty_key_or_target_cell_names_file_and_row(tmp_path, column):
    path = tmp_path / "q.csv"
    path.write_text("key,text,target\na,one,x\nb,two,y\n" + ("," if column == "key" else "c,") + "three," +
                    ("z" if column == "key" else "") + "\n")
    with pytest.raises(TableError, match=rf"q\.csv: row 2: {column} is empty") as info:
        read_items(path, require_target=True)
    assert info.value.path == path and info.value.index == 2


@pytest.mark.parametrize("column", ["key", "target"])
def test_parquet_null_key_or_target_names_row(tmp_path, column):
    path = tmp_path / "q.parquet"
    values = {"key": ["a", "b", "c"], "target": ["x", "y", "z"]}
    values[column][1] = None
    pq.write_table(pa.table({"text": ["one", "two", "three"], **values}), path)
    with pytest.raises(TableError, match=rf"q\.parquet: row 1: {column} is empty"):
        read_items(path, require_target=True)


def test_parquet_numeric_keys_become_strings(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"key": [7, 8], "text": ["a", "b"]}), path)
    assert list(read_items(path).items.keys) == ["7", "8"]


def test_mixed_image_and_text_only_csv(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(_png())
    path = tmp_path / "mixed.csv"
    path.write_text("key,image,text\n"
                    "a,img/a.png,a red square\n"
                    "b,,only text\n"
                    "c,img/a.png,\n"
                    "NA,,None\n")
    items = read_items(path).items
    assert list(items.keys) == ["a", "b", "c", "NA"]
    assert list(items.texts) == ["a red square", "only text", None, "None"]
    assert [i is not None for i in items.images] == [True, False, True, False]
    assert list(items.modality) == [Modality.IMAGE_TEXT, Modality.TEXT, Modality.IMAGE, Modality.TEXT]


def test_row_without_text_or_image_and_blank_text(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("key,image,text\na,,fine\nb,,\n")
    with pytest.raises(TableError, match=r"t\.csv: row 1: row has neither text nor image"):
        read_items(path)
    path.write_text("key,text\na,fine\nb,\"   \"\n")
    with pytest.raises(TableError, match=r"t\.csv: row 1: text is empty"):
        read_items(path)
    (tmp_path / "u.csv").write_text("key,image,text\na,missing.png,x\n")
    with pytest.raises(TableError, match=r"u\.csv: row 0: image file not found"):
        read_items(tmp_path / "u.csv")


def test_non_utf8_csv_names_file_and_row(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes(b"key,text\na,fine\nb,caf\xe9\n")
    with pytest.raises(TableError, match=r"latin\.csv: row 1: column 'text' is not UTF-8") as info:
        read_items(path)
    assert info.value.index == 1
    header = tmp_path / "header.csv"
    header.write_bytes(b"key,t\xe9xt\na,b\n")
    with pytest.raises(TableError, match=r"header\.csv: .*not UTF-8"):
        read_items(header)


def test_utf8_bom_and_quoted_newlines(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffkey,text\nk1,\"line one\nline two\"\n".encode("utf-8"))
    items = read_items(path).items
    assert list(items.keys) == ["k1"] and list(items.texts) == ["line one\nline two"]


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_csv_embedding_json_lists(tmp_path, suffix):
    path = tmp_path / f"e{suffix}"
    _write(path, {"key": ["nan", "007"], "embedding": ["[0.1, 0.2, 3]", "[1e-3, -2, 0]"], "modality": ["text", "1"]})
    items = read_items(path).items
    assert list(items.keys) == ["nan", "007"]
    np.testing.assert_allclose(items.embeddings, [[0.1, 0.2, 3], [1e-3, -2, 0]], rtol=1e-6)
    assert list(items.modality) == [Modality.TEXT, Modality.TEXT]


@pytest.mark.parametrize("cell, reason", [
    ('"[0.1, oops]"', "embedding is not a JSON list of numbers"),
    ('"{""a"": 1}"', "embedding is not a JSON list of numbers"),
    ('"[0.1, true]"', "embedding is not a JSON list of numbers"),
    ("", "embedding is missing"),
    ('"[1, 2, 3]"', "embedding of length 3"),
    ('"[1, NaN]"', "embedding has NaN or inf"),
])
def test_csv_embedding_errors_name_row(tmp_path, cell, reason):
    path = tmp_path / "e.csv"
    path.write_text(f'key,embedding,modality\na,"[0.5, 0.5]",text\nb,"[0.5, 0.5]",image\nc,{cell},text\n')
    with pytest.raises(TableError, match=rf"e\.csv: row 2: {reason}"):
        read_items(path)


def test_parquet_embedding_and_modality(tmp_path):
    path = tmp_path / "e.parquet"
    pq.write_table(pa.table({"key": ["x", "y"], "embedding": [[1.0, 0.0], [0.0, 1.0]], "modality": ["image", "text"]}),
                   path)
    items = read_items(path).items
    assert items.embeddings.shape == (2, 2) and list(items.modality) == [Modality.IMAGE, Modality.TEXT]
    pq.write_table(pa.table({"embedding": [[1.0, 0.0], [0.0, 1.0]], "modality": ["image", "painting"]}), path)
    with pytest.raises(TableError, match=r"row 1: unknown modality 'painting'"):
        read_items(path)
    pq.write_table(pa.table({"embedding": [[1.0, 0.0], [0.0, 1.0]]}), path)
    with pytest.raises(TableError, match="needs a modality column"):
        read_items(path)


def test_table_level_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_items(tmp_path / "absent.csv")
    (tmp_path / "t.json").write_text("{}")
    with pytest.raises(TableError, match="unsupported table format"):
        read_items(tmp_path / "t.json")
    (tmp_path / "empty.csv").write_text("key,text\n")
    with pytest.raises(TableError, match="no rows"):
        read_items(tmp_path / "empty.csv")
    (tmp_path / "blank.csv").write_text("")
    with pytest.raises(TableError, match=r"blank\.csv: cannot read table"):
        read_items(tmp_path / "blank.csv")
    (tmp_path / "q.csv").write_text("key,text\na,b\n")
    with pytest.raises(TableError, match="need a `target` column"):
        read_items(tmp_path / "q.csv", require_target=True)
    (tmp_path / "ragged.csv").write_text("key,text\na,b\nc,d,e\n")
    with pytest.raises(TableError, match=r"ragged\.csv: cannot read table"):
        read_items(tmp_path / "ragged.csv")


def test_csv_modality_cells(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("key,text,modality\na,one,text\nb,two,\nc,three,1\n")
    assert list(read_items(path).items.modality) == [Modality.TEXT] * 3
    path.write_text('key,embedding,modality\na,"[1, 0]",image\nb,"[0, 1]",\n')
    with pytest.raises(TableError, match=r"m\.csv: row 1: modality is empty"):
        read_items(path)
