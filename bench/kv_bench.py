"""The engine's memory and scheduling (`make bench`, kv section): the paged KV cache's
footprint, the prefix cache (a shared system prompt, a second turn about one image, a fleet
of replicas with affinity keys), batch-16 decode, and stall-free prefill (six short streams'
inter-token latency alone and while one 26K-token prompt is admitted, per token budget)."""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import pct, stamp_tokens, table
from bench.serving_bench import ServerProcess
from client import EagleClient
from service.engine.job import (
    ChatJob,
    ChatMessage,
    Delta,
    ImagePart,
    Role,
    SamplingParams,
    TextPart,
    VisionParams,
)
from service.engine.loader import load_model, resolve_model
from service.engine.scheduler import EngineSettings, NativeEngine
from tests import factory

STREAMS = 6
LONG_TEXT = " ".join(f"word{i}" for i in range(4000))  # ~26,000 tokens of the tiny tokenizer
# How the long prompt is prefilled beside the streams: chunks of a fixed token budget (the
# rule before --max-itl-slowdown), one pass, or chunks sized by measured cost (pacing.py).
PREFILL_MODES = (("budget 64", {"token_budget": 64, "max_itl_slowdown": 0}),
                 ("budget 256", {"token_budget": 256, "max_itl_slowdown": 0}),
                 ("budget 2048", {"token_budget": 2048, "max_itl_slowdown": 0}),
                 ("one pass", {"chunk_above": 0}),
                 ("paced, slowdown 2 (default)", {}),
                 ("paced, slowdown 3", {"max_itl_slowdown": 3.0}))


def alone_ttft(engine: NativeEngine, text: str, runs: int = 2) -> float:
    """The long prompt's time to first token with nothing else running: the best of `runs`
    (the first pays the engine's warm-up)."""
    best = float("inf")
    for i in range(runs):
        start = time.monotonic()
        for event in engine.submit(_job(f"alone{i}", text, 2)):
            if isinstance(event, Delta):
                break
        best = min(best, time.monotonic() - start)
    return best


def _job(rid: str, text: str, tokens: int) -> ChatJob:
    return ChatJob(rid, (ChatMessage(Role.USER, (TextPart(text),)),),
                   SamplingParams(max_new_tokens=tokens, ignore_eos=True, logprobs=True))


def one_long_prompt(engine: NativeEngine, text: str, alone_s: float = 1.5) -> dict:
    """Six streams' inter-token gaps alone and while a prompt of `text` is admitted, and that
    prompt's time to first token (bench/gpu.py runs it on the GPU too)."""
    tokens = min(20_000, engine.context_length - 64)  # they outlast the long prompt's prefill
    streams = [engine.submit(_job(f"s{i}", f"stream {i}", tokens)) for i in range(STREAMS)]
    stamps, readers = stamp_tokens(streams)
    quiet = time.monotonic()
    time.sleep(alone_s)
    start = time.monotonic()
    first = None
    for event in engine.submit(_job("long", text, 2)):
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


def prefill_modes(lm, text: str, modes=PREFILL_MODES, engine_for=None) -> list[dict]:
    """Each prefill mode's row: the long prompt's TTFT beside the streams and alone (one pass,
    nothing running), and the streams' gaps; `engine_for(settings)` builds the engine."""
    engine_for = engine_for or (lambda kw: NativeEngine(lm, EngineSettings(**kw)))
    engine = engine_for({"chunk_above": 0, "prefix_cache": False})
    try:
        alone = alone_ttft(engine, text)
    finally:
        engine.drain(0)
    rows = []
    for label, settings in modes:
        engine = engine_for(settings)
        try:
            row = one_long_prompt(engine, text)
        finally:
            engine.drain(0)
        rows.append({"mode": label, **row, "ttft_alone_s": alone,
                     "ttft_ratio": row["ttft_s"] / alone})
    return rows


