"""Structured output: what a response format costs in serving, how long formats take to
compile (cold, then from the cache), and the grammar engines compared on Qwen2's vocabulary.

The serving rows run the same server for free text and for a JSON schema at concurrency 1
and 16. The engine comparison runs llguidance (the one eagle-grpc uses) and, when installed,
xgrammar and outlines-core on the same schema and tokens; their per-token mask time is the
cost a constrained row adds to a decode step.
"""
from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path

from eagle.v1 import chat_pb2

from bench.common import pct, table
from bench.serving_bench import ServerProcess, _level
from bench.vocab import qwen2_tokenizer
from client._common import build_request
from service.engine.job import ResponseFormat

FREE_TOKENS = 48
# 20 fields of every kind: the compile-time case, and the serving case's reply (~50 tokens)
KINDS = [{"type": "string", "maxLength": 6}, {"type": "integer", "minimum": 0, "maximum": 999},
         {"type": "boolean"}, {"enum": ["open", "paid", "void"]}]
SCHEMA = {"type": "object", "additionalProperties": False,
          "properties": {f"field_{i}": KINDS[i % 4] for i in range(20)},
          "required": [f"field_{i}" for i in range(20)]}


def _instance() -> str:
    values = {"string": "abc", "integer": 42, "boolean": True}
    doc = {name: values.get(k.get("type"), "paid") for name, k in SCHEMA["properties"].items()}
    return json.dumps(doc, separators=(",", ":"))


def compile_times(tok) -> dict:
    """Our Grammars over `tok`: tokenizer setup, the 20-field schema cold and cached, and the
    mask time per token while stepping through a valid reply."""
    from service.engine.grammar import Grammars

    stop = {tok.convert_tokens_to_ids("<|im_end|>")}
    start = time.perf_counter()
    grammars = Grammars(tok, len(tok), stop)
    grammars._tokenizer.result()
    setup = time.perf_counter() - start
    start = time.perf_counter()  # the first new format starts the compile processes
    grammars.constraint(ResponseFormat("regex", "[0-9]+", field="warm"))
    workers = time.perf_counter() - start
    fmt = ResponseFormat("json_schema", json.dumps(SCHEMA), True, "bench")
    start = time.perf_counter()  # in a compile process first, then here
    constraint = grammars.constraint(fmt)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    grammars.constraint(fmt)
    cached = time.perf_counter() - start
    bitmask, masks = grammars.new_bitmask(1), []
    for token in tok.encode(_instance(), add_special_tokens=False):
        start = time.perf_counter()
        grammars.fill([constraint], bitmask)
        masks.append(time.perf_counter() - start)
        constraint.accept(token)
    grammars.close()
    return {"vocab": len(tok), "tokenizer_setup_s": setup, "workers_start_s": workers,
            "compile_cold_ms": cold * 1e3,
            "compile_cached_ms": cached * 1e3, "mask_p50_us": statistics.median(masks) * 1e6,
            "mask_p90_us": pct(masks, 0.9) * 1e6}


def compare_engines(tok) -> list[dict]:
    """llguidance, xgrammar and outlines-core on the same schema and reply tokens."""
    tokens = tok.encode(_instance(), add_special_tokens=False)
    out = []
    for name, runner in (("llguidance", _llguidance), ("xgrammar", _xgrammar),
                         ("outlines-core", _outlines)):
        try:
            out.append({"engine": name, **runner(tok, tokens)})
        except ImportError:
            out.append({"engine": name, "installed": False})
    return out


def _timed_masks(fill, accept, tokens) -> tuple[float, float]:
    times = []
    for token in tokens:
        start = time.perf_counter()
        fill()
        times.append(time.perf_counter() - start)
        accept(token)
    return statistics.median(times) * 1e6, pct(times, 0.9) * 1e6


def _llguidance(tok, tokens) -> dict:
    import llguidance.hf
    import torch
    from llguidance import LLMatcher

    start = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    grammar = LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    matcher = LLMatcher(lltok, grammar)
    mask = torch.empty((len(tok) + 31) // 32, dtype=torch.int32)
    matcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
    compile_ms = (time.perf_counter() - start) * 1e3
    matcher = LLMatcher(lltok, grammar)
    p50, p90 = _timed_masks(lambda: matcher.unsafe_compute_mask_ptr(mask.data_ptr(),
                                                                    mask.numel() * 4),
                            matcher.consume_token, tokens)
    return {"installed": True, "setup_s": setup, "compile_ms": compile_ms, "mask_p50_us": p50,
            "mask_p90_us": p90}


def _xgrammar(tok, tokens) -> dict:
    import xgrammar as xgr

    start = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
    compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False,
                                            separators=(",", ":"), strict_mode=True)
    compile_ms = (time.perf_counter() - start) * 1e3
    matcher, mask = xgr.GrammarMatcher(compiled), xgr.allocate_token_bitmask(1, info.vocab_size)
    p50, p90 = _timed_masks(lambda: matcher.fill_next_token_bitmask(mask), matcher.accept_token,
                            tokens)
    return {"installed": True, "setup_s": setup, "compile_ms": compile_ms, "mask_p50_us": p50,
            "mask_p90_us": p90}


