import io
import json
import logging
import tarfile
from pathlib import Path

import pytest

from genius.data.shards import (
    MANIFEST_FILE, ReadStats, Record, ShardReader, ShardWriter, check_key, iter_shards, make_key, read_manifest,
    to_items,
)
from genius.modality import Modality
from tests.genius.data.fakes import corrupt_png, jpeg_bytes, png_bytes


def _records(n: int = 5) -> list[Record]:
    out = []
    for i in range(n):
        kind = i % 3
        out.append(Record(
            key=f"item-{i:03d}",
            image=png_bytes((4 + i, 5), (i * 40, 10, 10)) if kind != 1 else None,
            image_ext="png" if kind != 1 else None,
            text=f"caption number {i} é" if kind != 0 else None,
            meta={"i": i, "tags": ["a", "b"]},
        ))
    return out


def _write(out: Path, records: list[Record], shard_size: int = 2, prefix: str = "demo") -> dict:
    with ShardWriter(out, prefix, shard_size, dataset="demo", source="memory") as writer:
        for r in records:
            writer.write(r)
        writer.skip("bad_image", "source item 99", "for the manifest")
        return writer.close()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_round_trip_writer_reader(tmp_path):
    records = _records(5)
    manifest = _write(tmp_path, records)
    assert [s["file"] for s in manifest["shards"]] == ["demo-000000.tar", "demo-000001.tar", "demo-000002.tar"]
    assert manifest["items"] == 5 and [s["items"] for s in manifest["shards"]] == [2, 2, 1]
    assert manifest["modalities"] == {"image": 2, "image_text": 1, "text": 2}
    assert manifest["skipped"] == {"bad_image": 1}
    assert read_manifest(tmp_path) == json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert not list(tmp_path.glob(".*"))  # no temporary files left

    stats = ReadStats()
    back = list(iter_shards(tmp_path, stats=stats))
    assert stats.ok and stats.records == 5 and stats.shards == 3
    for a, b in zip(records, back):
        assert (a.key, a.image, a.image_ext, a.text, a.meta) == (b.key, b.image, b.image_ext, b.text, b.meta)
        assert b.shard and b.shard.endswith(".tar")
    assert [r.modality for r in back] == [Modality.IMAGE, Modality.TEXT, Modality.IMAGE_TEXT,
                                          Modality.IMAGE, Modality.TEXT]
    items = to_items(back)
    assert list(items.keys) == [r.key for r in records] and list(items.modality) == [0, 1, 2, 0, 1]


