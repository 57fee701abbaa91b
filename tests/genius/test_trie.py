import json

import numpy as np
import pytest

import genius.trie as trie_module
from genius.idcodec import IdCodec
from genius.modality import Modality
from genius.trie import NO_BIG_NODES, Trie, TriePartition, build_partition, read_partition, write_partition


def random_corpus(rng, levels, size, n):
    codes = rng.integers(0, size, (n, levels))
    # Many shared prefixes, as real IDs have.
    shared = rng.random(n) < 0.5
    codes[shared, : levels - 1] = codes[0, : levels - 1]
    return codes, rng.integers(0, 3, n)


def enumerate_leaves(trie: Trie) -> set[tuple]:
    """Walk every path through the trie's expansion API."""
    found = set()
    for m in trie.modalities:
        first = np.flatnonzero(trie.root_mask(np.array([int(m)]))[0])
        state = trie.root_children(np.full(len(first), int(m)), first)
        paths = [[c] for c in first]
        for level in range(1, trie.codec.num_levels):
            expansion = trie.expand(level, state)
            beam, code = np.nonzero(expansion.mask)
            state = expansion.children(beam, code)
            paths = [paths[b] + [c] for b, c in zip(beam, code)]
        for path, items in zip(paths, trie.leaf_items(state)):
            for item in items:
                found.add((int(m), tuple(int(c) for c in path), int(item)))
    return found


@pytest.mark.parametrize("big_rows", [None, 2, 0])
@pytest.mark.parametrize("seed", range(12))
def test_expansion_reaches_exactly_the_indexed_items(seed, big_rows, tmp_path, monkeypatch):
    # Small thresholds put (almost) every prefix below the dense levels on the big-node path.
    monkeypatch.setattr(trie_module, "BIG_NODE_ROWS", big_rows)
    rng = np.random.default_rng(seed)
    levels, size, n = int(rng.integers(1, 5)), int(rng.choice([2, 5, 16, 64])), int(rng.integers(1, 400))
    codec = IdCodec(levels, size)
    codes, modality = random_corpus(rng, levels, size, n)
    trie = Trie.build(codec, codec.pack(codes), modality, ranges_per_modality=int(rng.integers(1, 4)))
    if big_rows == 0 and any(len(p.dense) < levels for p in trie.partitions):
        assert any(len(p.nodes) for p in trie.partitions)
    if seed % 2:
        trie.save(tmp_path)
        trie = Trie.load(tmp_path)
    expected = {(int(modality[i]), tuple(int(c) for c in codes[i]), i) for i in range(n)}
    assert enumerate_leaves(trie) == expected


