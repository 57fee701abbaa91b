import argparse
import json

import pytest

from cluster.data_cli import add_data_commands
from genius.data.shards import MissingSourceError
from tests.genius.data.fakes import fake_fashion_mnist, fake_wordnet


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="genius")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", *argv])
    return args.run(args)


def test_convert_and_inspect(tmp_path, capsys):
    fake_fashion_mnist(tmp_path / "src", n_train=10, n_test=4)
    out = tmp_path / "out"
    assert _run("fashion-mnist", "--source", str(tmp_path / "src"), "--out", str(out), "--limit", "7",
                "--shard-size", "3", "--quiet") == 0
    manifest = json.loads((out / "shards.json").read_text())
    assert manifest["items"] == 7 and len(manifest["shards"]) == 3
    capsys.readouterr()
    assert _run("inspect", str(out), "--verify", "--show", "2", "--quiet") == 0
    text = capsys.readouterr().out
    assert "items: 7" in text and "read: 7 records from 3 shards" in text and "fmnist-train-00000" in text

    # damage a shard: inspect reports it and exits 1
    shard = out / manifest["shards"][1]["file"]
    shard.write_bytes(shard.read_bytes()[:2000])
    assert _run("inspect", str(out), "--verify", "--quiet") == 1
    text = capsys.readouterr().out
    assert "truncated_shard" in text and shard.name in text and "MISMATCH" in text


def test_wordnet_and_table_commands(tmp_path, capsys):
    fake_wordnet(tmp_path / "wn")
    assert _run("wordnet", "--source", str(tmp_path / "wn"), "--out", str(tmp_path / "o"), "--quiet") == 0
    (tmp_path / "t.csv").write_text("text\nhello\nworld\n")
    assert _run("table", "--source", str(tmp_path / "t.csv"), "--out", str(tmp_path / "t"), "--quiet") == 0
    assert json.loads((tmp_path / "t" / "shards.json").read_text())["modalities"] == {"text": 2}


def test_missing_source_is_a_file_not_found_error(tmp_path):
    # cluster.cli.main turns FileNotFoundError into one error line and exit status 2.
    with pytest.raises(FileNotFoundError, match="--source PATH"):
        _run("wordnet", "--source", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"))
    with pytest.raises(MissingSourceError):
        _run("folder", "--source", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"))
    with pytest.raises(SystemExit):
        _run("folder", "--out", str(tmp_path / "o"))  # --source is required here
