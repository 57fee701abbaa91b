"""bench/diagnose.py's measures on a small fitted index: the codes' exhaustive ceiling is the
brute-force ranking, beam survival only falls and bounds the beam's recall, code agreement
only falls with depth."""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import diagnose  # noqa: E402

from genius.index import GeniusIndex, IndexConfig  # noqa: E402
from genius.modality import Modality  # noqa: E402
from genius.synthetic import make_synthetic  # noqa: E402


@pytest.fixture(scope="module")
def fitted():
    data = make_synthetic(seed=1)
    cfg = IndexConfig.for_corpus(len(data.corpus))
    cfg.quantizer = replace(cfg.quantizer, epochs=6)
    cfg.decoder_training = replace(cfg.decoder_training, epochs=6)
    index = GeniusIndex.fit(data.corpus, data.train_queries, data.train_targets, cfg, progress=False)
    relevance = [np.array([t]) for t in data.test_targets]
    return index, data.test_queries[:60], relevance[:60]


def test_codes_ceiling_is_the_brute_force_ranking_by_reconstruction(fitted):
    index, queries, relevance = fitted
    got = diagnose.code_ceiling(index, queries, relevance)
    codes = torch.from_numpy(index.item_codes(np.arange(len(index))))
    with torch.no_grad():
        scores = (index.quantizer.project(queries) @ index.quantizer.decode(codes).T).numpy()
    top = np.argsort(-scores, axis=1)
    for k in (1, 5, 10):
        want = np.mean([np.isin(row[:k], rel).any() for row, rel in zip(top, relevance)])
        assert got[f"r{k}"] == pytest.approx(want, abs=1 / len(queries) + 1e-9), k
    assert got["r10"] > 10 * 10 / len(index), "the codes beat a random ranking"


def test_beam_survival_falls_and_bounds_the_beams_recall(fitted):
    index, queries, relevance = fitted
    targets = diagnose.relevant_codes(index, relevance)
    for weight in (0.0, diagnose.DOMINANT):
        survival = diagnose.beam_survival(index, queries, targets, 10, weight)
        assert len(survival) == index.quantizer.num_levels + 1
        assert all(b <= a for a, b in zip(survival, survival[1:]))
        recall = diagnose.genius_recall(index, queries, relevance, 10, weight)
        assert recall["r10"] <= survival[-1] + 1e-9
    agreement = diagnose.code_agreement(index, queries, int(Modality.TEXT), targets)
    assert len(agreement) == index.quantizer.num_levels
    assert all(b <= a for a, b in zip(agreement, agreement[1:]))


def test_rerank_ceiling_holds_more_with_depth_and_meets_flat_at_the_whole_pool(fitted):
    import peers_data

    index, queries, relevance = fitted
    pool = index.vectors[np.arange(len(index))].astype(np.float32)
    task = peers_data.PoolTask("synthetic", Modality.TEXT, Modality.TEXT, pool, queries[:0], np.zeros(0, np.int64),
                               queries, relevance, "the generated target")
    rows = diagnose.rerank_ceiling(index, task, (5, 50, 10 * len(pool)))
    assert [r["depth"] for r in rows] == [5, 50, len(pool)]  # depths beyond the pool are the pool
    holds = [r["holds_relevant"] for r in rows]
    assert holds == sorted(holds) and holds[-1] == 1.0
    for r in rows:
        assert r["r10"] <= r["holds_relevant"] + 1e-9
    assert {k: rows[-1][k] for k in ("r1", "r5", "r10")} == diagnose.flat_recall(task)


def test_options_make_the_fit_config_bench_peers_makes():
    import peers

    cfg = peers.genius_config(100_000, diagnose.parse_args(["--levels", "12", "--lookahead-rows", "2",
                                                           "--level-widths", "8", "4"]))
    assert (cfg.quantizer.num_levels, cfg.lookahead_rows, cfg.level_widths) == (12, 2, [8, 4])
    defaults = peers.genius_config(100_000, diagnose.parse_args([]))
    assert defaults.lookahead_rows == IndexConfig().lookahead_rows


def test_projection_ceiling_is_the_brute_force_ranking_by_projection(fitted):
    import peers_data

    index, queries, relevance = fitted
    pool = index.vectors[np.arange(len(index))].astype(np.float32)
    task = peers_data.PoolTask("generated", Modality.TEXT, Modality.TEXT, pool, queries[:0], np.zeros(0, np.int64),
                               queries, relevance, "the query's own target", {})
    got = diagnose.projection_ceiling(index, task)
    with torch.no_grad():
        scores = (index.quantizer.project(queries) @ index.quantizer.project(pool).T).numpy()
    top = np.argsort(-scores, axis=1)[:, :10]
    for k in (1, 5, 10):
        assert got[f"r{k}"] == pytest.approx(np.mean([np.isin(t[:k], rel).any() for t, rel in zip(top, relevance)]), abs=1e-4)
    assert got["r10"] > 10 * 10 / len(pool)  # far above chance


def test_the_task_options_reach_bench_peers_loader():
    args = diagnose.parse_args(["--task", "openclipart", "--direction", "1", "--stage1-epochs", "3", "--pool", "0"])
    assert (args.task, args.direction, args.stage1_epochs, args.pool, args.encoder) == ("openclipart", 1, 3, 0, None)
    assert diagnose.parse_args([]).task == "wordnet"
