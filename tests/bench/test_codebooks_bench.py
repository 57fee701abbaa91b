"""bench/codebooks.py on generated data: the codes' ceiling is the brute-force ranking by
reconstruction and beats chance, the refitted codebooks reconstruct better than the EMA ones,
faiss's residual quantizer runs at the same shape, and the report is written."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import codebooks  # noqa: E402
import peers  # noqa: E402
import peers_data  # noqa: E402

from genius.modality import Modality  # noqa: E402


@pytest.fixture(scope="module")
def task() -> peers_data.PoolTask:
    rng = np.random.default_rng(0)
    # Items with a decaying spectrum (as embeddings have); a query is its item plus noise.
    items = (rng.normal(size=(2000, 48)) * np.arange(1, 49) ** -0.5).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    queries = items + 0.3 * rng.normal(size=items.shape).astype(np.float32) / np.sqrt(48)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    groups = [str(i) for i in range(len(items))]
    test, train = peers_data.held_out_split(groups, 100, rng)
    return peers_data.PoolTask("generated", Modality.TEXT, Modality.TEXT, items, queries[train], train, queries[test],
                               peers_data.relevance_by_group(groups, test), "own item", {})


ARGS = argparse.Namespace(quantizer_batch=256, quantizer_epochs=3, seed=0, faiss_train=65536)


def test_ranked_recall_is_the_brute_force_ranking(task):
    scores = task.test_queries @ task.pool.T
    got = peers.ranked_recall(lambda q: q @ task.pool.T, task.test_queries, task.relevance, chunk=7)
    top = np.argsort(-scores, axis=1)
    for k in (1, 5, 10):
        assert got[f"r{k}"] == pytest.approx(np.mean([np.isin(r[:k], rel).any() for r, rel in zip(top, task.relevance)]))


def test_refitted_codes_beat_chance_and_reconstruct_better_than_the_ema_codebooks(task):
    rows = {v: codebooks.genius_codes(task, 3, 32, v, ARGS) for v in ("plain", "refit")}
    chance = task.chance_recall(10)
    for row in rows.values():
        assert row["bits"] == 15 and row["levels"] == 3
        assert row["r10"] > chance + 0.1, row
    assert rows["refit"]["mse"] < rows["plain"]["mse"]
    rq = codebooks.faiss_rq(task, 3, 32, ARGS)
    assert rq["bits"] == 15 and rq["r10"] > chance + 0.1
    text = codebooks.markdown({"command": "x", "task": task.summary(), "flat": rows["refit"]["projected_flat"],
                               "rows": [*rows.values(), rq]})
    assert text.count("| 3x32 |") == 3