@pytest.mark.parametrize("seed", range(6))
def test_single_completion_marks_prefixes_with_one_id_below(seed):
    rng = np.random.default_rng(seed)
    levels, size, n = 4, int(rng.choice([3, 8])), int(rng.integers(1, 200))
    codec = IdCodec(levels, size)
    codes, modality = random_corpus(rng, levels, size, n)
    codes[: n // 4] = codes[0]  # one ID carried by many items
    trie = Trie.build(codec, codec.pack(codes), modality, ranges_per_modality=2)
    for m in trie.modalities:
        mine = codes[modality == int(m)]
        first = np.flatnonzero(trie.root_mask(np.array([int(m)]))[0])
        state = trie.root_children(np.full(len(first), int(m)), first)
        paths = [(c,) for c in first]
        for level in range(1, levels + 1):
            below = [len({tuple(r) for r in mine if tuple(r[:level]) == path}) for path in paths]
            assert trie.single_completion(state).tolist() == [count == 1 for count in below]
            if level == levels:
                break
            expansion = trie.expand(level, state)
            beam, code = np.nonzero(expansion.mask)
            state = expansion.children(beam, code)
            paths = [paths[b] + (c,) for b, c in zip(beam, code)]


def without_big_nodes(trie: Trie) -> Trie:
    parts = [TriePartition(p.modality, p.code_lo, p.code_hi, p.ids, p.items, p.dense) for p in trie.partitions]
    return Trie(trie.codec, parts)


@pytest.mark.parametrize("big_rows", [0, 3, 40])
def test_big_nodes_give_the_same_expansion_as_reading_rows(big_rows, monkeypatch):
    monkeypatch.setattr(trie_module, "BIG_NODE_ROWS", big_rows)
    rng = np.random.default_rng(big_rows)
    codec = IdCodec(5, 8)
    codes = rng.integers(0, 8, (3000, 5))
    codes[rng.random(3000) < 0.3, :3] = [1, 2, 3]  # a skewed branch
    trie = Trie.build(codec, codec.pack(codes), np.zeros(3000, dtype=int))
    plain = without_big_nodes(trie)
    assert len(trie.partitions[0].nodes) > 0 and len(plain.partitions[0].nodes) == 0
    state = trie.root_children(np.zeros(8, dtype=int), np.arange(8))
    for level in range(1, codec.num_levels):
        fast, slow = trie.expand(level, state), plain.expand(level, state)
        assert np.array_equal(fast.mask, slow.mask)
        beam, code = np.nonzero(fast.mask)
        a, b = fast.children(beam, code), slow.children(beam, code)
        for name in ("part", "lo", "hi", "prefix"):
            assert np.array_equal(getattr(a, name), getattr(b, name))
        for expansion in (fast, slow):
            missing_beam, missing_code = np.nonzero(~expansion.mask)
            for bad in [(missing_beam[:1], missing_code[:1]), (beam[:1], np.array([-1])), (beam[:1], np.array([8]))]:
                if len(bad[0]):
                    with pytest.raises(ValueError, match="not a child"):
                        expansion.children(*bad)
        keep = rng.random(len(beam)) < 0.5  # follow some branches only, mixing range sizes
        state = a.take(np.flatnonzero(keep)) if keep.any() else a


def test_big_node_tables_are_counted_and_small(monkeypatch):
    rng = np.random.default_rng(0)
    codec = IdCodec(4, 16)
    codes = rng.integers(0, 16, (5000, 4))
    codes[: 2000, :2] = [3, 4]
    monkeypatch.setattr(trie_module, "BIG_NODE_ROWS", 100)
    trie = Trie.build(codec, codec.pack(codes), np.zeros(5000, dtype=int))
    part = trie.partitions[0]
    assert len(part.nodes) > 0 and ((part.nodes[:, 2] - part.nodes[:, 1]) > 100).all()
    # Each node's children tile its rows, in code order.
    for level, lo, hi, first, count in part.nodes:
        kids = part.children[first : first + count]
        assert kids[0, 1] == lo and kids[-1, 2] == hi and (kids[1:, 1] == kids[:-1, 2]).all()
        assert (np.diff(kids[:, 0]) > 0).all()
        assert np.array_equal(kids[:, 0], codec.code_at(part.ids[kids[:, 1]], level))
    assert (part.nodes[:, 0] >= len(part.dense)).all()
    assert np.array_equal(np.lexsort((part.nodes[:, 1], part.nodes[:, 0])), np.arange(len(part.nodes)))
    total = part.ids.nbytes + part.items.nbytes + sum(t.nbytes for t in part.dense)
    assert trie.bytes_per_item() == (total + part.nodes.nbytes + part.children.nbytes) / 5000


def test_memory_per_item_within_budget():
    rng = np.random.default_rng(0)
    codec = IdCodec(8, 4096)
    n = 200_000
    trie = Trie.build(codec, codec.pack(rng.integers(0, 4096, (n, 8))), np.zeros(n, dtype=int))
    # 12-byte ID + 4-byte item number, plus small dense tables.
    assert trie.bytes_per_item() <= 16.5


def test_load_is_memory_mapped(tmp_path):
    codec = IdCodec(3, 16)
    codes = np.random.default_rng(1).integers(0, 16, (50, 3))
    Trie.build(codec, codec.pack(codes), np.ones(50, dtype=int)).save(tmp_path)
    trie = Trie.load(tmp_path)
    assert isinstance(trie.partitions[0].ids, np.memmap)
    assert trie.modalities == [Modality.TEXT]
    assert len(trie) == 50
    assert trie.contains(Modality.TEXT, codec.pack(codes)).all()
    assert not trie.contains(Modality.IMAGE, codec.pack(codes)).any()


def test_child_of_a_code_that_is_not_there_is_refused():
    codec = IdCodec(2, 8)
    codes = np.array([[1, 2], [1, 3], [4, 0]])
    trie = Trie.build(codec, codec.pack(codes), np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="no items"):
        trie.root_children(np.array([0]), np.array([2]))


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no trie manifest"):
        Trie.load(tmp_path)


def saved_trie(tmp_path, monkeypatch, big_rows=1):
    monkeypatch.setattr(trie_module, "BIG_NODE_ROWS", big_rows)
    codec = IdCodec(3, 16)
    codes = np.random.default_rng(2).integers(0, 16, (300, 3))
    codes[:100, 0] = 5
    trie = Trie.build(codec, codec.pack(codes), np.zeros(300, dtype=int))
    entries = trie.save(tmp_path)
    return trie, entries


def test_save_returns_the_manifest_entries(tmp_path, monkeypatch):
    trie, entries = saved_trie(tmp_path, monkeypatch)
    assert json.loads((tmp_path / "trie.json").read_text())["partitions"] == entries
    entry = entries[0]
    assert entry["num_nodes"] == len(trie.partitions[0].nodes) > 0
    assert set(entry["files"]) == {"ids", "items", "dense0", "dense1", "nodes", "children"}
    assert entry["files"]["ids"] == "image-00000.ids"
    part = read_partition(tmp_path, entry, trie.codec, mmap=False)
    assert np.array_equal(part.children, trie.partitions[0].children) and part.big_rows == 1


@pytest.mark.parametrize("role", ["ids", "items", "dense1", "nodes", "children"])
@pytest.mark.parametrize("change", [-1, 1])
def test_truncated_or_oversized_partition_file_is_a_clear_error(tmp_path, monkeypatch, role, change):
    _, entries = saved_trie(tmp_path, monkeypatch)
    path = tmp_path / entries[0]["files"][role]
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size + change)
    with pytest.raises(ValueError, match=rf"{path.name} has {size + change} bytes, expected {size}"):
        Trie.load(tmp_path)


