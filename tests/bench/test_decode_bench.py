"""bench/decode.py on a tiny config: every method agrees and emits valid IDs, the vectorised HF
constraint matches the reference callback, and the recorded figures follow from the timings."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "decode.py"
QUERIES, REPEATS, SIZES, MAIN_BATCH = 4, 2, [1, 2], 2


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_decode", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load_bench()


@pytest.fixture(scope="module")
def run(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("decode")
    threads = torch.get_num_threads()
    try:
        result = bench.main([
            "--decoder", "small", "--levels", "3", "--codebook-size", "16", "--num-ids", "500",
            "--queries", str(QUERIES), "--batch", str(MAIN_BATCH), "--sweep", ",".join(map(str, SIZES)),
            "--repeats", str(REPEATS), "--lowp", "bf16,int8", "--beam", "8", "--embed-dim", "64",
            "--threads", "1", "--out", str(out),
        ])
    finally:
        torch.set_num_threads(threads)
    return result, json.loads((out / "decode.json").read_text()), (out / "decode.md").read_text()


def test_methods_agree_and_emit_valid_ids(run):
    result, written, _ = run
    methods = written["config"]["methods"]
    assert methods[:3] == ["hf", "hf_vectorised", "ours"]
    agreement = result["agreement"]
    assert agreement["top_k"] == 8  # top-10 capped at the beam
    assert agreement["identical"] == agreement["queries"] == QUERIES, agreement["mismatches"]
    assert agreement["max_abs_score_diff"] < 1e-4
    # The vectorised processor constrains exactly like the per-beam callback: same IDs, same scores.
    vec = written["agreement_hf_vectorised"]
    assert vec["vs_hf"]["identical"] == QUERIES and vec["vs_hf"]["max_abs_score_diff"] < 1e-5
    assert vec["vs_ours"]["identical"] == QUERIES
    # Every method fills all top-k slots with IDs of the trie (the tiny trie has > 8 IDs per query).
    for name in methods:
        assert written["validity"][name] == {"emitted": QUERIES * 8, "valid": QUERIES * 8, "empty_slots": 0}, name
    # Skipping forced steps changes nothing; the decoder at every step runs all L + 1 of them.
    rows = written["decoder_rows"]
    assert rows["ours_vs_every_step"]["identical"] == QUERIES
    assert rows["ours_vs_every_step"]["max_abs_score_diff"] < 1e-5
    for b in SIZES:
        every, ours = rows["mean_per_query_and_step"]["ours_every_step"][str(b)], rows["mean_per_query_and_step"]["ours"][str(b)]
        assert every == pytest.approx(rows["beam_widths"])  # every live-or-not slot of the beam
        assert all(o <= e for o, e in zip(ours, every))
    assert written["flops"]["ours"]["total"] <= written["flops"]["ours_every_step"]["total"]
    # Batch size does not change what fp32 decoding returns.
    for name in ("hf", "hf_vectorised", "ours", "ours_every_step"):
        assert written["batch_consistency"][name] == {str(b): 1.0 for b in SIZES}


def test_vectorised_processor_masks_like_the_dict_trie(bench):
    """TrieLogitsProcessor allows, for every prefix, exactly the dict trie's next tokens."""
    rng = np.random.default_rng(0)
    K, L = 5, 3
    codes = rng.integers(0, K, (40, L))
    mods = rng.integers(0, 3, 40)
    root = bench.build_dict_trie(codes, mods, K)
    fn = bench.make_prefix_allowed_tokens_fn(root)
    vocab = 4 + L * K
    proc = bench.TrieLogitsProcessor(bench.TokenTrieTables(bench.id_tokens(codes, mods, K), vocab))
    tokens = bench.id_tokens(codes, mods, K)
    prefixes = [[0]] + [[0] + row[:d].tolist() for row in tokens for d in range(1, L + 2)]
    prefixes += [[0, 1, 4 + K - 1, 4 + K], [0, 2, 0]]  # not in the trie (or invalid): start token only
    for prefix in prefixes:
        ids = torch.tensor([prefix])
        scores = torch.randn(1, vocab)
        out = proc(ids, scores.clone())
        allowed = set(fn(0, ids[0]))
        finite = set(torch.isfinite(out[0]).nonzero().flatten().tolist())
        assert finite == allowed, prefix
        assert torch.equal(out[0, sorted(allowed)], scores[0, sorted(allowed)])