def prefill_table(rows: list[dict], where: str) -> str:
    return table(
        f"Stall-free prefill: {STREAMS} running streams while a {rows[0]['prompt_tokens']:,}"
        f"-token prompt is admitted ({where}; the prompt alone: "
        f"{rows[0]['ttft_alone_s'] * 1000:.0f} ms to first token)",
        ["prefill", "long prompt TTFT ms", "vs alone", "streams' ITL p50 alone ms",
         "p50 during ms", "p99 during ms", "p50 during / alone"],
        [[r["mode"], f"{r['ttft_s'] * 1000:.0f}", f"{r['ttft_ratio']:.2f}x",
          f"{r['itl_alone_p50_ms']:.2f}", f"{r['itl_during_p50_ms']:.2f}",
          f"{r['itl_during_p99_ms']:.1f}", f"{r['ratio_p50']:.2f}x"] for r in rows])


def footprint(lm) -> dict:
    """KV bytes held with one 26K-token job beside fifteen short ones, against what their
    tokens need (target: <= 1.2x): blocks held x block bytes / tokens x bytes per token."""
    # the batch's token cap raised: fifteen streams kept running (20,000 new tokens each)
    # beside the long one would pass the default 262,144 and hold the long job in the queue
    engine = NativeEngine(lm, EngineSettings(max_running=16, max_batch_tokens=1 << 20))
    short = " ".join(f"word{i}" for i in range(3000, 3075))
    try:  # each short prompt its own from the first token: no block shared between them
        streams = [engine.submit(_job(f"s{i}", f"{i} {short}", 20_000)) for i in range(15)]
        for stream in streams:
            next(iter(stream))
        long_stream = iter(engine.submit(_job("long", LONG_TEXT, 2000)))
        next(long_stream)  # the long job is in the batch
        pool = engine.pool
        counts = pool.counts()
        held = sum(r.length for r in list(engine._running))
        kv_bytes = counts.used * pool.block_size * pool.bytes_per_token
        result = {"kv_bytes": kv_bytes, "tokens_held": held, "blocks_used": counts.used,
                  "block_size": pool.block_size, "bytes_per_token": pool.bytes_per_token,
                  "pool_bytes": pool.nbytes(), "ratio": kv_bytes / (held * pool.bytes_per_token)}
        for stream in streams:
            stream.cancel()
        return result
    finally:
        engine.drain(0)


SYSTEM_TOKENS = 4_700
QUESTIONS = 6


def _ttft(engine: NativeEngine, job: ChatJob) -> tuple[float, object]:
    """Seconds from submit to the first token, and the final event."""
    start, first, done = time.monotonic(), None, None
    for event in engine.submit(job):
        if first is None and isinstance(event, Delta):
            first = time.monotonic()
        done = event
    return (first or time.monotonic()) - start, done


def _system_prompt(tokenizer) -> str:
    """Policy text of about SYSTEM_TOKENS tokens for this tokenizer."""
    words, text = 200, ""
    while True:
        text = " ".join(f"policy{i} must hold." for i in range(words))
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if n >= SYSTEM_TOKENS:
            return text
        words = int(words * SYSTEM_TOKENS / n) + 1


def _asked(rid: str, question: str, system: str = "", tokens: int = 4) -> ChatJob:
    messages = ((ChatMessage(Role.SYSTEM, (TextPart(system),)),) if system else ())
    return ChatJob(rid, messages + (ChatMessage(Role.USER, (TextPart(question),)),),
                   SamplingParams(max_new_tokens=tokens))


def shared_prefix(lm) -> dict:
    """TTFT with a ~4.7K-token system prompt every request shares, against none, with the
    prefix cache on and off (median of QUESTIONS requests, after one warm-up each)."""
    system = _system_prompt(lm.tokenizer)
    out: dict = {}
    for cache in (True, False):
        engine = NativeEngine(lm, EngineSettings(prefix_cache=cache))
        try:
            for label, sys_text in (("none", ""), ("shared", system)):
                _ttft(engine, _asked("warm", "Which policy applies first?", sys_text))
                times, cached, prompt = [], 0, 0
                for i in range(QUESTIONS):
                    t, done = _ttft(engine, _asked(f"q{i}", f"Does policy{i * 7} hold?",
                                                   sys_text))
                    times.append(t)
                    cached, prompt = done.usage.cached_prompt_tokens, done.usage.prompt_tokens
                key = "on" if cache else "off"
                out[f"{label}_{key}_ms"] = pct(times, 0.5) * 1000
                out[f"{label}_{key}_cached"] = cached
                out[f"{label}_prompt_tokens"] = prompt
        finally:
            engine.drain(0)
    out["ratio_on"] = out["shared_on_ms"] / out["none_on_ms"]
    out["ratio_off"] = out["shared_off_ms"] / out["none_off_ms"]
    return out


