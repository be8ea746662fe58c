"""GPU benchmark: Eagle2-1B-shaped random weights in bf16 on the native engine, beside plain
transformers generate() in the same run. `bench/gpu.sh`; `--device cpu --tiny` is a dry run."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from bench.common import machine, table
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
    VisionParams,
)
from service.engine.loader import LoadedModel, attention_backend, build_empty
from service.engine.scheduler import EngineSettings, NativeEngine
from service.engine.tiny import ensure_tiny, tiny_config, train_tokenizer
from tests import factory

# Peak HBM bandwidth by device name, bytes/s (datasheet figures).
BANDWIDTH = {"H200": 4.8e12, "H100 SXM": 3.35e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12,
             "H100": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12}


def eagle2_1b_config(vocab: int = 151674) -> dict:
    """The Eagle2-1B architecture (shared/reference/configs/eagle2-1b-legacy), layout eagle_chat."""
    cfg = tiny_config(vocab)
    cfg["llm_config"].update(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                             num_attention_heads=14, num_key_value_heads=2, vocab_size=vocab,
                             bos_token_id=151643, eos_token_id=151645)
    cfg["vision_config"].update(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                num_attention_heads=16)
    return cfg


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


def text_job(rid: str, tokens: int) -> ChatJob:
    return ChatJob(rid, (ChatMessage(Role.USER, (TextPart("Write a long story about a lighthouse "
                                                          "keeper and a storm."),)),),
                   SamplingParams(max_new_tokens=tokens, ignore_eos=True))


def ttft_13_tiles(engine: NativeEngine) -> dict:
    image = factory.encode(factory.photo(4032, 3024), "JPEG")
    job = lambda i: ChatJob(f"img{i}", (ChatMessage(Role.USER, (  # noqa: E731
        ImagePart(data=image), TextPart("Describe this image."))),),
        SamplingParams(max_new_tokens=1), VisionParams(max_tiles_per_image=12))
    samples = []
    for i in range(4):
        start = time.perf_counter()
        final = list(engine.submit(job(i)))[-1]
        samples.append((time.perf_counter() - start, final))
    wall, final = sorted(samples[1:], key=lambda s: s[0])[1]
    assert final.usage.image_tiles == 13
    return {"ttft_ms": wall * 1000, "preprocess_ms": final.timing.preprocess_ms,
            "prefill_ms": final.timing.prefill_ms, "prompt_tokens": final.usage.prompt_tokens}


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


def main() -> None:
    p = argparse.ArgumentParser(prog="bench/gpu.sh")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="the tiny model (a quick dry run)")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--bandwidth", type=float, default=0.0, help="bytes/s (default: by device)")
    p.add_argument("--out", default=os.environ.get("OUT") or "bench/results")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = train_tokenizer()
    raw = tiny_config(len(tokenizer)) if args.tiny else eagle2_1b_config()
    if args.tiny:
        ensure_tiny()  # the same random tiny as the server, for a like-for-like dry run
    model, cfg = random_model(raw, device, dtype)
    lm = LoadedModel(model, tokenizer, cfg, Path("eagle2-1b-random"), device, dtype)
    batches = [int(b) for b in args.batches.split(",")]
    engine = NativeEngine(lm, EngineSettings(max_running=max(batches), max_queue=max(batches),
                                             batch_invariant=False), context_length=16384)
    if device.type != "cuda":  # the dry run takes the GPU's decode path, minus the capture
        engine.decoder.graphs = DecodeGraphs(engine.decoder, max(batches), capture=False)
    list(engine.submit(text_job("warm", 8)))
    ttft = ttft_13_tiles(engine)
    rows = [batch_rate(engine, b, args.tokens) for b in batches]
    graphs = engine.decoder.graphs  # CUDA graphs for decode (None on CPU): the same step eager
    eager = None
    if graphs is not None:
        engine.decoder.graphs = None
        eager = batch_rate(engine, batches[0], args.tokens)
        engine.decoder.graphs = graphs
    engine.drain(0)
    generate = plain_generate(lm, args.tokens)
    llm_bytes = sum(p.numel() * p.element_size() for n, p in model.language_model.named_parameters())
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    bw = args.bandwidth or next((v for k, v in BANDWIDTH.items() if k in name), 0.0)
    bound = bw / llm_bytes if bw else float("nan")
    single = rows[0]["per_stream_decode_tokens_per_s"]
    print(f"Device: {name}; LLM weights {llm_bytes / 1e9:.2f} GB in {str(dtype)[6:]}; "
          f"bandwidth bound {bound:.0f} tok/s\n")
    print(f"TTFT, one 13-tile image: {ttft['ttft_ms']:.0f} ms (preprocess "
          f"{ttft['preprocess_ms']:.0f} ms, prefill {ttft['prefill_ms']:.0f} ms, "
          f"{ttft['prompt_tokens']} prompt tokens)\n")
    print(table("Decode", ["batch", "aggregate tok/s", "per-stream tok/s", "TTFT p50 ms",
                           "vs generate() 1 stream"],
                [[r["batch"], f"{r['aggregate_tokens_per_s']:.0f}",
                  f"{r['per_stream_decode_tokens_per_s']:.0f}", f"{r['ttft_p50_ms']:.0f}",
                  f"{r['aggregate_tokens_per_s'] / generate:.1f}x"] for r in rows]))
    print(f"plain transformers generate(), 1 stream: {generate:.0f} tok/s; engine single "
          f"stream {single:.0f} tok/s = {single / generate:.2f}x generate(), "
          f"{single / bound:.0%} of the bandwidth bound")
    if eager is not None:
        print(f"the same engine without CUDA graphs: batch {eager['batch']} "
              f"{eager['per_stream_decode_tokens_per_s']:.0f} tok/s per stream; graphs captured: "
              f"{graphs.captured}, replayed: {graphs.replayed} (none on CPU: the static steps "
              f"run eagerly there)")
    print()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps({
        "machine": machine(), "device": name, "llm_bytes": llm_bytes, "bandwidth": bw,
        "bound_tokens_per_s": bound, "ttft_13_tiles": ttft, "batches": rows,
        "generate_tokens_per_s": generate, "single_vs_generate": single / generate,
        "eager_without_graphs": eager,
        "graphs": ({"captured": graphs.captured, "replayed": graphs.replayed}
                   if graphs is not None else None),
        "single_vs_bound": single / bound if bw else None}, indent=2))


if __name__ == "__main__":
    main()
