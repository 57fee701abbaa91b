"""bench/peers_paired.py and peers.py's saved hits: per-query hits agree with recall, the paired
bootstrap finds a real difference and not an absent one, and runs pair only on the same queries."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import peers  # noqa: E402
import peers_paired  # noqa: E402


def test_hits_agree_with_recall_at_every_k():
    rng = np.random.default_rng(0)
    ranked = rng.integers(0, 40, size=(300, 10))
    ranked[::7, 6:] = -1  # fewer than 10 found
    relevance = [rng.choice(40, size=int(rng.integers(1, 4)), replace=False) for _ in range(300)]
    hits = peers_paired.hits(ranked, relevance, (1, 5, 10))
    short = peers_paired.hits(ranked[:, :3], relevance, (1, 5, 10))  # rankings shorter than the largest k
    assert (short[:, 1] == short[:, 2]).all()
    assert short[:, 2].mean() == pytest.approx(peers.recall(ranked, relevance, 3))
    assert hits.shape == (300, 3) and hits.dtype == bool
    for i, k in enumerate((1, 5, 10)):
        assert hits[:, i].mean() == pytest.approx(peers.recall(ranked, relevance, k))
    assert (hits[:, 0] <= hits[:, 1]).all() and (hits[:, 1] <= hits[:, 2]).all()


def test_a_real_difference_is_found_and_an_absent_one_is_not():
    rng = np.random.default_rng(1)
    theirs = rng.random(1000) < 0.3
    same = peers_paired.paired_difference(theirs, theirs)
    assert same == {"diff": 0.0, "ci95": [0.0, 0.0], "wins": 0, "losses": 0}
    better = theirs | (rng.random(1000) < 0.1)  # finds everything theirs does, and ~7 % more
    d = peers_paired.paired_difference(better, theirs)
    assert d["diff"] == pytest.approx(better.mean() - theirs.mean(), abs=1e-4)
    assert d["losses"] == 0 and d["wins"] == int((better & ~theirs).sum())
    assert peers_paired.significance(d) == "above" and d["ci95"][0] <= d["diff"] <= d["ci95"][1]
    assert peers_paired.significance(peers_paired.paired_difference(theirs, better)) == "below"
    # two methods that each find 20 queries the other misses: no difference to find
    swapped = theirs.copy()
    swapped[np.flatnonzero(theirs)[:20]] = False
    swapped[np.flatnonzero(~theirs)[:20]] = True
    tie = peers_paired.paired_difference(swapped, theirs)
    assert tie["diff"] == 0.0 and (tie["wins"], tie["losses"]) == (20, 20)
    assert peers_paired.significance(tie) == "tie"
    # seeded: the same interval twice
    assert peers_paired.paired_difference(swapped, theirs, seed=3) == peers_paired.paired_difference(swapped, theirs,
                                                                                                      seed=3)
    with pytest.raises(ValueError, match="same queries"):
        peers_paired.paired_difference(theirs, theirs[:10])


def test_compare_pairs_every_genius_row_with_every_peer_that_ran_and_renders_a_table():
    rng = np.random.default_rng(2)
    base = rng.random((500, 3)) < 0.4
    base = np.maximum.accumulate(base, axis=1)
    method_hits = {"flat": base, "rq8x12": base & (rng.random((500, 3)) < 0.8), "genius": base,
                   "genius_r": base, "pq12_rr100": base}
    paired = peers_paired.compare(method_hits, resamples=200)
    assert set(paired) == {"genius", "genius_r"}
    assert list(paired["genius"]) == ["flat", "rq8x12"]  # PEERS' order; re-ranked faiss rows are not peers
    assert paired["genius"]["flat"]["r5"]["diff"] == 0.0
    assert peers_paired.significance(paired["genius"]["rq8x12"]["r10"]) == "above"
    lines = peers_paired.markdown(paired)
    table = [line for line in lines if line.startswith("| genius")]
    assert len(table) == 4  # genius and genius_r at k = 5 and 10
    assert table[0].startswith("| genius | 5 | +0.000 [+0.000, +0.000] (0/0) | **+")
    assert peers_paired.markdown({}) == []


def test_saved_hits_round_trip_and_pair_only_on_the_same_queries(tmp_path, caplog):
    task = SimpleNamespace(test_queries=np.arange(12, dtype=np.float32).reshape(4, 3))
    digest = peers.queries_digest(task)
    name = "openclipart/text->image"  # names hold / and >
    saved = {f"{name}::flat": np.ones((4, 3), bool), f"{name}::rq8x12": np.zeros((4, 3), bool),
             f"{name}::{peers_paired.QUERIES_KEY}": digest}
    path = tmp_path / "run_hits.npz"
    peers_paired.save_hits(saved, path)
    loaded = peers_paired.load_hits(path)
    assert set(loaded) == set(saved) and (loaded[f"{name}::flat"] == saved[f"{name}::flat"]).all()
    # this run measured flat itself: only rq8x12 joins from the saved run
    joined = peers.peers_from_runs(name, digest, {"flat": np.zeros((4, 3), bool)}, [(str(path), loaded)])
    assert list(joined) == ["rq8x12"] and joined["rq8x12"][0] == str(path)
    # other queries (another seed): nothing joins, and the log says why
    other = peers.queries_digest(SimpleNamespace(test_queries=task.test_queries + 1))
    with caplog.at_level(logging.WARNING):
        assert peers.peers_from_runs(name, other, {}, [(str(path), loaded)]) == {}
    assert "other queries" in caplog.text
    # a GENIUS-only run on the same queries: paired with the saved run's faiss rows, its own hits recorded
    task.name = name
    run_hits: dict[str, np.ndarray] = {}
    genius = np.array([[True, True, True], [False, True, True], [False, False, True], [False, False, False]])
    record = peers.paired_record(task, {"genius": genius}, [(str(path), loaded)], run_hits, seed=0)
    assert record["paired_from"] == {"flat": str(path), "rq8x12": str(path)}
    assert record["paired"]["genius"]["rq8x12"]["r10"]["wins"] == 3
    assert record["paired"]["genius"]["flat"]["r1"]["losses"] == 3
    assert set(run_hits) == {f"{name}::genius", f"{name}::{peers_paired.QUERIES_KEY}"}
    args = peers.parse_args(["--pair-with", str(path), "--genius-index", str(tmp_path)])
    assert args.pair_with == [path]
    # the run's record names them as text (a list of paths once failed to serialise)
    assert json.loads(json.dumps(peers.meta(args)))["options"]["pair_with"] == [str(path)]


def test_two_runs_pair_on_the_tasks_and_rows_both_measured(tmp_path, capsys):
    key = peers_paired.QUERIES_KEY
    same, other = np.arange(32, dtype=np.uint8), np.ones(32, np.uint8)
    hit = np.ones((50, 3), bool)
    miss = np.zeros((50, 3), bool)
    ours = {f"wordnet::{key}": same, "wordnet::genius": hit, "wordnet::genius_r": hit,
            f"fashion::{key}": other, "fashion::genius": hit}
    theirs = {f"wordnet::{key}": same, "wordnet::genius": miss,
              f"fashion::{key}": same, "fashion::genius": miss}
    result = peers_paired.compare_runs(ours, theirs, ["genius", "genius_r"])
    assert list(result) == ["wordnet::genius"]  # genius_r only in ours; fashion on other queries
    assert result["wordnet::genius"]["r5"] == {"diff": 1.0, "ci95": [1.0, 1.0], "wins": 50, "losses": 0}
    np.savez(tmp_path / "a.npz", **ours)
    np.savez(tmp_path / "b.npz", **theirs)
    assert peers_paired.main([str(tmp_path / "a.npz"), str(tmp_path / "b.npz")]) == 0
    assert "| wordnet::genius | +1.000 [+1.000, +1.000] (50/0)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no task"):
        peers_paired.main([str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--rows", "flat"])
    # rows of one run against another row of it: genius_r (all hits) against genius (all hits) ties
    within = peers_paired.compare_rows(ours, ["genius_r"], "genius")
    assert list(within) == ["wordnet::genius_r"] and within["wordnet::genius_r"]["r10"]["diff"] == 0.0
    assert peers_paired.main([str(tmp_path / "a.npz"), "--rows", "genius_r", "--against", "genius"]) == 0
    assert "| wordnet::genius_r | +0.000 [+0.000, +0.000] (0/0)" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # neither a second run nor --against
        peers_paired.main([str(tmp_path / "a.npz")])
