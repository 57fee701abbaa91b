"""Merging per-shard ID tables: byte-identical output for any split and order; bad rows named."""
import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genius.idcodec import IdCodec
from genius.index import GeniusIndex, publish_merged
from genius.modality import Modality
from genius.store.item_table import ItemTables
from genius.store.merge import IdTableError, MergeConfig, merge_id_tables
from genius.trie import read_partition

from tests.genius.store.conftest import same_results

NAMES = [m.name.lower() for m in Modality]


def make_rows(rng, n: int, codec: IdCodec, dim: int = 4) -> dict:
    codes = rng.integers(0, codec.codebook_size, (n, codec.num_levels))
    codes[rng.random(n) < 0.3] = codes[0]  # shared IDs: ties broken by key
    return {
        "key": [f"k{int(v)}" for v in rng.permutation(10 * n)[:n]],
        "modality": [NAMES[int(m)] for m in rng.integers(0, 3, n)],
        "id": [bytes(r) for r in codec.pack(codes)],
        "source": [f"shard-{i % 3}.tar/{i}" for i in range(n)],
        "metadata": ['{"i": %d}' % i for i in range(n)],
        "vector": rng.normal(size=(n, dim)).astype(np.float32).tolist(),
    }


def write_shards(folder: Path, rows: dict, cuts: list[int], order: list[int], codec: IdCodec) -> list[Path]:
    folder.mkdir(parents=True)
    n = len(rows["key"])
    bounds = [0, *sorted(cuts), n]
    pieces = [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
    paths = []
    for j, p in enumerate(order):
        lo, hi = pieces[p % len(pieces)] if p < len(pieces) else (0, 0)
        table = pa.table({
            "key": pa.array(rows["key"][lo:hi], pa.string()),
            "modality": pa.array(rows["modality"][lo:hi], pa.string()),
            "id": pa.array(rows["id"][lo:hi], pa.binary(codec.width)),
            "source": pa.array(rows["source"][lo:hi], pa.string()),
            "metadata": pa.array(rows["metadata"][lo:hi], pa.string()),
            "vector": pa.array(rows["vector"][lo:hi], pa.list_(pa.float32())),
        })
        path = folder / f"ids-{j:03d}.parquet"
        pq.write_table(table, path)
        paths.append(path)
    return paths


def digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def merge(paths, config, out: Path, work: Path):
    out.mkdir(parents=True)
    for sub in ("trie", "items", "vectors"):
        (out / sub).mkdir()
    return merge_id_tables(paths, config, out, work)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 120), levels=st.integers(1, 4), size=st.sampled_from([2, 5, 16, 300]),
       ranges=st.integers(1, 3), per_file=st.integers(1, 50), seed=st.integers(0, 2**31),
       cuts=st.lists(st.integers(0, 120), max_size=5), data=st.data())
def test_merge_is_byte_identical_for_any_split_and_order(tmp_path_factory, n, levels, size, ranges, per_file, seed,
                                                        cuts, data):
    codec = IdCodec(levels, size)
    rng = np.random.default_rng(seed)
    rows = make_rows(rng, n, codec)
    config = MergeConfig(levels, size, ranges_per_modality=ranges, items_per_file=per_file, key_buckets=3)
    base = tmp_path_factory.mktemp("merge")
    one = merge(write_shards(base / "in1", rows, [], [0], codec), config, base / "out1", base / "w1")
    cuts = [c % (n + 1) for c in cuts]
    pieces = len(cuts) + 1
    order = data.draw(st.permutations(list(range(pieces)) + [pieces]))  # plus one empty shard
    many = merge(write_shards(base / "in2", rows, cuts, order, codec), config, base / "out2", base / "w2")
    assert digests(base / "out1") == digests(base / "out2")
    assert one.partitions == many.partitions and one.item_tables == many.item_tables
    assert one.num_items == n and sum(one.modality_counts.values()) == n

    # Every input row is in exactly one partition and one item table row, with its own ID.
    items = ItemTables.open(base / "out1", one.item_tables, codec.width)
    all_items = np.arange(n)
    assert sorted(items.keys(all_items)) == sorted(rows["key"])
    by_key = {k: i for i, k in enumerate(rows["key"])}
    stored_ids = items.ids(all_items)
    for item, key in zip(all_items, items.keys(all_items)):
        assert bytes(stored_ids[item]) == rows["id"][by_key[key]]
    seen = np.concatenate([np.asarray(read_partition(base / "out1" / "trie", e, codec).items) for e in one.partitions])
    assert sorted(seen.tolist()) == all_items.tolist()