def test_missing_partition_file_is_a_clear_error(tmp_path, monkeypatch):
    _, entries = saved_trie(tmp_path, monkeypatch)
    (tmp_path / entries[0]["files"]["nodes"]).unlink()
    with pytest.raises(FileNotFoundError, match="image-00000.nodes"):
        Trie.load(tmp_path)


def test_partition_saved_without_big_nodes_still_loads(tmp_path, monkeypatch):
    trie, entries = saved_trie(tmp_path, monkeypatch)
    for entry in entries:
        for role in ("nodes", "children"):
            (tmp_path / entry["files"].pop(role)).unlink()
        for key in ("num_nodes", "num_children", "big_node_rows"):
            del entry[key]
    trie_module.write_trie_manifest(tmp_path, trie.codec, entries)
    loaded = Trie.load(tmp_path)
    assert loaded.partitions[0].big_rows == NO_BIG_NODES and len(loaded.partitions[0].nodes) == 0
    assert enumerate_leaves(loaded) == enumerate_leaves(trie)


def test_dense_offsets_take_four_bytes_and_eight_byte_ones_still_load(tmp_path, monkeypatch):
    trie, entries = saved_trie(tmp_path, monkeypatch)
    part = trie.partitions[0]
    assert [t.dtype for t in part.dense] == [np.int32, np.int32] and entries[0]["dense_dtype"] == "<i4"
    assert Trie.load(tmp_path).partitions[0].dense[1].dtype == np.int32
    # A trie saved before 4-byte offsets: 8-byte dense files and no dense_dtype in the entry.
    for entry in entries:
        del entry["dense_dtype"]
        for l in range(entry["dense_levels"]):
            path = tmp_path / entry["files"][f"dense{l}"]
            np.fromfile(path, dtype="<i4").astype("<i8").tofile(path)
    trie_module.write_trie_manifest(tmp_path, trie.codec, entries)
    old = Trie.load(tmp_path)
    assert old.partitions[0].dense[1].dtype == np.int64
    assert enumerate_leaves(old) == enumerate_leaves(trie)
    entries[0]["dense_dtype"] = "<f8"
    trie_module.write_trie_manifest(tmp_path, trie.codec, entries)
    with pytest.raises(ValueError, match="dense_dtype must be <i4 or <i8, got '<f8'"):
        Trie.load(tmp_path)


