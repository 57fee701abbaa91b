"""`genius index build` on a real Ray cluster (head + two worker nodes on this machine)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from cluster.build.pipeline import BuildConfig, build_index  # noqa: E402
from genius.index import GeniusIndex  # noqa: E402
from genius.items import Items  # noqa: E402
from tests.cluster.build_data import query_texts, write_awkward_shards, write_shards, write_text_shard  # noqa: E402

EPOCHS = dict(quantizer_epochs=3, decoder_epochs=3)


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [c.add_node(num_cpus=2) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address)
    yield c, workers
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    keys = write_shards(folder, shards=6, per_shard=15, bad=True)
    keys += write_awkward_shards(folder, 6)
    return folder, keys


def item_keys(version: Path) -> list[str]:
    return [k for f in sorted((version / "items").glob("*.arrow")) for k in feather.read_table(f).column("key").to_pylist()]


def config(shards_dir: Path, out: Path, **kwargs) -> BuildConfig:
    return BuildConfig(shards=str(shards_dir), out=str(out), actors=2, progress=False, **{**EPOCHS, **kwargs})


@pytest.fixture(scope="module")
def built(cluster, shards, tmp_path_factory):
    folder, keys = shards
    out = tmp_path_factory.mktemp("built") / "index"
    return build_index(config(folder, out)), out


def test_every_good_item_is_indexed_once_and_bad_records_are_counted(built, shards):
    result, out = built
    _, keys = shards
    assert sorted(item_keys(result.version)) == sorted(keys)
    assert result.items == len(keys)
    # 6 shards x (a corrupt image, an empty text, a non-UTF-8 text), one key seen twice
    assert result.skipped == {"bad_image": 6, "bad_text": 12, "duplicate_key": 1}
    assert [Path(s).name for s in result.unreadable_shards] == ["shard-00007.tar"]
    job = json.loads((out / ".build" / "job.json").read_text())
    embed_units = {k: v for k, v in job["units"].items() if k.startswith("embed:")}
    assert len(embed_units) == 8
    assert all(embed_units[f"embed:{i:06d}-shard-{i:05d}.tar"]["skipped"] == {"bad_image": 1, "bad_text": 2}
               for i in range(6))
    assert embed_units["embed:000007-shard-00007.tar"]["shard_errors"] == {"unreadable_shard": 1}
    assert job["stages"]["merge"]["duplicate_keys"] == {"000006-shard-00006.tar": 1}
    # The kept item-00003 is the first one (shard 0), not the repeat.
    index = GeniusIndex.load(result.version.parent)
    row = index.items.find_keys(["item-00003"])["item-00003"]
    assert len(row) == 1 and index.items.column("source", np.array(row))[0] == "shard-00000.tar/item-00003"
    assert set(result.stage_seconds) >= {"embed", "train_quantizer", "quantize", "merge", "train_decoder", "publish"}


def test_built_index_finds_items_from_their_queries(built, shards):
    result, _ = built
    index = GeniusIndex.load(result.version.parent, verify=True)
    probe = list(range(0, 90, 3))  # items with queries in their metadata
    hits = index.search(Items(texts=[query_texts(i)[0] for i in probe]), k=5)
    recall = np.mean([f"item-{i:05d}" in row for i, row in zip(probe, hits.keys)])
    assert recall >= 0.3, recall  # chance: 5 / 91 = 0.055


def test_same_trie_as_the_library_from_the_same_model(built):
    """DDP and Ray Train aside, the merge is the library's: the built model's quantizer over the
    built items' vectors gives the same IDs, trie and search results in one process."""
    result, _ = built
    index = GeniusIndex.load(result.version.parent)
    rows = np.arange(index.items.num_items)
    vectors = index.vectors[rows].astype(np.float32)
    modality = index.items.modality(rows)
    codes = index.quantizer.encode(vectors, modality).cpu().numpy()
    local = GeniusIndex.from_codes(index.config, index.quantizer, index.decoder, codes, modality,
                                   index.items.keys(rows), vectors)
    assert np.array_equal(local.items.ids(rows), index.items.ids(rows))
    queries = index.embed(Items(texts=[query_texts(i)[1] for i in range(0, 90, 5)]))
    a, b = index.search(queries, k=5), local.search(queries, k=5)
    assert a.keys == b.keys and np.allclose(a.scores, b.scores)