def bad_table(tmp_path, **columns):
    base = {"key": ["a", "b", "c"], "modality": ["text", "image", "text"],
            "id": pa.array([b"\x00\x01", b"\x00\x02", b"\x00\x03"], pa.binary(2))}
    base.update(columns)
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table(base), path)
    return path


@pytest.mark.parametrize("columns, message", [
    ({"modality": ["text", "video", "text"]}, "row 1: modality 'video' is not one of"),
    ({"id": pa.array([b"\x00\x01", b"\x00\x02\x03", b"\x00\x03"], pa.binary())}, "row 1: ID of 3 bytes, expected 2"),
    ({"id": pa.array([b"\x00\x01", b"\x00\x02", b"\xff\xff"], pa.binary(2))}, "row 2: ID ffff does not hold"),
    ({"key": pa.array(["a", "", "c"])}, "row 1: key is empty"),
    ({"key": pa.array(["a", None, "c"], pa.string())}, "row 1: key is empty"),
    ({"vector": pa.array([[1.0, 2.0], [1.0], [0.0, 0.0]])}, "row 1: vector of length 1"),
    ({"vector": pa.array([[1.0, 2.0], [1.0, float("nan")], [0.0, 0.0]])}, "row 1: vector has NaN"),
])
def test_bad_rows_are_named(tmp_path, columns, message):
    path = bad_table(tmp_path, **columns)
    with pytest.raises(IdTableError, match=message) as err:
        merge([path], MergeConfig(2, 200), tmp_path / "out", tmp_path / "work")
    assert str(path) in str(err.value)


def test_duplicate_key_across_shards_names_both(tmp_path):
    codec = IdCodec(2, 16)
    rows = make_rows(np.random.default_rng(0), 20, codec)
    rows["key"][17] = rows["key"][3]
    paths = write_shards(tmp_path / "in", rows, [10], [0, 1], codec)
    with pytest.raises(IdTableError, match=f"duplicate key '{rows['key'][3]}'") as err:
        merge(paths, MergeConfig(2, 16), tmp_path / "out", tmp_path / "work")
    assert "ids-000.parquet: row 3" in str(err.value) and "ids-001.parquet row 7" in str(err.value)


def test_unreadable_table_is_named(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(IdTableError, match="broken.parquet: cannot read"):
        merge([path], MergeConfig(2, 16), tmp_path / "out", tmp_path / "work")


def test_published_merge_searches_like_the_fitted_index(fitted, synthetic, tmp_path):
    """ID tables of the fitted index's items -> publish_merged -> the same search results."""
    n = len(fitted)
    rows = np.arange(n)
    order = np.random.default_rng(0).permutation(n)
    paths = []
    for j, part in enumerate(np.array_split(order, 4)):
        table = pa.table({
            "key": pa.array(fitted.items.keys(part), pa.string()),
            "modality": pa.array(fitted.items.modality(part).astype(np.int8)),
            "id": pa.array([bytes(r) for r in fitted.items.ids(part)], pa.binary(fitted.codec.width)),
            "vector": pa.array(fitted.vectors[part].astype(np.float32).tolist(), pa.list_(pa.float32())),
        })
        paths.append(tmp_path / f"ids-{j}.parquet")
        pq.write_table(table, paths[-1])
    root = tmp_path / "idx"
    publish_merged(root, paths, fitted.config, fitted.quantizer, fitted.decoder)
    merged = GeniusIndex.load(root)
    assert merged.items.num_items == n and sorted(merged.items.keys(rows)) == sorted(fitted.items.keys(rows))
    for rerank in (False, True):
        same_results(merged, fitted, synthetic.test_queries[:30], k=10, beam_size=20, rerank=rerank)
    # A beam's items are neighbours: item numbers follow the trie, partitioned by modality, i.e.
    # (modality, ID) order (IDs alone are not sorted: this corpus has two modalities).
    order_keys = [(int(m), bytes(i)) for m, i in zip(merged.items.modality(rows), merged.items.ids(rows))]
    assert order_keys == sorted(order_keys)
