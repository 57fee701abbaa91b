"""The `genius` CLI end to end on small tables: fit, info, search, and bad input."""
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.cli import main
from genius.synthetic import make_synthetic


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = make_synthetic(num_items=200, clusters=10, seed=3)
    keys = [f"item-{i}" for i in range(len(data.corpus))]
    names = {0: "image", 1: "text", 2: "image_text"}
    pq.write_table(pa.table({
        "key": keys,
        "embedding": [row.tolist() for row in data.corpus.embeddings],
        "modality": [names[int(m)] for m in data.corpus.modality],
    }), root / "corpus.parquet")
    pq.write_table(pa.table({
        "embedding": [row.tolist() for row in data.train_queries.embeddings],
        "modality": ["text"] * len(data.train_targets),
        "target": [keys[t] for t in data.train_targets],
    }), root / "queries.parquet")
    pq.write_table(pa.table({
        "embedding": [row.tolist() for row in data.test_queries[:5]],
        "modality": ["text"] * 5,
    }), root / "test.parquet")
    return root, data, keys


def test_fit_info_search(tables, capsys):
    root, data, keys = tables
    out = root / "index"
    assert main(["fit", "--corpus", str(root / "corpus.parquet"), "--queries", str(root / "queries.parquet"),
                 "--out", str(out), "--quantizer-epochs", "3", "--decoder-epochs", "3", "--quiet"]) == 0
    assert main(["info", "--index", str(out)]) == 0
    assert f"items: {len(keys)}" in capsys.readouterr().out
    results = root / "results.parquet"
    assert main(["search", "--index", str(out), "--queries", str(root / "test.parquet"), "--out", str(results),
                 "-k", "5", "--beam", "10"]) == 0
    table = pq.read_table(results).to_pydict()
    assert set(table) == {"query", "rank", "key", "item", "score"}
    assert set(table["query"]) == set(range(5))
    assert all(k in keys for k in table["key"])
    assert all(keys[i] == k for i, k in zip(table["item"], table["key"]))


def test_bad_row_names_file_and_row(tables, tmp_path, caplog):
    root, _, _ = tables
    bad = tmp_path / "queries.parquet"
    pq.write_table(pa.table({"text": ["a query", "   "], "target": ["item-0", "item-1"]}), bad)
    assert main(["fit", "--corpus", str(root / "corpus.parquet"), "--queries", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert f"{bad}: row 1: text is empty" in caplog.text
    missing = tmp_path / "missing-target.parquet"
    pq.write_table(pa.table({"text": ["a query"], "target": ["no-such-key"]}), missing)
    assert main(["fit", "--corpus", str(root / "corpus.parquet"), "--queries", str(missing), "--out", str(tmp_path / "y")]) == 2
    assert "row 0: target 'no-such-key' is not a key" in caplog.text


def test_every_subcommand_has_help(capsys):
    run = subprocess.run([sys.executable, "-m", "cluster.cli", "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "usage: genius" in run.stdout
    for command in (["demo"], ["fit"], ["search"], ["info"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: genius {command[0]}" in capsys.readouterr().out