def test_timings_sweep_and_derived_figures(run):
    _, written, md = run
    config, timing, speedup = written["config"], written["timing"], written["speedup"]
    assert config["batch_sizes"] == SIZES and config["repeats"] == REPEATS
    assert written["machine"]["torch_threads"] == 1
    assert [e["batch"] for e in timing["sweep"]] == SIZES
    for entry in timing["sweep"]:
        calls = math.ceil(QUERIES / entry["batch"])
        assert set(entry["methods"]) == set(config["methods"])
        for name, m in entry["methods"].items():
            wall, cpu = m["wall_ms_per_query"], m["cpu_ms_per_query_spread"]
            assert len(wall["repeats"]) == len(cpu["repeats"]) == REPEATS
            assert m["ms_per_query"] == pytest.approx(float(np.median(wall["repeats"])))
            assert m["cpu_ms_per_query"] == pytest.approx(float(np.median(cpu["repeats"])))
            assert wall["min"] <= wall["q25"] <= wall["median"] <= wall["q75"] <= wall["max"]
            assert len(m["batch_seconds"]) == calls
        assert set(entry["speedup_vs_reference"]) == set(config["methods"]) - {"hf"}
    main = next(e for e in timing["sweep"] if e["batch"] == MAIN_BATCH)
    # Headline: per-repeat ratios of the reference's wall time over ours, at the same batch.
    hf_ms = main["methods"]["hf"]["wall_ms_per_query"]["repeats"]
    ours_ms = main["methods"]["ours"]["wall_ms_per_query"]["repeats"]
    assert written["speedup_repeats"] == pytest.approx([h / o for h, o in zip(hf_ms, ours_ms)])
    assert speedup["same_batch"] == pytest.approx(float(np.median(written["speedup_repeats"])))
    hf_cpu = main["methods"]["hf"]["cpu_ms_per_query_spread"]["repeats"]
    ours_cpu = main["methods"]["ours"]["cpu_ms_per_query_spread"]["repeats"]
    assert written["speedup_cpu_same_batch"] == pytest.approx(
        float(np.median([h / o for h, o in zip(hf_cpu, ours_cpu)])))
    assert speedup["same_batch_cpu_time"] == written["speedup_cpu_same_batch"]
    assert speedup["by_batch"].keys() == {str(b) for b in SIZES}
    # Legacy fields keep their meaning.
    assert timing["hf"]["ms_per_query"] == main["methods"]["hf"]["ms_per_query"]
    assert timing["ours"]["ms_per_query"] == main["methods"]["ours"]["ms_per_query"]
    assert [s["batch"] for s in timing["ours_sweep"]] == SIZES
    assert timing["ours_best"]["ms_per_query"] == min(s["ms_per_query"] for s in timing["ours_sweep"])
    assert speedup["best_batch"] == pytest.approx(timing["hf"]["ms_per_query"] / timing["ours_best"]["ms_per_query"])
    # Floor = FLOPs over the best measured matmul rate.
    matmul, floor, flops = written["matmul"], written["floor"], written["flops"]
    assert flops["ours"]["total"] < flops["hf"]["total"]
    assert matmul["rate_gflops"] == max(matmul["by_shape_gflops"].values())
    assert floor["ours_floor_ms_per_query"] == pytest.approx(1000 * flops["ours"]["total"] / 1e9 / matmul["rate_gflops"])
    assert floor["ours_x_floor"] == pytest.approx(timing["ours"]["ms_per_query"] / floor["ours_floor_ms_per_query"])
    for key in ("config", "normalization", "machine", "load_average", "trie", "timing", "speedup", "agreement",
                "flops", "matmul", "floor"):
        assert key in written
    assert md.startswith("# Decode benchmark")
    for b in SIZES:
        assert f"Batch {b}:" in md
    assert "## Low precision" in md


