import numpy as np
import pytest

from genius.idcodec import IdCodec
from genius.modality import Modality
from genius.trie import Trie


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


@pytest.mark.parametrize("seed", range(12))
def test_expansion_reaches_exactly_the_indexed_items(seed, tmp_path):
    rng = np.random.default_rng(seed)
    levels, size, n = int(rng.integers(1, 5)), int(rng.choice([2, 5, 16, 64])), int(rng.integers(1, 400))
    codec = IdCodec(levels, size)
    codes, modality = random_corpus(rng, levels, size, n)
    trie = Trie.build(codec, codec.pack(codes), modality, ranges_per_modality=int(rng.integers(1, 4)))
    if seed % 2:
        trie.save(tmp_path)
        trie = Trie.load(tmp_path)
    expected = {(int(modality[i]), tuple(int(c) for c in codes[i]), i) for i in range(n)}
    assert enumerate_leaves(trie) == expected


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
