"""The GPU benchmark script runs end to end on CPU with the tiny model (its dry run)."""
from __future__ import annotations

import json
import subprocess

from conftest import ROOT


def test_structured_bench_measures_compile_and_masks(tiny) -> None:
    from bench import structured_bench

    times = structured_bench.compile_times(tiny.tokenizer)
    assert times["vocab"] == len(tiny.tokenizer)
    assert times["compile_cold_ms"] > times["compile_cached_ms"] > 0
    assert times["mask_p50_us"] > 0
    engines = {e["engine"]: e for e in structured_bench.compare_engines(tiny.tokenizer)}
    assert engines["llguidance"]["installed"] and engines["llguidance"]["mask_p50_us"] > 0


def test_gpu_script_dry_run_on_cpu(tmp_path, tiny_dir) -> None:
    run = subprocess.run([str(ROOT / "bench" / "gpu.sh"), "--device", "cpu", "--tiny",
                          "--tokens", "16", "--batches", "1,4", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ,
                              "EAGLE_CACHE_DIR": str(tiny_dir.parent)})
    assert run.returncode == 0, run.stderr
    assert "TTFT, one 13-tile image" in run.stdout and "plain transformers generate()" in run.stdout
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert data["ttft_13_tiles"]["prompt_tokens"] > 13 * 256
    assert [b["batch"] for b in data["batches"]] == [1, 4]
    assert all(b["aggregate_tokens_per_s"] > 0 for b in data["batches"])
    assert data["generate_tokens_per_s"] > 0
    # the dry run decodes through the static steps a GPU captures as CUDA graphs, and once
    # without them for the comparison row
    assert "the same engine without CUDA graphs: batch 1" in run.stdout
    assert data["graphs"] == {"captured": 0, "replayed": 0}
    assert data["eager_without_graphs"]["batch"] == 1
