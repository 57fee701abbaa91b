import io
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from genius.data import generic
from genius.data.shards import MissingSourceError, ReadStats, iter_shards
from genius.modality import Modality
from genius.tables import TableError
from tests.genius.data.fakes import corrupt_png, jpeg_bytes, png_bytes


def _folder(root):
    (root / "cats").mkdir(parents=True)
    (root / "cats" / "tom.jpg").write_bytes(jpeg_bytes((64, 32)))
    (root / "cats" / "tom.txt").write_text("a grey cat\n")
    (root / "cats" / "tom.json").write_text(json.dumps({"license": "cc0"}))
    (root / "cats" / "tom.v2.png").write_bytes(png_bytes((10, 10)))  # no caption
    (root / "dog.png").write_bytes(png_bytes((300, 100)))
    (root / "dog.txt").write_text("a dog")
    (root / "broken.png").write_bytes(corrupt_png())
    (root / "broken.txt").write_text("never stored")
    (root / "latin.jpg").write_bytes(jpeg_bytes())
    (root / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "badmeta.png").write_bytes(png_bytes())
    (root / "badmeta.json").write_text("[1, 2]")
    (root / "readme.md").write_text("ignored")


def test_folder(tmp_path, caplog):
    _folder(tmp_path / "src")
    with caplog.at_level(logging.WARNING):
        manifest = generic.convert_folder(tmp_path / "out", tmp_path / "src", max_side=128)
    assert manifest["skipped"] == {"bad_image": 1, "bad_text": 1, "bad_json": 1}
    assert "broken.png" in caplog.text and "latin.jpg" in caplog.text
    assert manifest["items"] == 3 and manifest["notes"]["image_only_records"] == 1
    assert manifest["prefix"] == "src"
    stats = ReadStats()
    records = {r.key: r for r in iter_shards(tmp_path / "out", stats=stats)}
    assert stats.ok and set(records) == {"cats-tom", "cats-tom_v2", "dog"}
    tom = records["cats-tom"]
    assert tom.text == "a grey cat" and tom.image_ext == "jpg" and tom.meta["license"] == "cc0"
    assert tom.image == (tmp_path / "src" / "cats" / "tom.jpg").read_bytes()  # small: stored as is
    assert records["cats-tom_v2"].modality == Modality.IMAGE
    dog = records["dog"]
    assert Image.open(io.BytesIO(dog.image)).size == (128, 43) and dog.meta["width"] == 300


def test_folder_require_caption_and_limit(tmp_path):
    _folder(tmp_path / "src")
    manifest = generic.convert_folder(tmp_path / "out", tmp_path / "src", require_caption=True, prefix="mine")
    assert manifest["skipped"]["no_caption"] == 1 and manifest["items"] == 2
    assert all(s["file"].startswith("mine-") for s in manifest["shards"])
    assert generic.convert_folder(tmp_path / "o2", tmp_path / "src", limit=2)["items"] <= 2


def test_csv_table(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png_bytes())
    (tmp_path / "img" / "b.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "img" / "bad.png").write_bytes(corrupt_png())
    (tmp_path / "t.csv").write_text(
        "id,image,caption,score\n"
        "a1,img/a.png,a red square,0.5\n"
        "b1,img/b.jpg,,0.7\n"
        "c1,img/missing.png,gone,0.1\n"
        "d1,img/bad.png,bad,0.2\n"
        "e1,,only text,0.3\n"
    )
    manifest = generic.convert_table(tmp_path / "out", tmp_path / "t.csv")
    assert manifest["skipped"] == {"missing_image": 1, "bad_image": 1}
    assert manifest["modalities"] == {"image": 1, "image_text": 1, "text": 1}
    assert manifest["options"]["key_column"] == "id" and manifest["options"]["text_column"] == "caption"
    records = {r.key: r for r in iter_shards(tmp_path / "out")}
    assert records["a1"].text == "a red square" and records["a1"].meta["score"] == 0.5
    assert records["a1"].meta["path"] == "img/a.png" and records["a1"].image_ext == "png"
    assert records["b1"].modality == Modality.IMAGE and records["e1"].modality == Modality.TEXT


def test_parquet_with_image_bytes(tmp_path):
    table = pa.table({
        "image": [png_bytes(), {"bytes": jpeg_bytes(), "path": "x.jpg"}["bytes"], b"junk"],
        "text": ["one", "two", "three"],
        "extra": [1, 2, 3],
    })
    pq.write_table(table, tmp_path / "t.parquet")
    manifest = generic.convert_table(tmp_path / "out", tmp_path / "t.parquet", key_column=None)
    assert manifest["items"] == 2 and manifest["skipped"] == {"bad_image": 1}
    records = list(iter_shards(tmp_path / "out"))
    assert [r.key for r in records] == ["row-000000000", "row-000000001"]
    assert [r.image_ext for r in records] == ["png", "jpg"] and records[1].meta["extra"] == 2


def test_table_errors_name_the_file(tmp_path):
    (tmp_path / "t.csv").write_text("foo,bar\n1,2\n")
    with pytest.raises(TableError, match="t.csv"):
        generic.convert_table(tmp_path / "out", tmp_path / "t.csv")
    with pytest.raises(TableError, match="no text column 'nope'"):
        generic.convert_table(tmp_path / "out", tmp_path / "t.csv", text_column="nope")
    with pytest.raises(MissingSourceError, match="--source PATH"):
        generic.convert_table(tmp_path / "out", tmp_path / "absent.csv")
    with pytest.raises(MissingSourceError, match="--source PATH"):
        generic.convert_folder(tmp_path / "out", tmp_path / "absent")


def test_table_keys_and_captions_are_read_verbatim(tmp_path):
    """A caption spelt "None" or "nan" is text, and a key "007" stays "007" (CSV infers neither)."""
    csv = tmp_path / "t.csv"
    csv.write_text("key,text\n007,None\nNA,nan\n,null\n", encoding="utf-8")
    generic.convert_table(tmp_path / "out", csv)
    records = sorted(iter_shards(tmp_path / "out"), key=lambda r: r.meta["row"])
    assert [r.text for r in records] == ["None", "nan", "null"]
    assert [r.meta.get("source_key") for r in records] == ["007", "NA", None]