def second_turn(lm) -> dict:
    """A conversation about one image: the first turn, then the second with the history
    resent (the image in the first user message, the first reply as the assistant's)."""
    image = factory.encode(factory.photo(1280, 960, seed=5), "JPEG")
    vision = VisionParams(max_tiles_per_image=12)
    first_turn = ChatMessage(Role.USER, (ImagePart(data=image), TextPart("Describe this.")))
    out: dict = {}
    for cache in (True, False):
        engine = NativeEngine(lm, EngineSettings(prefix_cache=cache, vision_cache_tiles=0))
        try:
            one_s, one = _ttft(engine, ChatJob("turn1", (first_turn,),
                                               SamplingParams(max_new_tokens=24), vision))
            history = (first_turn, ChatMessage(Role.ASSISTANT, (TextPart(one.text),)),
                       ChatMessage(Role.USER, (TextPart("What colour dominates?"),)))
            two_s, two = _ttft(engine, ChatJob("turn2", history,
                                               SamplingParams(max_new_tokens=8), vision))
            key = "on" if cache else "off"
            out.update({f"first_{key}_ms": one_s * 1000, f"second_{key}_ms": two_s * 1000,
                        f"second_{key}_prefilled": two.usage.prompt_tokens
                        - two.usage.cached_prompt_tokens,
                        "first_prompt_tokens": one.usage.prompt_tokens,
                        "second_prompt_tokens": two.usage.prompt_tokens,
                        f"ratio_{key}": two_s / one_s})
        finally:
            engine.drain(0)
    return out


def batch_decode(lm, batch: int = 16, tokens: int = 200) -> dict:
    """Decode tokens/s of `batch` plain streams (distinct prompts: no cache hits, nothing
    long): what paging must not slow down."""
    engine = NativeEngine(lm, EngineSettings(max_running=batch))
    try:
        jobs = [ChatJob(f"d{i}", (ChatMessage(Role.USER, (TextPart(f"tell story {i} {i * 31}"),)),),
                        SamplingParams(max_new_tokens=tokens, ignore_eos=True, logprobs=True))
                for i in range(batch)]  # logprobs: stamp_tokens counts tokens by them
        for job in jobs[:2]:
            list(engine.submit(job))  # warm-up
        jobs = [ChatJob(f"e{i}", j.messages, j.sampling) for i, j in enumerate(jobs)]
        streams = [engine.submit(j) for j in jobs]
        stamps, readers = stamp_tokens(streams)
        for r in readers:
            r.join(600)
        starts = [ts[0] for ts in stamps]
        ends = [ts[-1] for ts in stamps]
        produced = sum(len(ts) - 1 for ts in stamps)
        return {"batch": batch, "tokens_per_s": produced / (max(ends) - max(starts))}
    finally:
        engine.drain(0)


CONVERSATIONS, TURNS = 20, 4


def _conversation(client: EagleClient, c: int, keyed: bool) -> list[tuple[int, int]]:
    """One conversation's turns, the history resent each time: (prompt, cached) per turn."""
    system = " ".join(f"doc{c} line{i} says {i * c}." for i in range(60))
    history: list[tuple[str, str]] = []
    out = []
    for t in range(TURNS):
        question = f"Question {t} about doc{c}?"
        reply = client.chat(question, system=system, history=history, max_new_tokens=12,
                            affinity_key=f"conversation-{c}" if keyed else None, timeout=120)
        out.append((reply.usage.prompt_tokens, reply.usage.cached_prompt_tokens))
        history.append((question, reply.text))
    return out