def test_worker_node_removed_mid_build_loses_no_item(cluster, shards, tmp_path):
    c, workers = cluster
    folder, keys = shards
    out = tmp_path / "index"
    job_file = out / ".build" / "job.json"
    removed = threading.Event()

    def remove_a_node_once_embedding_started() -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                units = json.loads(job_file.read_text())["units"]
            except (FileNotFoundError, json.JSONDecodeError):
                units = {}
            if any(k.startswith("embed:") for k in units):
                c.remove_node(workers[1])
                removed.set()
                return
            time.sleep(0.05)

    spare = c.add_node(num_cpus=2)  # capacity for the actors of the node that goes away
    thread = threading.Thread(target=remove_a_node_once_embedding_started)
    thread.start()
    try:
        result = build_index(config(folder, out, batch_size=4))
    finally:
        thread.join()
    assert removed.is_set(), "the node was not removed during the build"
    assert sorted(item_keys(result.version)) == sorted(keys)
    workers[1] = spare


def test_driver_killed_and_resumed_publishes_the_same_index(cluster, built, shards, tmp_path):
    c, _ = cluster
    folder, _ = shards
    out = tmp_path / "index"
    command = [sys.executable, "-m", "cluster.cli", "index", "build", "--shards", str(folder), "--out", str(out),
               "--address", c.address, "--quantizer-epochs", "3", "--decoder-epochs", "3", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    job_file = out / ".build" / "job.json"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        try:
            units = json.loads(job_file.read_text())["units"]
        except (FileNotFoundError, json.JSONDecodeError):
            units = {}
        if "train:quantizer" in units:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the build ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (out / "CURRENT").exists()
    rerun = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    job = json.loads(job_file.read_text())
    assert job["resumed"] == 1
    expected = json.loads((built[0].version / "manifest.json").read_text())["files"]
    got = json.loads((out / "v-0" / "manifest.json").read_text())["files"]
    assert got == expected, sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))


def test_search_batch_equals_index_search_and_resumes(built, tmp_path):
    from cluster.cli import main

    result, _ = built
    probe = list(range(0, 90, 4))
    texts = [query_texts(i)[1] for i in probe]
    table = tmp_path / "queries.csv"
    table.write_text("key,text\n" + "".join(f"q{i},\"{t}\"\n" for i, t in zip(probe, texts)), encoding="utf-8")
    out = tmp_path / "results"
    args = ["search-batch", "--index", str(result.version.parent), "--queries", str(table), "--out", str(out),
            "-k", "5", "--unit-rows", "7", "--quiet"]
    assert main(args) == 0
    parts = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("results-*.parquet"))]).to_pylist()
    assert len(list(out.glob("results-*.parquet"))) == 4  # 23 queries in units of 7
    expected = GeniusIndex.load(result.version.parent).search(Items(texts=texts), k=5)
    for q, (keys, scores) in enumerate(zip(expected.keys, expected.scores)):
        rows = sorted((r for r in parts if r["query"] == f"q{probe[q]}"), key=lambda r: r["rank"])
        assert [r["key"] for r in rows] == keys
        assert np.allclose([r["score"] for r in rows], scores[: len(keys)])
        assert {r["version"] for r in rows} == {result.version.name}
    job = json.loads((out / "job.json").read_text())
    assert sum(u["rows"] for u in job["units"].values()) == len(probe)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("results-*.parquet")}
    assert main(args + ["--resume"]) == 0  # nothing left to do: no unit rerun
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("results-*.parquet")} == before


