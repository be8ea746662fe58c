"""The engine's memory and scheduling (issue 18's `kv` section, so far its stall-free prefill
part): six short streams' inter-token latency alone and while one 26K-token prompt is
admitted, for several per-iteration token budgets, with that prompt's time to first token."""
from __future__ import annotations

import time
from pathlib import Path

from bench.common import pct, stamp_tokens, table
from service.engine.job import ChatJob, ChatMessage, Delta, Role, SamplingParams, TextPart
from service.engine.loader import load_model, resolve_model
from service.engine.scheduler import EngineSettings, NativeEngine

STREAMS = 6
LONG_TEXT = " ".join(f"word{i}" for i in range(4000))  # ~26,000 tokens of the tiny tokenizer
BUDGETS = (64, 128, 256, 512, 1024, 2048, 4096, 0)  # 0: the whole prompt in one pass


def _job(rid: str, text: str, tokens: int) -> ChatJob:
    return ChatJob(rid, (ChatMessage(Role.USER, (TextPart(text),)),),
                   SamplingParams(max_new_tokens=tokens, ignore_eos=True, logprobs=True))


def _one(engine: NativeEngine, alone_s: float = 1.5) -> dict:
    streams = [engine.submit(_job(f"s{i}", f"stream {i}", 20_000)) for i in range(STREAMS)]
    stamps, readers = stamp_tokens(streams)
    quiet = time.monotonic()
    time.sleep(alone_s)
    start = time.monotonic()
    first = None
    for event in engine.submit(_job("long", LONG_TEXT, 2)):
        if first is None and isinstance(event, Delta):
            first = time.monotonic()
        done = event
    for s in streams:
        s.cancel()
    for r in readers:
        r.join(30)

    def gaps(lo: float, hi: float, inside: bool) -> list[float]:
        """Gaps between a stream's tokens within [lo, hi], or overlapping it at all (a stall
        that began before the long prompt was submitted still counts against it)."""
        return [b - a for ts in stamps for a, b in zip(ts, ts[1:])
                if ((lo <= a and b <= hi) if inside else (a < hi and b > lo))]

    alone, during = gaps(quiet, start, True), gaps(start, first, False)
    return {"prompt_tokens": done.usage.prompt_tokens, "ttft_s": first - start,
            "itl_alone_p50_ms": pct(alone, 0.5) * 1000,
            "itl_during_p50_ms": pct(during, 0.5) * 1000,
            "itl_during_p99_ms": pct(during, 0.99) * 1000,
            "itl_during_max_ms": max(during, default=first - start) * 1000,
            "ratio_p50": pct(during, 0.5) / pct(alone, 0.5)}


def footprint(lm) -> dict:
    """KV bytes held with one 26K-token job beside fifteen short ones, against what their
    tokens need (the paged cache's target: <= 1.2x): today every row holds the longest row's
    capacity."""
    engine = NativeEngine(lm, EngineSettings(max_running=16))
    short = " ".join(f"word{i}" for i in range(3000, 3075))
    try:
        streams = [engine.submit(_job(f"s{i}", short, 20_000)) for i in range(15)]
        for stream in streams:
            next(iter(stream))
        long_stream = iter(engine.submit(_job("long", LONG_TEXT, 2000)))
        next(long_stream)  # the long job is in the batch
        slots = engine.decoder.slots
        per_token = 2 * len(slots.k) * slots.k[0].shape[1] * slots.k[0].shape[3] * \
            slots.k[0].element_size()
        held = sum(len(r.prep.ids) + r.generated for r in engine._running)
        result = {"kv_bytes": slots.nbytes(), "tokens_held": held, "bytes_per_token": per_token,
                  "ratio": slots.nbytes() / (held * per_token)}
        for stream in streams:
            stream.cancel()
        return result
    finally:
        engine.drain(0)


def run(out: Path) -> tuple[str, dict]:
    lm = load_model(resolve_model("tiny"), "cpu")
    held = footprint(lm)
    rows = []
    for budget in BUDGETS:
        settings = EngineSettings(token_budget=budget) if budget else \
            EngineSettings(chunk_above=0)
        engine = NativeEngine(lm, settings)
        try:
            rows.append({"token_budget": budget, **_one(engine)})
        finally:
            engine.drain(0)
    text = table(
        f"Stall-free prefill: {STREAMS} running streams while a "
        f"{rows[0]['prompt_tokens']:,}-token prompt is admitted (tiny model, CPU)",
        ["token budget", "long prompt TTFT s", "streams' ITL p50 alone ms",
         "p50 during ms", "p99 during ms", "max during ms", "p50 during / alone"],
        [[r["token_budget"] if r["token_budget"] > 0 else "none (one pass)",
          f"{r['ttft_s']:.2f}", f"{r['itl_alone_p50_ms']:.1f}", f"{r['itl_during_p50_ms']:.1f}",
          f"{r['itl_during_p99_ms']:.1f}", f"{r['itl_during_max_ms']:.0f}",
          f"{r['ratio_p50']:.2f}x"] for r in rows])
    text += (f"\nKV memory with one {LONG_TEXT.count(' ') + 1:,}-word (26K-token) job beside "
             f"fifteen short jobs: {held['kv_bytes'] / 2**20:.0f} MiB held for "
             f"{held['tokens_held']:,} tokens x {held['bytes_per_token']:,} bytes = "
             f"{held['ratio']:.1f}x what the tokens need (target with paged KV: <= 1.2x)\n")
    return text, {"prefill_budget": rows, "footprint": held}
