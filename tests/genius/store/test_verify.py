"""Damaged files are named: at open (sizes) and by `genius index verify` (checksums)."""
import json

import pytest

from cluster.cli import main
from genius.index import GeniusIndex
from genius.store import IndexFormatError
from genius.store.verify import verify_version


@pytest.fixture
def saved(fitted, tmp_path):
    return fitted.save(tmp_path / "idx")


def _first(version, prefix):
    manifest = json.loads((version / "manifest.json").read_text())
    return max((rel for rel in manifest["files"] if rel.startswith(prefix)), key=lambda r: manifest["files"][r]["size"])


def test_a_clean_index_verifies(saved, capsys):
    assert verify_version(saved.parent).ok
    assert main(["index", "verify", str(saved.parent)]) == 0
    assert "OK" in capsys.readouterr().out


@pytest.mark.parametrize("prefix", ["trie/", "items/", "vectors/", "model/"])
def test_flipped_byte_is_found_by_verify(saved, prefix, capsys):
    rel = _first(saved, prefix)
    path = saved / rel
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    report = verify_version(saved.parent)
    assert [p.file for p in report.problems] == [rel]
    with pytest.raises(IndexFormatError, match=f"{rel}: sha256 differs"):
        GeniusIndex.load(saved.parent, verify=True)
    assert main(["index", "verify", str(saved.parent)]) == 1
    out = capsys.readouterr().out
    assert rel in out and "sha256" in out


@pytest.mark.parametrize("prefix", ["trie/", "items/", "vectors/"])
def test_truncated_file_is_named_at_open(saved, prefix):
    rel = _first(saved, prefix)
    path = saved / rel
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(IndexFormatError, match=rel.split("/")[-1]):
        GeniusIndex.load(saved.parent)
    assert verify_version(saved.parent).problems[0].file == rel


def test_missing_and_extra_files(saved):
    rel = _first(saved, "items/")
    (saved / rel).unlink()
    (saved / "stray.bin").write_bytes(b"x")
    problems = {p.file: p.problem for p in verify_version(saved.parent).problems}
    assert problems == {rel: "missing", "stray.bin": "not listed in the manifest"}
    with pytest.raises(IndexFormatError, match="missing"):
        GeniusIndex.load(saved.parent)


def test_damaged_manifest_is_named(saved):
    (saved / "manifest.json").write_text("{not json")
    with pytest.raises(IndexFormatError, match="manifest.json: damaged manifest"):
        GeniusIndex.load(saved.parent)


def test_info_describes_a_v2_index(saved, capsys):
    assert main(["info", str(saved.parent)]) == 0
    out = capsys.readouterr().out
    assert "version: v-0 (format 2" in out and "items: 300 live, 0 deleted" in out
    assert main(["info", "--index", str(saved.parent), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_items"] == 300