def test_add_shards_and_delete_on_the_cluster_equal_a_rebuild(built, tmp_path):
    import shutil

    from cluster.cli import main

    result, _ = built
    root = tmp_path / "index"
    shutil.copytree(result.version.parent, root, ignore=shutil.ignore_patterns(".build"))
    # Shards whose keys (item-00000 ...) are in the index already: refused, nothing published.
    write_shards(tmp_path / "again", shards=1, per_shard=3)
    assert main(["index", "add", str(root), "--shards", str(tmp_path / "again"), "--quiet"]) == 2
    assert (root / "CURRENT").read_text().strip() == result.version.name

    texts = {f"fresh-{i}": f"a brand new {w} on the top shelf" for i, w in enumerate(["drum", "kite", "globe", "quilt"])}
    fresh = tmp_path / "fresh"
    write_text_shard(fresh / "fresh-0.tar", texts)
    assert main(["index", "add", str(root), "--shards", str(fresh), "--work", str(tmp_path / "addjob"), "--quiet"]) == 0
    added = GeniusIndex.load(root)
    n_old = result.items
    assert added.items.num_items == n_old + 4
    assert added.items.keys(np.arange(n_old, n_old + 4)) == list(texts)

    def rebuild(index: GeniusIndex, rows: np.ndarray) -> GeniusIndex:
        vectors = index.vectors[rows].astype(np.float32)
        modality = index.items.modality(rows)
        codes = index.quantizer.encode(vectors, modality).cpu().numpy()
        return GeniusIndex.from_codes(index.config, index.quantizer, index.decoder, codes, modality,
                                      index.items.keys(rows), vectors)

    queries = added.embed(Items(texts=["a new drum on a shelf", "the globe", *[query_texts(i)[0] for i in range(5)]]))
    everything = rebuild(added, np.arange(n_old + 4))
    a, b = added.search(queries, k=5), everything.search(queries, k=5)
    assert a.keys == b.keys and np.allclose(a.scores, b.scores)

    gone = ["fresh-1", "item-00002"]
    (tmp_path / "gone.txt").write_text("\n".join(gone) + "\n")
    assert main(["index", "delete", str(root), "--keys", str(tmp_path / "gone.txt")]) == 0
    deleted = GeniusIndex.load(root)
    survivors = np.array([i for i, k in enumerate(added.items.keys(np.arange(n_old + 4))) if k not in gone])
    c, d = deleted.search(queries, k=5), rebuild(added, survivors).search(queries, k=5)
    assert c.keys == d.keys and np.allclose(c.scores, d.scores)
    assert not set(gone) & {k for row in c.keys for k in row}


def test_pairs_table_with_text_and_image_queries(cluster, tmp_path):
    """--pairs: query texts, query images (file paths) and image-text queries, embedded on the cluster."""
    from tests.cluster.build_data import png

    folder = tmp_path / "shards"
    keys = write_shards(folder, shards=2, per_shard=10, images_every=2)
    for i in range(3):
        (tmp_path / f"q{i}.png").write_bytes(png(i * 2))
    pairs = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({
        "text": [query_texts(4)[0], None, "this one", *[query_texts(i)[1] for i in range(10, 20)]],
        "image": [None, "q1.png", "q2.png", *[None] * 10],
        "target": ["item-00004", "item-00002", "item-00004", *[f"item-{i:05d}" for i in range(10, 20)]],
    }), pairs)
    result = build_index(config(folder, tmp_path / "index", pairs=str(pairs)))
    assert sorted(item_keys(result.version)) == sorted(keys)
    table = pq.read_table(tmp_path / "index" / ".build" / "pairs.parquet").to_pylist()
    assert [r["query_modality"] for r in table[:3]] == ["text", "image", "image_text"]
    assert len(table) == 13 and all(len(r["query_vector"]) == len(table[0]["query_vector"]) for r in table)


def test_decoder_trains_data_parallel_on_two_workers(cluster, tmp_path):
    folder = tmp_path / "shards"
    keys = write_shards(folder, shards=2, per_shard=12, images_every=0)
    out = tmp_path / "index"
    result = build_index(config(folder, out, train_workers=2, decoder_epochs=6))
    assert sorted(item_keys(result.version)) == sorted(keys)
    state = __import__("torch").load(out / ".build" / "model" / "decoder-checkpoint-w2.pt", weights_only=False)
    assert state["epoch"] == 6 and state["history"][-1]["loss"] < state["history"][0]["loss"]
    index = GeniusIndex.load(out)
    probe = list(range(0, 24, 2))
    hits = index.search(Items(texts=[query_texts(i)[0] for i in probe]), k=5)
    recall = np.mean([f"item-{i:05d}" in row for i, row in zip(probe, hits.keys)])
    chance = 5 / 24  # recall@5 of a random ranking: one relevant item among 24
    assert recall > 2 * chance + 0.05, (recall, chance)
