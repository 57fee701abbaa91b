"""bench/peers.py's parts on generated data: the full-pool split holds nothing out twice, chance
is what random rankings get, every peer beats chance, re-ranking and distractors behave, and
the report is written."""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import peers  # noqa: E402
import peers_data  # noqa: E402
import peers_methods  # noqa: E402
import peers_report  # noqa: E402
import peers_scale  # noqa: E402

from genius.index import IndexConfig  # noqa: E402
from genius.modality import Modality  # noqa: E402


def _clustered(rng: np.random.Generator, n: int, dim: int = 48, noise: float = 0.35) -> tuple[np.ndarray, np.ndarray]:
    """(items, a noisy query per item): queries are their item plus noise, unit norm."""
    items = rng.normal(size=(n, dim)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    queries = items + noise * rng.normal(size=items.shape).astype(np.float32) / np.sqrt(dim)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return items, queries


@pytest.fixture(scope="module")
def task() -> peers_data.PoolTask:
    rng = np.random.default_rng(0)
    items, queries = _clustered(rng, 3000)
    groups = [str(i) for i in range(len(items))]
    test, train = peers_data.held_out_split(groups, 100, rng)
    return peers_data.PoolTask("generated", Modality.TEXT, Modality.TEXT, items, queries[train], train, queries[test],
                               peers_data.relevance_by_group(groups, test), "own item", {})


def _recall(ranked: np.ndarray, task: peers_data.PoolTask, k: int = 10) -> float:
    return float(np.mean([np.isin(r[:k], rel).any() for r, rel in zip(ranked, task.relevance)]))


def test_held_out_split_keeps_test_groups_and_queries_out_of_training():
    groups = ["a", "a", "b", "c", "c", "c", "d", "e", "f", "g"]
    queries = ["q0", "q1", "q2", "q3", "q4", "q5", "q6", "q7", "q8", "q3"]  # row 9 repeats row 3's query
    for seed in range(20):
        test, train = peers_data.held_out_split(groups, 3, np.random.default_rng(seed), queries)
        test_groups = {groups[r] for r in test}
        assert len(test_groups) == 3, "one test query per held-out group"
        assert not test_groups & {groups[r] for r in train}
        assert not {queries[r] for r in test} & {queries[r] for r in train}
        if 3 in test:
            assert 9 not in train
    rel = peers_data.relevance_by_group(groups, np.array([4]))
    assert rel[0].tolist() == [3, 4, 5]
    with pytest.raises(ValueError, match="only 7 groups"):
        peers_data.held_out_split(groups, 8, np.random.default_rng(0))


def test_chance_recall_matches_random_rankings():
    rng = np.random.default_rng(1)
    n = 200
    relevance = [rng.choice(n, size=int(s), replace=False) for s in rng.integers(1, 6, size=40)]
    t = peers_data.PoolTask("r", Modality.TEXT, Modality.TEXT, np.zeros((n, 2), np.float32), np.zeros((0, 2)),
                            np.zeros(0, np.int64), np.zeros((40, 2)), relevance, "", {})
    trials = 1000  # the averaged recall's standard error is ~0.002 here, far inside the 0.01 margin
    hits = np.zeros(3)
    for _ in range(trials):
        perm = rng.permutation(n)
        for j, k in enumerate((1, 5, 10)):
            hits[j] += np.mean([np.isin(perm[:k], rel).any() for rel in relevance])
    for j, k in enumerate((1, 5, 10)):
        assert abs(hits[j] / trials - t.chance_recall(k)) < 0.01, k


def test_subset_keeps_every_relevant_row_and_remaps(task):
    sub = task.subset(500, seed=3)
    assert len(sub.pool) == 500
    for old, new in zip(task.relevance, sub.relevance):
        assert (new >= 0).all()
        np.testing.assert_array_equal(sub.pool[new], task.pool[old])
    assert len(sub.train_targets) == len(sub.train_queries) > 0
    assert sub.train_targets.max() < 500
    # a training pair survives exactly when its target is in the sub-pool
    kept_targets = {tuple(v) for v in sub.pool[sub.train_targets].round(5)}
    assert kept_targets <= {tuple(v) for v in task.pool.round(5)}
    with pytest.raises(ValueError, match="cannot hold"):
        task.subset(50)


def test_every_faiss_peer_beats_chance_and_reranking_recovers_exact(task, monkeypatch):
    # RQ8x12's eight 4096-code k-means take minutes on 2 cores; 8 x 6 bits exercise the same path.
    monkeypatch.setattr(peers_methods, "RQ_BITS", 6)
    chance = task.chance_recall(10)
    flat = peers_methods.build_faiss("flat", task.pool, task.pool)
    exact = _recall(flat.search(task.test_queries, 10), task)
    assert exact > 0.9, "the generated task is solvable by exact search"
    for name in ("pq12", "opq12", "ivfpq", "rq8x12"):
        built = peers_methods.build_faiss(name, task.pool, task.pool if name != "rq8x12" else
                                          np.tile(task.pool, (2, 1)), nprobe=8)
        r = _recall(built.search(task.test_queries, 10), task)
        assert r > 10 * chance + 0.1, (name, r, chance)
        rr = peers_methods.with_rerank(built, task.pool.astype(np.float16))
        r_rr = _recall(rr.search(task.test_queries, 10), task)
        assert r_rr >= r - 0.02, (name, r, r_rr)
        assert rr.bytes_per_item == built.bytes_per_item + 2 * task.pool.shape[1]
    assert peers_methods.build_faiss("ivfpq", task.pool, task.pool).info["nlist"] == peers_methods.ivf_lists(3000)


def test_faiss_training_is_shared_across_pool_sizes_except_ivf(task):
    trained: dict = {}
    first = peers_methods.build_faiss("pq12", task.pool, task.pool, trained=trained)
    again = peers_methods.build_faiss("pq12", task.pool[:1000], task.pool, trained=trained)
    assert not first.info["training_reused"] and again.info["training_reused"]
    np.testing.assert_array_equal(again.search(task.pool[:5], 1)[:, 0], first.search(task.pool[:5], 1)[:, 0])
    assert again.search(task.pool[:50], 10).max() < 1000, "the reused index holds only the smaller pool"
    small = task.pool[:800]  # IVF's list count follows the pool size: it always retrains
    peers_methods.build_faiss("ivfpq", small, small, trained=trained)
    assert not peers_methods.build_faiss("ivfpq", small[:400], small, trained=trained).info["training_reused"]


def test_genius_peer_returns_pool_rows_and_rescores_a_small_share(task, tmp_path):
    cfg = IndexConfig.for_corpus(len(task.pool))
    cfg.quantizer = replace(cfg.quantizer, epochs=10)
    cfg.decoder_training = replace(cfg.decoder_training, epochs=8)
    fit_args = (task.pool, task.pool_modality, task.train_queries, task.train_targets, int(Modality.TEXT), cfg)
    plain, reranked, index = peers_methods.build_genius(*fit_args, beam=10, saved=tmp_path / "fit")
    # a second run loads the saved fit (memory-mapped) and ranks identically
    again, _, loaded = peers_methods.build_genius(*fit_args, beam=10, saved=tmp_path / "fit")
    assert again.build_s == plain.build_s and loaded.root is not None
    np.testing.assert_array_equal(again.search(task.test_queries[:20], 10), plain.search(task.test_queries[:20], 10))
    ranked = plain.search(task.test_queries, 10)
    assert ranked.shape == (len(task.test_queries), 10)
    assert ranked.max() < len(task.pool)
    chance = task.chance_recall(10)
    r_plain, r_rr = _recall(ranked, task), _recall(reranked.search(task.test_queries, 10), task)
    assert r_plain > 10 * chance, (r_plain, chance)
    assert r_rr >= r_plain - 0.02
    # the beam holds 10 IDs: at most the items carrying them were re-scored
    most = max(len(np.flatnonzero((index.item_codes(np.arange(len(index))) == c).all(axis=1)))
               for c in index.item_codes(np.arange(len(index))))
    assert reranked.pool_share_rescored() * len(task.pool) <= 10 * most
    # the codebook-scored ablation searches the same model and names its rows
    cb_plain, cb_reranked = peers_methods.genius_methods(index, 10, plain.build_s, 30.0, "_cb30")
    assert (cb_plain.name, cb_reranked.name) == ("genius_cb30", "genius_r_cb30")
    assert cb_plain.info["codebook_weight"] == 30.0 and plain.info["codebook_weight"] == index.beam_settings().codebook_weight
    assert _recall(cb_plain.search(task.test_queries, 10), task) > 10 * chance
    # so does the widened-beam ablation; a beam as wide as every prefix finds no less than beam 10
    widths = [len(index)] * (index.quantizer.num_levels - 1)
    lw_plain, lw_reranked = peers_methods.genius_methods(index, 10, plain.build_s, suffix="_lwall", level_widths=widths)
    assert (lw_plain.name, lw_reranked.name) == ("genius_lwall", "genius_r_lwall")
    assert lw_plain.info["level_widths"] == widths and plain.info["level_widths"] == cfg.level_widths
    assert _recall(lw_reranked.search(task.test_queries, 10), task) >= r_rr - 0.02
    # the every-step ablation runs the decoder where the trie forces the codes: the same ranking
    every, _ = peers_methods.genius_methods(index, 10, plain.build_s, suffix="_every_step", skip_forced=False)
    assert every.name == "genius_every_step" and every.info["skip_forced"] is False
    np.testing.assert_array_equal(every.search(task.test_queries, 10), ranked)
    # the level-normalised ablation returns pool rows above chance, scored otherwise
    level, _ = peers_methods.genius_methods(index, 10, plain.build_s, suffix="_levelnorm", normalize="level")
    assert level.name == "genius_levelnorm" and level.info["normalize"] == "level"
    level_ranked = level.search(task.test_queries, 10)
    assert level_ranked.max() < len(task.pool) and _recall(level_ranked, task) > 10 * chance
    assert index.beam_settings(normalize="level").normalize == "level" and index.beam_settings().normalize == "allowed"
    assert peers.parse_args(["--level-normalized-rows"]).level_normalized_rows


def test_level_widths_rows_parse_as_comma_separated_integers():
    args = peers.parse_args(["--level-widths", "64", "32", "--level-widths-rows", "256,400,200", "",
                             "--lookahead-rows", "2", "--lookahead-rows-rows", "4", "16"])
    assert args.level_widths == [64, 32] and args.level_widths_rows == [[256, 400, 200], []]
    assert args.lookahead_rows == 2 and args.lookahead_rows_rows == [4, 16]
    cfg = peers.genius_config(100_000, args)
    assert (cfg.level_widths, cfg.lookahead_rows) == ([64, 32], 2)
    defaults = peers.genius_config(100_000, peers.parse_args([]))  # the library's defaults
    assert (defaults.level_widths, defaults.lookahead_rows) == (IndexConfig.for_corpus(100_000).level_widths,
                                                                IndexConfig().lookahead_rows)
    with pytest.raises(SystemExit):
        peers.parse_args(["--level-widths-rows", "256,x"])


def test_distractors_share_a_real_prefix_and_stay_near_their_item():
    rng = np.random.default_rng(0)
    codes = np.concatenate([np.full((50, 1), 1), rng.integers(0, 16, size=(50, 4))], axis=1)
    vectors = rng.normal(size=(50, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    all_codes, all_vecs, base = peers_scale.corpus_of_size(400, codes, vectors, 16, seed=0)
    assert all_codes.shape == (400, 5) and all_vecs.dtype == np.float16
    np.testing.assert_array_equal(all_codes[:50], codes)
    extra = all_codes[50:]
    assert (extra[:, :2] == codes[base[50:], :2]).all(), "modality code and first semantic code are kept"
    assert extra.min() >= 0 and extra[:, 1:].max() < 16
    cos = (all_vecs[50:].astype(np.float32) * vectors[base[50:]]).sum(axis=1)
    assert cos.min() > 0.9
    small, _, rows = peers_scale.corpus_of_size(20, codes, vectors, 16, seed=0)
    np.testing.assert_array_equal(small, codes[rows])


def test_report_writes_json_markdown_and_plots(tmp_path, task):
    row = {"r1": 0.5, "r5": 0.7, "r10": 0.8, "qps_single": 100.0, "qps_batch": 900.0, "cpu_ms_single": 1.0,
           "cpu_ms_batch": 0.2, "bytes_per_item": 12.0, "build_s": 1.0}
    results = {
        "meta": {"command": "python bench/peers.py", "created": "now", "machine": "test", "threads": 1, "torch": "t",
                 "faiss": "f", "beam": 50, "batch": 32, "single_queries": 10, "nprobe": 8, "rerank_depth": 100,
                 "total_s": 1.0},
        "tasks": {"generated": {"summary": task.summary(), "methods": {
            "flat": row, "pq12": {**row, "r5": 0.35}, "genius_r": {**row, "pool_share_rescored": 0.001}},
            "paired": {name: {"pq12": {f"r{k}": {"diff": 0.35, "ci95": [0.3, 0.4], "wins": 35, "losses": 0}
                                       for k in (1, 5, 10)}} for name in ("genius_r", "genius_r_cb3")},
            "paired_from": {"flat": "a_hits.npz", "pq12": "a_hits.npz"}}},
        "curve": [{"n": n, "method": m, "r1": 0.1, "r5": 0.2, "r10": 0.3} for n in (2000, 10000) for m in ("flat", "genius")],
        "scale": [{"n": n, "method": m, "ms_per_query": n / 1e4} for n in (10**4, 10**5) for m in ("flat", "genius")],
        "skipped": {"fashion": "not installed"},
    }
    peers_report.write(results, tmp_path, "peers")
    assert json.loads((tmp_path / "peers.json").read_text())["tasks"]["generated"]["methods"]["pq12"]["r5"] == 0.35
    md = (tmp_path / "peers.md").read_text()
    assert "| pq12 | 0.500 | 0.350 | 0.800 | 0.50 |" in md
    assert "0.100 %" in md and "fashion: not installed" in md
    assert "| genius_r | 5 | **+0.350 [+0.300, +0.400] (35/0)** |" in md
    assert "flat, pq12 from `a_hits.npz`" in md
    for plot in ("peers_recall_qps.png", "peers_curve.png", "peers_scale.png"):
        assert (tmp_path / plot).stat().st_size > 5000
    acc = json.loads((tmp_path / "accuracy.json").read_text())["tasks"]["generated"]
    assert acc["variants"] == {"genius_r": {"r1": 0.5, "r5": 0.7, "r10": 0.8, "pool_share_rescored": 0.001}}
    assert set(acc["faiss"]) == {"flat", "pq12"}
    assert list(acc["paired"]) == ["genius_r"] and acc["paired"]["genius_r"]["pq12"]["r5"]["diff"] == 0.35
    # a GENIUS-only run on the same split joins accuracy.json under its name ...
    other = {"meta": {"command": "python bench/peers.py --levels 12", "created": "later"},
             "tasks": {"generated": {"summary": task.summary(), "methods": {
                 "genius": {**row, "r5": 0.75, "fit_config": {"levels": 12}, "beam": 50, "level_widths": [8]}}}}}
    peers_report.main([str(tmp_path / "peers.json"), "--also", str(_write(tmp_path / "deep.json", other))])
    acc = json.loads((tmp_path / "accuracy.json").read_text())
    assert acc["tasks"]["generated"]["variants"]["deep/genius"]["r5"] == 0.75
    assert acc["runs"]["deep"]["fit_config"] == {"levels": 12} and acc["runs"]["deep"]["level_widths"] == [8]
    # ... a run of a task the base run did not measure joins with its faiss rows ...
    elsewhere = {"meta": {"command": "python bench/peers.py --tasks openclipart", "created": "later"},
                 "tasks": {"openclipart/text->image": {"summary": {**task.summary(), "pool": 7}, "methods": {
                     "genius": {**row, "r5": 0.25}, "flat": {**row, "r5": 0.3}},
                     "paired": {"genius": {"flat": {"r5": {"diff": -0.05, "ci95": [-0.1, 0.0], "wins": 0,
                                                          "losses": 5}}}}}}}
    joined = peers_report.accuracy(results, {"oc": elsewhere, "deep": other})["tasks"]["openclipart/text->image"]
    assert joined["pool"] == 7 and joined["variants"]["oc/genius"]["r5"] == 0.25
    assert joined["faiss"]["flat"]["r5"] == 0.3 and joined["paired"]["oc/genius"]["flat"]["r5"]["losses"] == 5
    # ... and one of another split is refused
    other["tasks"]["generated"]["summary"] = {**task.summary(), "seed": 99}
    with pytest.raises(ValueError, match="same split"):
        peers_report.accuracy(results, {"odd": other})
    # the latency curve of a separate run joins the base results, its command named
    curve = {"meta": {"command": "python bench/peers.py --scale 1e4"}, "scale": [
        {"n": 10**4, "method": "genius", "ms_per_query": 80.0}, {"n": 10**4, "method": "flat", "ms_per_query": 1.0}]}
    peers_report.main([str(tmp_path / "peers.json"), "--scale-from", str(_write(tmp_path / "curve.json", curve))])
    merged = json.loads((tmp_path / "peers.json").read_text())
    assert merged["scale"] == curve["scale"] and merged["meta"]["scale_command"] == "python bench/peers.py --scale 1e4"
    assert "From a separate run: `python bench/peers.py --scale 1e4`" in (tmp_path / "peers.md").read_text()


def _write(path: Path, obj: dict) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def test_peers_command_help_names_every_option():
    import subprocess

    out = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[2] / "bench" / "peers.py"), "--help"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    for option in ("--tasks", "--curve", "--scale", "--beam", "--decoder-epochs", "--cache"):
        assert option in out


def test_a_curve_only_run_parses_and_reports_without_full_pool_rows(tmp_path):
    import peers

    assert peers.parse_args(["--tasks", "wordnet", "--curve-only"]).curve_only
    assert not peers.parse_args([]).curve_only
    results = {
        "meta": {"command": "python bench/peers.py --curve-only", "created": "now", "machine": "test", "threads": 1,
                 "torch": "t", "faiss": "f", "beam": 50, "batch": 32, "single_queries": 10, "nprobe": 8,
                 "rerank_depth": 100, "total_s": 1.0},
        "tasks": {}, "skipped": {}, "scale": [],
        "curve": [{"n": n, "method": m, "r1": 0.1, "r5": 0.2, "r10": 0.3} for n in (2000, 10000)
                  for m in ("flat", "genius")],
    }
    peers_report.write(results, tmp_path, "curve-only")
    assert json.loads((tmp_path / "curve-only.json").read_text())["curve"] == results["curve"]
    assert (tmp_path / "curve-only_curve.png").stat().st_size > 5000
