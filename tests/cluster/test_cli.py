"""The `genius` CLI end to end on small tables: fit, info, search, and bad input."""
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.cli import main
from genius.index import GeniusIndex
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
                 "--out", str(out), "--quantizer-epochs", "3", "--decoder-epochs", "3", "--quiet",
                 "--codebook-weight", "50", "--level-widths", "8", "4", "--lookahead-rows", "2"]) == 0
    stored = GeniusIndex.load(out).config  # the beam's options are stored with the index
    assert (stored.codebook_weight, stored.level_widths, stored.lookahead_rows) == (50.0, [8, 4], 2)
    assert main(["info", "--index", str(out)]) == 0
    assert f"items: {len(keys)}" in capsys.readouterr().out
    results = root / "results.parquet"
    assert main(["search", "--index", str(out), "--queries", str(root / "test.parquet"), "--out", str(results),
                 "-k", "5", "--beam", "10"]) == 0
    table = pq.read_table(results).to_pydict()
    assert set(table) == {"query", "rank", "key", "item", "score", "modality"}
    assert set(table["modality"]) <= {"image", "image_text"}
    assert set(table["query"]) == set(range(5))
    assert all(k in keys for k in table["key"])
    assert all(keys[i] == k for i, k in zip(table["item"], table["key"]))
    # ... and a search can set them otherwise (no widths: --beam throughout)
    plain = root / "plain.parquet"
    assert main(["search", "--index", str(out), "--queries", str(root / "test.parquet"), "--out", str(plain),
                 "-k", "5", "--beam", "10", "--codebook-weight", "0", "--level-widths", "--lookahead-rows", "0"]) == 0
    assert set(pq.read_table(plain).to_pydict()["key"]) <= set(keys)
    # ... and decode in int8
    low = root / "int8.parquet"
    assert main(["search", "--index", str(out), "--queries", str(root / "test.parquet"), "--out", str(low),
                 "-k", "5", "--beam", "10", "--decode-precision", "int8"]) == 0
    assert set(pq.read_table(low).to_pydict()["key"]) <= set(keys)


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
    for command in (["demo"], ["fit"], ["search"], ["info"], ["index"], ["index", "verify"], ["index", "add"],
                    ["index", "delete"], ["index", "compact"], ["index", "gc"], ["index", "versions"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: genius {' '.join(command)}" in capsys.readouterr().out


def test_index_commands_update_a_fitted_index(tables, tmp_path, capsys):
    root, data, keys = tables
    out = tmp_path / "index"
    assert main(["fit", "--corpus", str(root / "corpus.parquet"), "--queries", str(root / "queries.parquet"),
                 "--out", str(out), "--quantizer-epochs", "2", "--quantizer-holdout", "0", "--decoder-epochs", "2",
                 "--quiet"]) == 0
    assert GeniusIndex.load(out).config.quantizer.holdout_share == 0.0
    new = tmp_path / "new.parquet"
    pq.write_table(pa.table({"key": ["nan", "NA"], "embedding": [r.tolist() for r in data.test_queries[:2]],
                             "modality": ["image", "image_text"]}), new)
    assert main(["index", "add", str(out), "--corpus", str(new)]) == 0
    assert main(["index", "delete", str(out), "--key", keys[0], "--key", "nan"]) == 0
    assert main(["index", "delete", str(out), "--key", "no-such-key"]) == 2
    assert main(["index", "compact", str(out)]) == 0
    capsys.readouterr()
    assert main(["index", "versions", str(out)]) == 0
    listing = capsys.readouterr().out
    assert "* v-3" in listing and f"{len(keys)} items (0 deleted)" in listing
    assert main(["info", str(out)]) == 0
    assert "image_text" in capsys.readouterr().out
    assert main(["index", "verify", str(out), "--all"]) == 0
    assert main(["index", "gc", str(out), "--keep", "1"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("v-")) == ["v-3"]


def test_fit_reads_keys_verbatim_and_refuses_duplicates(tmp_path, caplog):
    corpus = tmp_path / "corpus.csv"
    corpus.write_text("key,text\nnan,not a number\nNA,sodium\nnull,nothing at all\n", encoding="utf-8")
    queries = tmp_path / "queries.csv"
    queries.write_text("text,target\nnot a number,nan\nsodium,NA\nzero,null\n", encoding="utf-8")
    from genius.tables import read_items
    assert read_items(queries, require_target=True).targets == ["nan", "NA", "null"]
    assert list(read_items(corpus).items.keys) == ["nan", "NA", "null"]
    dup = tmp_path / "dup.csv"
    dup.write_text("key,text\nNA,a\nNA,b\n", encoding="utf-8")
    assert main(["fit", "--corpus", str(dup), "--queries", str(queries), "--out", str(tmp_path / "x")]) == 2
    assert f"{dup}: row 1: key 'NA' repeats row 0" in caplog.text


def test_fit_uses_a_stage1_encoder_folder(tmp_path, capsys):
    """`genius fit --encoder DIR` indexes with the given (stage-1) encoder and stores it."""
    import torch

    from genius.encoders import EncoderConfig, MultimodalEncoder
    from genius.index import GeniusIndex

    torch.manual_seed(123)
    encoder = MultimodalEncoder.from_config(EncoderConfig())
    encoder.save(tmp_path / "enc")
    words = ["apple", "river", "candle", "mountain", "violin", "lantern", "cactus", "harbor", "meadow", "anchor"]
    corpus = tmp_path / "corpus.csv"
    corpus.write_text("key,text\n" + "".join(f"{w},a picture of a {w}\n" for w in words), encoding="utf-8")
    queries = tmp_path / "queries.csv"
    queries.write_text("text,target\n" + "".join(f"the {w} again,{w}\n" for w in words), encoding="utf-8")
    out = tmp_path / "index"
    assert main(["fit", "--corpus", str(corpus), "--queries", str(queries), "--out", str(out), "--encoder",
                 str(tmp_path / "enc"), "--quantizer-epochs", "2", "--decoder-epochs", "2", "--quiet"]) == 0
    index = GeniusIndex.load(out)
    stored = dict(index.encoder.named_parameters())
    for name, param in encoder.named_parameters():
        assert torch.equal(stored[name].cpu(), param.detach().cpu()), name


def test_shard_patterns_keep_urls_whole():
    """`--shards` given URLs (index build, add, search-batch, train encoder) stays URLs: brace
    patterns expanded, no '//' folded by a Path."""
    from cluster.train_cli import resolve_shards

    assert resolve_shards("https://data.example/fm-{000..002}.tar") == [
        f"https://data.example/fm-{i:03d}.tar" for i in range(3)]
    assert resolve_shards("pipe:aws s3 cp s3://bucket/fm-000.tar -") == ["pipe:aws s3 cp s3://bucket/fm-000.tar -"]


def test_the_clis_decode_precisions_are_the_librarys():
    # Written out in cluster/serve_cli.py so that `genius --help` need not import torch.
    from cluster.serve_cli import DECODE_PRECISIONS
    from genius.decoder_precision import PRECISIONS

    assert DECODE_PRECISIONS == PRECISIONS
