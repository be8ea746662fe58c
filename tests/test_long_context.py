"""Long prompts: chunked prefill between decode steps (running streams keep producing), the
same tokens as an unchunked prefill, cancels between chunks; the context-length setting."""
from __future__ import annotations

import threading
import time

import pytest
from conftest import make_engine

from service.engine.job import (
    Cancelled,
    ChatJob,
    ChatMessage,
    Delta,
    Finished,
    ModelLoadError,
    Role,
    SamplingParams,
    TextPart,
    Trace,
)
from service.engine.scheduler import context_window

LONG_TEXT = " ".join(f"word{i}" for i in range(3000))  # ~19,600 tokens of the tiny tokenizer


def job(rid: str, text: str, tokens: int, traced: bool = False,
        logprobs: bool = False) -> ChatJob:
    return ChatJob(rid, (ChatMessage(Role.USER, (TextPart(text),)),),
                   SamplingParams(max_new_tokens=tokens, ignore_eos=True, logprobs=logprobs),
                   traced=traced)


def test_running_streams_keep_producing_while_a_long_prompt_prefills(tiny) -> None:
    engine = make_engine(tiny, max_running=16, token_budget=2048, max_itl_slowdown=0)
    times: dict[str, list[float]] = {f"s{i}": [] for i in range(8)}
    # logprobs: every token comes as a Delta, also when its text is held back
    streams = {rid: engine.submit(job(rid, f"stream {rid}", 4000, logprobs=True))
               for rid in times}

    def read(rid: str) -> None:
        try:
            for event in streams[rid]:
                if isinstance(event, Delta):
                    times[rid] += [time.monotonic()] * len(event.logprobs)
        except Cancelled:
            pass

    readers = [threading.Thread(target=read, args=(rid,)) for rid in times]
    for r in readers:
        r.start()
    try:
        deadline = time.monotonic() + 30
        while not all(times.values()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert all(times.values()), "the 8 streams did not start"
        first = None
        events = []
        for event in engine.submit(job("long", LONG_TEXT, 4, traced=True)):
            if isinstance(event, Delta) and first is None:
                first = time.monotonic()
            events.append(event)
        done = events[-1]
        assert isinstance(done, Finished) and done.usage.prompt_tokens > 19_000
        [trace] = [e for e in events if isinstance(e, Trace)]
        [prefill] = [s for s in trace.stages if s.name == "eagle.prefill"]
        # chunks of what 2048 leaves after the 8 decode rows: 2040 tokens each
        assert dict(prefill.attributes)["eagle.prefill_chunks"] == \
            -(-done.usage.prompt_tokens // 2040)
        window = (first - done.timing.prefill_ms / 1000, first)
        during = {rid: sum(window[0] <= t <= window[1] for t in ts) for rid, ts in times.items()}
        # ~10 decode steps ran between the chunks; without chunking there would be none
        assert all(n >= 3 for n in during.values()), (sorted(during.values()), done.timing)
    finally:
        for rid in streams:
            engine.cancel(rid)
        for r in readers:
            r.join(30)
        engine.drain(0)


def test_a_chunked_prefill_gives_the_unchunked_tokens(tiny) -> None:
    chunked = make_engine(tiny, token_budget=2048)
    whole = make_engine(tiny, chunk_above=0)
    try:
        a = list(chunked.submit(job("long", LONG_TEXT, 16)))[-1]
        b = list(whole.submit(job("long", LONG_TEXT, 16)))[-1]
        assert isinstance(a, Finished) and isinstance(b, Finished)
        assert a.text == b.text and a.usage.prompt_tokens == b.usage.prompt_tokens > 19_000
        assert chunked.stats()["prefilling"] == 0
    finally:
        chunked.drain(0)
        whole.drain(0)


def test_a_cancel_between_chunks_ends_the_long_job_and_the_engine_goes_on(tiny) -> None:
    engine = make_engine(tiny, token_budget=1024)
    try:
        stream = engine.submit(job("long", LONG_TEXT, 4))
        deadline = time.monotonic() + 30
        while not engine.stats()["prefilling"] and time.monotonic() < deadline:
            time.sleep(0.002)
        assert engine.stats()["prefilling"] == 1
        stream.cancel()
        with pytest.raises(Cancelled):
            list(stream)
        after = list(engine.submit(job("next", "hello", 3)))[-1]
        assert isinstance(after, Finished) and after.usage.completion_tokens == 3
        assert engine.stats()["in_flight"] == 0 and engine.stats()["prefilling"] == 0
    finally:
        engine.drain(0)


def test_context_length_defaults_to_the_config_and_may_rise_to_the_trained_window(
        tiny, caplog) -> None:
    cfg = tiny.cfg
    assert context_window(cfg) == cfg.text.max_position_embeddings == 32768
    assert context_window(cfg, 8192) == 8192
    with pytest.raises(ModelLoadError, match="--context-length 65,536 is over what this model "
                                             "was trained for \\(32,768 tokens\\)"):
        context_window(cfg, 65536)  # eagle_chat: its config's window is its window
    from dataclasses import replace

    v25 = replace(cfg, model_type="eagle_2_5_vl")
    with caplog.at_level("WARNING"):
        assert context_window(v25, 131072) == 131072
    assert "context length raised to 131072 tokens" in caplog.text
    with pytest.raises(ModelLoadError, match="\\(131,072 tokens\\)"):
        context_window(v25, 200_000)