def _outlines(tok, tokens) -> dict:
    import torch
    from outlines_core import Guide, Index, Vocabulary, json_schema

    start = time.perf_counter()
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    decoder = {c: b for b, c in _byte_level_alphabet().items()}
    pieces: dict[bytes, list[int]] = {}
    for text, i in tok.get_vocab().items():
        if i != eos and all(c in decoder for c in text):
            pieces.setdefault(bytes(decoder[c] for c in text), []).append(i)
    vocab = Vocabulary(eos, pieces)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    index = Index(json_schema.build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern=""),
                  vocab)
    compile_ms = (time.perf_counter() - start) * 1e3
    guide, mask = Guide(index), torch.zeros((len(tok) + 31) // 32, dtype=torch.int32)
    p50, p90 = _timed_masks(lambda: guide.write_mask_into(mask.data_ptr(), mask.numel(), 4),
                            guide.advance, tokens)
    return {"installed": True, "setup_s": setup, "compile_ms": compile_ms, "mask_p50_us": p50,
            "mask_p90_us": p90}


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet: byte -> the printable character standing for it."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table_, extra = {b: chr(b) for b in kept}, 0
    for b in range(256):
        if b not in table_:
            table_[b] = chr(256 + extra)
            extra += 1
    return table_


def serving(levels=(1, 16)) -> list[dict]:
    """Free text vs the 20-field schema over gRPC, same server, same prompt."""
    prompt = "Fill in the form."
    free = build_request(prompt, max_new_tokens=FREE_TOKENS, ignore_eos=True,
                         message=chat_pb2.StreamChatRequest)
    schema = build_request(prompt, max_new_tokens=256, json_schema=SCHEMA,
                           message=chat_pb2.StreamChatRequest)
    server = ServerProcess()
    rows = []
    try:
        for request in (free, schema):  # warm-up: first compile, lazy imports
            asyncio.run(_level(server.target, request, 1, 2))
        for name, request in (("free text", free), ("JSON schema (20 fields)", schema)):
            for c in levels:
                r = asyncio.run(_level(server.target, request, c, max(32, 4 * c)))
                rows.append({"workload": name, **r})
    finally:
        server.stop()
    return rows


def run(out: Path) -> tuple[str, dict]:
    record: dict = {"serving": serving()}
    by = {(r["workload"], r["concurrency"]): r["tokens_per_s"] for r in record["serving"]}
    record["cost_at_16"] = 1 - by[("JSON schema (20 fields)", 16)] / by[("free text", 16)]
    rows = [[r["workload"], r["concurrency"], r["requests"], f"{r['tokens_per_s']:.0f}",
             f"{r['ttft_p50_ms']:.0f}", f"{r['itl_p50_ms']:.1f}"] for r in record["serving"]]
    text = table("Structured output over gRPC, tiny model (free text: 48 tokens; schema: "
                 "the reply's own length)",
                 ["workload", "concurrency", "requests", "output tok/s", "TTFT p50 ms",
                  "ITL p50 ms"], rows)
    text += (f"\nA JSON schema costs {record['cost_at_16'] * 100:.1f}% of tokens/s at "
             f"concurrency 16 (target <= 10%).\n\n")
    from service.engine.loader import load_model, resolve_model

    tokenizers = {"tiny": load_model(resolve_model("tiny")).tokenizer}
    qwen = qwen2_tokenizer()
    if qwen is not None:
        tokenizers["Qwen2"] = qwen
    record["compile"] = {name: compile_times(tok) for name, tok in tokenizers.items()}
    text += table("Grammar compile, 20-field schema, eagle-grpc's Grammars (llguidance)",
                  ["vocabulary", "tokens", "tokenizer setup s", "compile processes start s",
                   "compile cold ms", "compile cached ms", "mask p50/p90 us"],
                  [[name, c["vocab"], f"{c['tokenizer_setup_s']:.2f}",
                    f"{c['workers_start_s']:.2f}",
                    f"{c['compile_cold_ms']:.1f}", f"{c['compile_cached_ms']:.2f}",
                    f"{c['mask_p50_us']:.1f} / {c['mask_p90_us']:.1f}"]
                   for name, c in record["compile"].items()])
    if qwen is not None:
        record["engines"] = compare_engines(qwen)
        text += "\n" + table(
            "Grammar engines on Qwen2's vocabulary (151,643 + special tokens), same schema",
            ["engine", "tokenizer setup s", "compile ms", "mask p50/p90 us per token"],
            [[e["engine"], "not installed", "", ""] if not e["installed"] else
             [e["engine"], f"{e['setup_s']:.2f}", f"{e['compile_ms']:.1f}",
              f"{e['mask_p50_us']:.1f} / {e['mask_p90_us']:.1f}"]
             for e in record["engines"]])
    return text, record
