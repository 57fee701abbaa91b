"""add / delete / compact search exactly like an index rebuilt from the same items and model."""
import numpy as np
import pytest

from genius.index import GeniusIndex
from genius.items import Items
from genius.store.update import KeyConflictError

from tests.genius.store.conftest import same_results


def _rebuild(model: GeniusIndex, keys, embeddings, modality) -> GeniusIndex:
    """The same model indexing these items from scratch (what a full rebuild gives)."""
    codes = model.quantizer.encode(embeddings, modality).cpu().numpy()
    return GeniusIndex.from_codes(model.config, model.quantizer, model.decoder, codes, modality, keys, embeddings)


def _corpus(fitted):
    n = len(fitted)
    rows = np.arange(n)
    return fitted.items.keys(rows), fitted.vectors[rows].astype(np.float32), fitted.items.modality(rows)


@pytest.mark.parametrize("rerank", [False, True])
def test_add_then_delete_then_compact_equals_a_rebuild(fitted, synthetic, tmp_path, rerank):
    root = tmp_path / "idx"
    keys, emb, modality = _corpus(fitted)
    base = 250  # index the first 250 items, add the other 50 later
    _rebuild(fitted, keys[:base], emb[:base], modality[:base]).save(root)
    loaded = GeniusIndex.load(root)
    added = loaded.add(Items.from_embeddings(emb[base:], modality[base:], keys=keys[base:]))
    assert len(added) == 300 and added.path.name == "v-1"
    queries = synthetic.test_queries[:40]
    kwargs = dict(k=10, beam_size=20, rerank=rerank)
    same_results(added, _rebuild(fitted, keys, emb, modality), queries, **kwargs)

    gone = set(added.search(queries[:5], k=3).keys[0]) | {keys[0], keys[base + 1]}
    deleted = added.delete(sorted(gone))
    survivors = [i for i, k in enumerate(keys) if k not in gone]
    rebuilt = _rebuild(fitted, [keys[i] for i in survivors], emb[survivors], modality[survivors])
    assert len(deleted) == 300 - len(gone)
    same_results(deleted, rebuilt, queries, **kwargs)
    assert not gone & {k for row in deleted.search(queries, k=10).keys for k in row}

    compacted = deleted.compact()
    assert compacted.items.num_items == len(survivors) and len(compacted.deleted) == 0
    same_results(compacted, rebuilt, queries, **kwargs)
    result = compacted.search(queries, **kwargs)
    assert np.array_equal(result.items, rebuilt.search(queries, **kwargs).items), "compaction renumbers like a rebuild"


def test_target_modality_filter_uses_the_stored_modality(fitted, synthetic, tmp_path):
    from genius.modality import Modality
    root = tmp_path / "idx"
    fitted.save(root)
    index = GeniusIndex.load(root)
    for wanted in (Modality.IMAGE, Modality.IMAGE_TEXT):
        result = index.search(synthetic.test_queries[:10], k=5, target_modalities=[wanted])
        found = result.items[result.items >= 0]
        assert len(found) and (index.items.modality(found) == wanted).all()
        assert all(m == wanted for row in result.modalities for m in row)


def test_bad_updates_are_refused_and_publish_nothing(fitted, tmp_path):
    root = tmp_path / "idx"
    fitted.save(root)
    index = GeniusIndex.load(root)
    keys, emb, modality = _corpus(fitted)
    with pytest.raises(KeyConflictError, match="already in the index"):
        index.add(Items.from_embeddings(emb[:2], modality[:2], keys=keys[:2]))
    with pytest.raises(KeyConflictError, match="duplicate key 'x'"):
        index.add(Items.from_embeddings(emb[:2], modality[:2], keys=["x", "x"]))
    with pytest.raises(KeyConflictError, match="not in the index: 'nope'"):
        index.delete(["nope", keys[0]])
    with pytest.raises(ValueError, match="dim"):
        index.add(Items.from_embeddings(emb[:1, :5], modality[:1], keys=["new"]))
    assert index.root is not None and [p.name for p in root.iterdir() if p.name.startswith("v-")] == ["v-0"]
    with pytest.raises(ValueError, match="save"):
        fitted.__class__.from_codes(fitted.config, fitted.quantizer, fitted.decoder, fitted.item_codes(np.arange(3)),
                                    modality[:3], keys[:3], emb[:3]).delete([keys[0]])


def test_deleted_key_can_be_added_again(fitted, tmp_path):
    root = tmp_path / "idx"
    fitted.save(root)
    keys, emb, modality = _corpus(fitted)
    index = GeniusIndex.load(root).delete([keys[5]])
    again = index.add(Items.from_embeddings(emb[5:6], modality[5:6], keys=[keys[5]]))
    assert len(again) == 300 and again.items.find_keys([keys[5]]) == {keys[5]: [5, 300]}