def test_low_precision_variants(run):
    _, written, md = run
    variants = written["lowp"]["variants"]
    assert set(variants) == {"bf16", "int8"}
    ran = [v for v, info in variants.items() if info["supported"]]
    for v, info in variants.items():
        if not info["supported"]:
            assert info["support"] and f"ours_{v}" not in written["config"]["methods"]
            continue
        assert f"ours_{v}" in written["config"]["methods"]
        ag = info["agreement"]
        assert ag["queries"] == QUERIES and ag["top_k"] == 8
        assert info["top10_identical"] == ag["identical"] / QUERIES
        assert info["top10_agreement"] == ag["overlap_at_k_mean"]
        assert ag["identical"] + len(ag["mismatches"]) == QUERIES
        assert ag["identical"] <= ag["same_set"]
        assert info["top10_agreement"] >= ag["identical"] / QUERIES  # identical lists overlap fully
        assert set(info["speedup_vs_reference_by_batch"]) == {str(b) for b in written["config"]["batch_sizes"]}
        assert written["validity"][f"ours_{v}"]["valid"] == written["validity"][f"ours_{v}"]["emitted"]
        main = next(e for e in written["timing"]["sweep"] if e["batch"] == MAIN_BATCH)
        assert info["speedup_vs_ours_fp32"] == main["speedup_vs_ours_fp32"][f"ours_{v}"]
        assert f"| {v} |" in md
    if not ran:
        pytest.skip("no low-precision variant runs on this machine")
    # The headline low-precision figures belong to the recorded variant.
    chosen = written["lowp_variant"]
    assert chosen in ran
    assert written["lowp_top10_agreement"] == variants[chosen]["top10_agreement"]
    assert written["lowp_top10_identical"] == variants[chosen]["top10_identical"]
    assert written["lowp_speedup_by_batch"] == variants[chosen]["speedup_vs_reference_by_batch"]
    assert written["lowp_speedup"] == variants[chosen]["speedup_vs_reference"]["median"]
    assert written["lowp_meets_agreement_target"] == (variants[chosen]["top10_agreement"] >= 0.95)
    if not written["lowp_meets_agreement_target"]:  # then no variant reached the target
        assert all(variants[v]["top10_agreement"] < 0.95 for v in ran)


def test_a_briefly_trained_decoder_learns_its_pairs(bench):
    from genius.decoder import DecoderConfig, GeniusDecoder

    codes, mods = bench.make_codes(300, 3, 16, "all", 0, "skewed")
    decoder = GeniusDecoder(DecoderConfig.small(), 32, 3, 16)
    queries, info = bench.train_briefly(decoder, codes, mods, pairs=64, epochs=60, seed=0)
    assert queries.shape == (64, 32) and info["pairs"] == 64 and info["epochs"] == 60
    assert info["final_id_accuracy"] > 0.5, info  # chance: one ID in 300


def test_rerender_rewrites_the_derived_fields_from_the_recorded_measurements(bench, run, tmp_path):
    _, written, _ = run
    recorded = tmp_path / "recorded.json"
    stale = json.loads(json.dumps(written))
    for info in stale["lowp"]["variants"].values():  # as written before these fields existed
        info.pop("top10_identical", None), info.pop("speedup_vs_reference_by_batch", None)
    stale.pop("lowp_speedup_by_batch")
    recorded.write_text(json.dumps(stale))
    out = tmp_path / "out"
    again = bench.main(["--rerender", str(recorded), "--out", str(out)])
    rewritten = json.loads((out / "decode.json").read_text())
    assert "rerendered" in rewritten["config"] and (out / "decode.md").exists()
    for key in ("lowp_variant", "lowp_speedup", "lowp_top10_agreement", "lowp_top10_identical",
                "lowp_speedup_by_batch", "timing"):
        assert rewritten[key] == written[key] == again[key]
