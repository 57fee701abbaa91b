"""Smoke test of bench/decode.py on a tiny config: both decoders agree, results are written."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "decode.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_decode", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_decode_bench_tiny(tmp_path):
    bench = _load_bench()
    threads = torch.get_num_threads()
    try:
        result = bench.main([
            "--decoder", "small", "--levels", "3", "--codebook-size", "16", "--num-ids", "500",
            "--queries", "3", "--batch", "3", "--beam", "8", "--embed-dim", "64", "--skip-sweep",
            "--threads", "1", "--out", str(tmp_path),
        ])
    finally:
        torch.set_num_threads(threads)

    agreement = result["agreement"]
    assert agreement["top_k"] == 8  # top-10 capped at the beam
    assert agreement["identical"] == agreement["queries"] == 3, agreement["mismatches"]
    assert agreement["max_abs_score_diff"] < 1e-4

    written = json.loads((tmp_path / "decode.json").read_text())
    assert {"config", "normalization", "machine", "load_average", "trie", "timing", "speedup", "agreement",
            "flops", "matmul", "floor"} <= written.keys()
    assert {"cpu_count", "torch_threads", "torch_version"} <= written["machine"].keys()
    assert written["machine"]["torch_threads"] == 1
    assert {"hf", "ours", "ours_sweep", "ours_best"} <= written["timing"].keys()
    assert len(written["timing"]["hf"]["batch_seconds"]) == 1
    for key in ("same_batch", "best_batch"):
        assert math.isfinite(written["speedup"][key]) and written["speedup"][key] > 0
    assert written["flops"]["ours"]["total"] < written["flops"]["hf"]["total"]
    assert written["matmul"]["rate_gflops"] > 0
    assert written["floor"]["ours_x_floor"] > 0
    assert written["agreement"]["identical_fraction"] == 1.0
    assert (tmp_path / "decode.md").read_text().startswith("# Decode benchmark")