def fleet_affinity() -> dict:
    """CONVERSATIONS x TURNS over 3 replicas on 127.0.0.1 with an affinity key per
    conversation, without one (round_robin), and on one replica: prefix-cache hit tokens."""
    servers = [ServerProcess() for _ in range(3)]
    out: dict = {}
    try:
        targets = {"one replica": servers[0].target,
                   "3 replicas, affinity key": "ipv4:" + ",".join(s.target for s in servers),
                   "3 replicas, round_robin": "ipv4:" + ",".join(s.target for s in servers)}
        for n, (label, target) in enumerate(targets.items()):
            keyed = "affinity" in label
            with EagleClient(target) as client, ThreadPoolExecutor(4) as pool:
                # each run its own conversations (c + 100 n): no hits from an earlier run
                ids = [c + 100 * n for c in range(CONVERSATIONS)]
                turns = [t for conv in pool.map(_conversation, [client] * len(ids), ids,
                                                [keyed] * len(ids)) for t in conv]
            out[label] = {"prompt_tokens": sum(p for p, _ in turns),
                          "cached_tokens": sum(c for _, c in turns)}
    finally:
        for s in servers:
            s.stop()
    # each run has its own conversations (their lengths differ a little): compare the share
    # of prompt tokens that hit
    for r in out.values():
        r["hit_share"] = r["cached_tokens"] / r["prompt_tokens"]
    base = out["one replica"]["hit_share"]
    for r in out.values():
        r["vs_one_replica"] = r["hit_share"] / base if base else 0.0
    return out


def run(out: Path) -> tuple[str, dict]:
    lm = load_model(resolve_model("tiny"), "cpu")
    held = footprint(lm)
    prefix = shared_prefix(lm)
    turn = second_turn(lm)
    decode = batch_decode(lm)
    fleet = fleet_affinity()
    rows = prefill_modes(lm, LONG_TEXT)
    text = prefill_table(rows, "tiny model, CPU")
    text += (f"\nKV memory with one {LONG_TEXT.count(' ') + 1:,}-word (26K-token) job beside "
             f"fifteen short jobs: {held['blocks_used']:,} blocks of {held['block_size']} held "
             f"({held['kv_bytes'] / 2**20:.1f} MiB) for {held['tokens_held']:,} tokens x "
             f"{held['bytes_per_token']:,} bytes = {held['ratio']:.2f}x what the tokens need "
             f"(target <= 1.2x; before paging 19.5x)\n")
    text += "\n" + table(
        f"Prefix cache: TTFT with a {prefix['shared_prompt_tokens']:,}-token prompt whose "
        f"system part every request shares (median of {QUESTIONS})",
        ["prefix cache", "no system prompt ms", "shared system prompt ms", "ratio",
         "cached tokens"],
        [[k, f"{prefix[f'none_{k}_ms']:.1f}", f"{prefix[f'shared_{k}_ms']:.1f}",
          f"{prefix[f'ratio_{k}']:.2f}x", prefix[f"shared_{k}_cached"]] for k in ("on", "off")])
    text += "\n" + table(
        f"Second turn about one image ({turn['first_prompt_tokens']:,} then "
        f"{turn['second_prompt_tokens']:,} prompt tokens, vision cache off)",
        ["prefix cache", "first turn TTFT ms", "second turn TTFT ms", "ratio",
         "second turn tokens prefilled"],
        [[k, f"{turn[f'first_{k}_ms']:.1f}", f"{turn[f'second_{k}_ms']:.1f}",
          f"{turn[f'ratio_{k}']:.2f}x", turn[f"second_{k}_prefilled"]] for k in ("on", "off")])
    text += (f"\nBatch-{decode['batch']} decode, distinct short prompts (no hits, nothing "
             f"long): {decode['tokens_per_s']:.0f} tokens/s\n")
    text += "\n" + table(
        f"Fleet: {CONVERSATIONS} conversations x {TURNS} turns (history resent), "
        f"{os.cpu_count()} cores",
        ["routing", "prompt tokens", "prefix-cache hit tokens", "hit share",
         "hit share vs one replica"],
        [[k, v["prompt_tokens"], v["cached_tokens"], f"{v['hit_share']:.1%}",
          f"{v['vs_one_replica']:.2f}"]
         for k, v in fleet.items()])
    return text, {"prefill_budget": rows, "footprint": held, "shared_prefix": prefix,
                  "second_turn": turn, "batch_decode": decode, "fleet_affinity": fleet}