def test_build_partition_refuses_unsorted_or_mismatched_input(tmp_path):
    codec = IdCodec(2, 8)
    ids = codec.pack(np.array([[1, 2], [1, 3], [4, 0]]))
    part = build_partition(codec, Modality.TEXT, 0, 8, ids, np.array([7, 3, 5]))
    assert part.items.dtype == np.uint32 and len(part) == 3
    with pytest.raises(ValueError, match="not sorted"):
        build_partition(codec, Modality.TEXT, 0, 8, ids[[0, 2, 1]], np.arange(3))
    tied = codec.pack(np.array([[1, 2], [1, 2]]))
    build_partition(codec, Modality.TEXT, 0, 8, tied, np.array([1, 2]))
    with pytest.raises(ValueError, match="rows 0 and 1"):
        build_partition(codec, Modality.TEXT, 0, 8, tied, np.array([2, 1]))  # ties must be by item number
    with pytest.raises(ValueError, match="shape"):
        build_partition(IdCodec(3, 8), Modality.TEXT, 0, 8, ids, np.arange(3))
    with pytest.raises(ValueError, match="outside"):
        build_partition(codec, Modality.TEXT, 2, 8, ids, np.arange(3))
    wide = build_partition(codec, Modality.TEXT, 0, 8, ids, np.array([0, 1, 2**33]))
    assert wide.items.dtype == np.uint64
    entry = write_partition(tmp_path, wide, codec)
    assert entry["item_dtype"] == "uint64" and entry["count"] == 3
    assert np.array_equal(read_partition(tmp_path, entry, codec).items, [0, 1, 2**33])


def test_sorted_check_sees_disorder_across_chunks():
    ids = np.arange(10, dtype=np.uint8)[:, None]
    trie_module._check_sorted(ids, np.zeros(10, dtype=int), chunk=3)
    for swap in range(9):
        bad = ids.copy()
        bad[[swap, swap + 1]] = bad[[swap + 1, swap]]
        with pytest.raises(ValueError, match=f"rows {swap} and {swap + 1}"):
            trie_module._check_sorted(bad, np.zeros(10, dtype=int), chunk=3)


def test_partition_without_big_nodes_writes_no_node_files(tmp_path):
    codec = IdCodec(3, 16)
    codes = np.random.default_rng(3).integers(0, 16, (300, 3))
    trie = Trie.build(codec, codec.pack(codes), np.zeros(300, dtype=int))
    entry = trie.save(tmp_path)[0]
    assert entry["num_nodes"] == 0 and entry["big_node_rows"] == trie.partitions[0].big_rows
    assert set(entry["files"]) == {"ids", "items", "dense0", "dense1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*entry["files"].values(), "trie.json"])
    loaded = Trie.load(tmp_path)
    assert loaded.partitions[0].big_rows == trie.partitions[0].big_rows
    assert enumerate_leaves(loaded) == enumerate_leaves(trie)


def test_a_big_range_without_a_node_is_refused(monkeypatch):
    monkeypatch.setattr(trie_module, "BIG_NODE_ROWS", 2)
    codec = IdCodec(3, 4)
    codes = np.array([[0, 1, 2]] * 3 + [[1, 2, 3]] * 7)
    trie = Trie.build(codec, codec.pack(codes), np.zeros(10, dtype=int))
    assert trie.expand(1, trie.root_children(np.array([0]), np.array([1]))).mask[0, 2]
    not_a_prefix = trie_module.TrieState(np.array([0]), np.array([0]), np.array([5]), np.array([0]))
    with pytest.raises(ValueError, match="has no node"):
        trie.expand(1, not_a_prefix)


def test_consecutive_item_numbers_are_not_stored(tmp_path):
    """A merged partition numbers its items in trie order: no items file, 12 bytes per ID."""
    from genius.idcodec import sort_order
    from genius.trie import ItemRange, build_partition, read_partition, write_partition

    codec = IdCodec(3, 16)
    ids = codec.pack(np.random.default_rng(4).integers(0, 16, (200, 3)))
    ids = ids[sort_order(ids)]
    part = build_partition(codec, Modality.TEXT, 0, 16, ids, np.arange(1000, 1200))
    assert isinstance(part.items, ItemRange) and part.nbytes == ids.nbytes + sum(t.nbytes for t in part.dense)
    entry = write_partition(tmp_path, part, codec)
    assert "items" not in entry["files"] and entry["items_start"] == 1000
    loaded = read_partition(tmp_path, entry, codec)
    assert np.array_equal(np.asarray(loaded.items), np.arange(1000, 1200))
    assert np.array_equal(loaded.items[5:9], [1005, 1006, 1007, 1008])
    assert np.array_equal(loaded.items[np.array([0, 199])], [1000, 1199])
    trie = Trie(codec, [loaded])
    assert {item for _, _, item in enumerate_leaves(trie)} == set(range(1000, 1200))
    gapped = build_partition(codec, Modality.TEXT, 0, 16, ids, np.arange(200) * 2)
    assert not isinstance(gapped.items, ItemRange)