def test_shards_are_reproducible_and_readable_by_webdataset(tmp_path):
    import webdataset as wds

    m1 = _write(tmp_path / "a", _records(4))
    m2 = _write(tmp_path / "b", _records(4))
    assert [s["sha256"] for s in m1["shards"]] == [s["sha256"] for s in m2["shards"]]
    urls = [str(tmp_path / "a" / s["file"]) for s in m1["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"item-{i:03d}" for i in range(4)]
    assert json.loads(samples[2]["json"]) == {"i": 2, "tags": ["a", "b"]}
    assert samples[1]["txt"].decode() == "caption number 1 é"


def test_writer_rejects_bad_records(tmp_path):
    with ShardWriter(tmp_path, "x") as writer:
        with pytest.raises(ValueError, match="invalid record key"):
            writer.write(Record(key="a.b", text="t"))
        with pytest.raises(ValueError, match="neither image nor text"):
            writer.write(Record(key="a"))
        with pytest.raises(ValueError, match="image extension"):
            writer.write(Record(key="a", image=b"123", image_ext="exe"))
        writer.write(Record(key="a", text="t"))
        with pytest.raises(ValueError, match="duplicate"):
            writer.write(Record(key="a", text="u"))
        assert writer.unique_key("a") == "a-2"
    assert read_manifest(tmp_path)["items"] == 1


def test_make_key():
    assert make_key("animals/birds/puffin v.2") == "animals-birds-puffin_v_2"
    assert check_key(make_key("..//é")) == make_key("..//é")


def test_failed_conversion_leaves_no_manifest_and_no_temp(tmp_path):
    _write(tmp_path, _records(3))
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, "demo", 2) as writer:
            writer.write(_records(1)[0])
            raise RuntimeError("converter crashed")
    assert not (tmp_path / MANIFEST_FILE).exists()  # the old one is gone too: its shards may be replaced
    assert not list(tmp_path.glob(".*"))


def test_smaller_rerun_removes_stale_shards(tmp_path, caplog):
    _write(tmp_path, _records(5))
    with caplog.at_level(logging.WARNING):
        manifest = _write(tmp_path, _records(2))
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["demo-000000.tar"]
    assert manifest["items"] == 2 and "earlier conversion" in caplog.text


def test_corrupt_members_are_counted_logged_and_skipped(tmp_path, caplog):
    shard = tmp_path / "bad-000000.tar"
    _tar(shard, [
        ("ok1.png", png_bytes()), ("ok1.txt", b"fine"), ("ok1.json", b"{}"),
        ("badjson.txt", b"x"), ("badjson.json", b"{not json"),
        ("badutf.txt", b"\xff\xfe caption"), ("badutf.json", b"{}"),
        ("badimg.png", corrupt_png()), ("badimg.json", b"{}"),
        ("empty.txt", b"   "), ("onlyjson.json", b"{}"),
        ("ok2.jpg", jpeg_bytes()), ("ok2.json", b'{"a": 1}'),
        ("ok1.cls", b"3"),  # same key again, later in the shard
    ])
    stats = ReadStats()
    with caplog.at_level(logging.WARNING):
        keys = [r.key for r in iter_shards(shard, stats=stats)]
    assert keys == ["ok1", "ok2"]
    assert dict(stats.skipped) == {"bad_json": 1, "bad_text": 2, "bad_image": 1, "no_content": 1,
                                   "duplicate_key": 1}
    for key in ("badjson", "badutf", "badimg", "onlyjson"):
        assert f"{shard}: skipped record '{key}'" in caplog.text
    assert not stats.shard_errors


@pytest.mark.parametrize("cut", [3 * 1024 + 100, 4 * 1024 + 700, 4 * 1024, 6 * 1024 + 30])
def test_truncated_shard(tmp_path, caplog, cut):
    good = tmp_path / "good.tar"
    _tar(good, [(f"k{i}.{ext}", data) for i in range(4) for ext, data in (("txt", b"text %d" % i), ("json", b"{}"))])
    shard = tmp_path / "cut-000000.tar"
    shard.write_bytes(good.read_bytes()[:cut])
    stats = ReadStats()
    with caplog.at_level(logging.WARNING):
        records = list(iter_shards(shard, stats=stats))
    assert stats.shard_errors == {"truncated_shard": 1} and stats.failed_shards == [str(shard)]
    # The record at the cut may lack members: it is skipped, never yielded half.
    assert stats.skipped == {"truncated_shard": 1}
    assert [r.key for r in records] == [f"k{i}" for i in range(len(records))]
    assert all(r.text is not None and r.meta == {} for r in records)
    assert str(shard) in caplog.text


def test_corrupt_region_is_skipped_and_reading_resumes(tmp_path, caplog):
    good = tmp_path / "good.tar"
    _tar(good, [(f"k{i}.{ext}", data) for i in range(5) for ext, data in (("txt", b"text %d" % i), ("json", b"{}"))])
    data = bytearray(good.read_bytes())
    data[4 * 1024: 4 * 1024 + 200] = b"G" * 200  # header of k2.txt
    shard = tmp_path / "hole-000000.tar"
    shard.write_bytes(bytes(data))
    stats = ReadStats()
    with caplog.at_level(logging.WARNING):
        keys = [r.key for r in iter_shards(shard, stats=stats)]
    assert keys == ["k0", "k3", "k4"]  # k1 and k2 border the hole: either may have lost members
    assert stats.shard_errors == {"corrupt_region": 1} and stats.skipped == {"corrupt_region": 2}
    assert f"{shard}: corrupt_region" in caplog.text


def test_unreadable_and_missing_shards_do_not_stop_the_read(tmp_path, caplog):
    _write(tmp_path / "ok", _records(3), shard_size=10)
    (tmp_path / "garbage.tar").write_bytes(b"this is not a tar file" * 50)
    (tmp_path / "empty.tar").write_bytes(b"")
    stats = ReadStats()
    paths = [tmp_path / "garbage.tar", tmp_path / "empty.tar", tmp_path / "missing.tar", tmp_path / "ok"]
    with caplog.at_level(logging.ERROR):
        records = list(iter_shards(paths, stats=stats))
    assert len(records) == 3
    assert stats.shard_errors == {"unreadable_shard": 3}
    assert sorted(Path(p).name for p in stats.failed_shards) == ["empty.tar", "garbage.tar", "missing.tar"]
    assert "missing.tar" in caplog.text and "garbage.tar" in caplog.text


def test_manifest_count_mismatch_is_reported(tmp_path):
    manifest = _write(tmp_path, _records(4), shard_size=10)
    shard = tmp_path / manifest["shards"][0]["file"]
    records = [r for r in _records(4) if r.key != "item-002"]
    shard.unlink()
    with ShardWriter(tmp_path / "other", "demo", 10) as w:  # same file name, one record fewer
        for r in records:
            w.write(r)
    (tmp_path / "other" / shard.name).rename(shard)
    stats = ReadStats()
    assert len(list(iter_shards(tmp_path, stats=stats))) == 3
    assert stats.shard_errors == {"count_mismatch": 1}


def test_reads_img2dataset_layout(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for shard in range(2):
        members = []
        for i in range(3):
            key = f"{shard:05d}{i:04d}"
            members += [(f"{key}.jpg", jpeg_bytes()), (f"{key}.txt", f"a photo {shard}-{i}".encode()),
                        (f"{key}.json", json.dumps({"url": f"http://x/{i}.jpg", "key": key, "status": "success",
                                                    "caption": f"a photo {shard}-{i}"}).encode())]
        _tar(tmp_path / f"{shard:05d}.tar", members)
        pq.write_table(pa.table({"key": ["x"]}), tmp_path / f"{shard:05d}.parquet")
        (tmp_path / f"{shard:05d}_stats.json").write_text("{}")
    stats = ReadStats()
    records = list(ShardReader(tmp_path, stats=stats, check_images="decode"))
    assert stats.ok and len(records) == 6 and stats.shards == 2
    assert records[4].key == "000010001" and records[4].image_ext == "jpg" and records[4].text == "a photo 1-1"
    assert records[4].meta["status"] == "success" and records[4].modality == Modality.IMAGE_TEXT
    # brace patterns, as in WebDataset URLs
    assert len(list(iter_shards(str(tmp_path / "{00000..00001}.tar")))) == 6


def test_gzipped_and_concatenated_shards(tmp_path):
    import gzip

    _tar(tmp_path / "a.tar", [("k0.txt", b"zero"), ("k0.json", b"{}")])
    _tar(tmp_path / "b.tar", [("k1.txt", b"one"), ("k1.json", b"{}")])
    both = tmp_path / "both.tar"  # `cat a.tar b.tar`: an end marker in the middle
    both.write_bytes((tmp_path / "a.tar").read_bytes() + (tmp_path / "b.tar").read_bytes())
    gz = tmp_path / "both.tar.gz"
    gz.write_bytes(gzip.compress(both.read_bytes()))
    for path in (both, gz):
        stats = ReadStats()
        assert [r.text for r in iter_shards(path, stats=stats)] == ["zero", "one"] and stats.ok
    gz.write_bytes(gzip.compress(both.read_bytes())[:-300])  # gzip stream cut short
    stats = ReadStats()
    list(iter_shards(gz, stats=stats))
    assert not stats.ok and stats.failed_shards == [str(gz)]


@pytest.fixture
def http_folder(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www."""
    import functools
    import http.server
    import threading

    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_shards_from_urls_http_and_pipe(http_folder, tmp_path):
    """http:// brace patterns and pipe: commands read like local shards; a 404 and a failing
    command are counted as unreadable shards, named by URL; damaged records still counted."""
    www, base = http_folder
    records = _records(5)
    _write(www, records)  # demo-000000..000002.tar
    _tar(www / "bad.tar", [("k1.txt", b"fine text"), ("k2.txt", b"\xff\xfe not utf-8")])
    stats = ReadStats()
    urls = [f"{base}/demo-{{000000..000002}}.tar", f"pipe:cat {www / 'bad.tar'}", f"{base}/missing.tar",
            "pipe:false"]
    reader = ShardReader(urls, stats=stats)
    assert all(isinstance(p, str) and ("://" in p or p.startswith("pipe:")) for p in reader.paths)
    back = list(reader)
    assert [r.key for r in back] == [r.key for r in records] + ["k1"]
    assert [r.image for r in back[:5]] == [r.image for r in records]
    assert back[0].shard == f"{base}/demo-000000.tar"
    assert stats.skipped == {"bad_text": 1} and stats.shard_errors == {"unreadable_shard": 2}
    assert sorted(stats.failed_shards) == sorted([f"{base}/missing.tar", "pipe:false"])
    assert not list(Path(__import__("tempfile").gettempdir()).glob("genius-shard-*"))  # fetched copies removed


def test_embed_shard_reads_a_url(http_folder, tmp_path):
    import pyarrow.parquet as pq

    from genius.encoders import EncoderConfig, MultimodalEncoder
    from genius.shard_jobs import embed_shard

    www, base = http_folder
    _write(www, _records(4), shard_size=10)
    report = embed_shard(MultimodalEncoder.from_config(EncoderConfig()), f"{base}/demo-000000.tar",
                         tmp_path / "out.parquet")
    table = pq.read_table(tmp_path / "out.parquet")
    assert report.rows == 4 and table.column("source").to_pylist()[0] == "demo-000000.tar/item-000"
