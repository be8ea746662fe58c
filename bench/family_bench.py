"""The Eagle family on the tiny models: Eagle2-9B's two-tower vision per tile against SigLIP
alone, and a 256-frame video prompt (Eagle2.5's sampler, ~70K tokens) prefilled in chunks
or at once, with the inter-token latency of streams running beside it."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from bench.common import pct, stamp_tokens, table
from service.engine.job import (
    ChatJob,
    ChatMessage,
    Delta,
    Role,
    SamplingParams,
    TextPart,
    VideoPart,
    VisionParams,
)
from service.engine.loader import load_model, resolve_model
from service.engine.scheduler import EngineSettings, NativeEngine
from tests import factory

STREAMS = 8


def vision_per_tile(tiles: int = 13, repeat: int = 5) -> list[dict]:
    rows = []
    for name in ("tiny", "tiny-mob"):
        lm = load_model(resolve_model(name), "cpu")
        pixels = torch.randn(tiles, 3, 448, 448)
        times = []
        with torch.inference_mode():
            lm.model.encode_tiles(pixels)
            for _ in range(repeat):
                start = time.perf_counter()
                lm.model.encode_tiles(pixels)
                times.append(time.perf_counter() - start)
        rows.append({"model": name, "tower": "SigLIP + ConvNeXt" if lm.cfg.mob else "SigLIP",
                     "ms_per_tile": statistics.median(times) * 1000 / tiles})
    return rows


def long_video(chunked=(True, False)) -> list[dict]:
    lm = load_model(resolve_model("tiny-2.5"), "cpu")
    clip = factory.video(None, seconds=128, fps=2)  # 256 frames: all of them at 2 fps
    rows = []
    for chunks in chunked:  # the device's default token budget, and one pass
        settings = EngineSettings() if chunks else EngineSettings(chunk_above=0)
        engine = NativeEngine(lm, settings, context_length=131072)
        try:
            rows.append({"token_budget": engine.token_budget if chunks else 0,
                         **_one(engine, clip)})
        finally:
            engine.drain(0)
    return rows


def _one(engine: NativeEngine, clip: bytes) -> dict:
    streams = [engine.submit(ChatJob(f"s{i}", (ChatMessage(Role.USER, (TextPart(
        f"stream {i}"),)),), SamplingParams(max_new_tokens=4000, ignore_eos=True,
                                             logprobs=True))) for i in range(STREAMS)]
    stamps, readers = stamp_tokens(streams)
    job = ChatJob("video", (ChatMessage(Role.USER, (VideoPart(data=clip),
                                                    TextPart("What happens?"))),),
                  SamplingParams(max_new_tokens=2, ignore_eos=True),
                  VisionParams(max_video_frames=256))
    start = time.monotonic()
    first = None
    for event in engine.submit(job):
        if first is None and isinstance(event, Delta):
            first = time.monotonic()
        done = event
    for s in streams:
        s.cancel()
    for r in readers:
        r.join(30)
    gaps = [b - a for ts in stamps for a, b in zip(ts, ts[1:]) if start <= a <= first]
    return {"prompt_tokens": done.usage.prompt_tokens, "frames": done.usage.video_frames,
            "ttft_s": first - start, "itl_p50_ms": pct(gaps, 0.5) * 1000,
            "itl_max_ms": max(gaps, default=first - start) * 1000,
            "tokens_during_prefill": min(sum(start <= t <= first for t in ts) for ts in stamps)}


def run(out: Path) -> tuple[str, dict]:
    record = {"vision": vision_per_tile(), "long_video": long_video()}
    text = table("Vision tower, 13 tiles, tiny shapes on CPU",
                 ["model", "tower", "ms per tile"],
                 [[r["model"], r["tower"], f"{r['ms_per_tile']:.1f}"] for r in record["vision"]])
    text += "\n" + table(
        f"256-frame video (Eagle2.5 sampler, tiny-2.5, context 128K) beside {STREAMS} running "
        f"streams", ["prefill", "prompt tokens", "TTFT s", "streams' ITL p50 / max ms during it",
                     "tokens each stream got meanwhile"],
        [[f"token budget {r['token_budget']}" if r["token_budget"] else "one pass",
          r["prompt_tokens"], f"{r['ttft_s']:.1f}",
          f"{r['itl_p50_ms']:.0f} / {r['itl_max_ms']:.0f}", r["tokens_during_prefill"]]
         for r in record["long_video"]])
    return text, record
