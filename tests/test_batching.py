"""Continuous batching: same tokens batched or alone, cancels mid-batch, the vision cache,
out-of-memory containment, and memory given back when idle."""
from __future__ import annotations

import time

import factory
import pytest
import torch
from conftest import make_engine

from service.engine.job import (
    Cancelled,
    ChatJob,
    ChatMessage,
    Delta,
    Finished,
    ImagePart,
    OutOfMemory,
    Role,
    SamplingParams,
    TextPart,
    VideoPart,
    VisionParams,
)

CLIP = factory.video(None, seconds=2, fps=10)


def _job(i: int) -> ChatJob:
    kind = i % 4
    parts: tuple = ()
    if kind == 1:
        parts = (ImagePart(data=factory.encode(factory.photo(300 + 97 * i, 200 + 53 * i, seed=i),
                                               "JPEG")),)
    elif kind == 2:
        parts = (VideoPart(data=CLIP, num_frames=2 + i % 3),)
    text = TextPart(" ".join(f"word{j}" for j in range(3 + 7 * i)))
    return ChatJob(f"mix{i}", (ChatMessage(Role.USER, parts + (text,)),),
                   SamplingParams(max_new_tokens=8 + 3 * i), VisionParams(max_tiles_per_image=4))


def _final(stream) -> Finished:
    events = list(stream)
    assert isinstance(events[-1], Finished)
    return events[-1]


def test_sixteen_mixed_jobs_give_the_same_tokens_batched_as_alone(engine) -> None:
    jobs = [_job(i) for i in range(16)]
    alone = {j.request_id: _final(engine.submit(j)) for j in jobs}
    streams = {j.request_id: engine.submit(j) for j in jobs}
    cancelled = ["mix3", "mix8", "mix13"]
    for rid in cancelled:  # cancel these midway, while the others run beside them
        it = iter(streams[rid])
        first = next(it)
        assert isinstance(first, (Delta, Finished))
        streams[rid].cancel()
        with pytest.raises(Cancelled):
            for _ in it:
                pass
    for rid, stream in streams.items():
        if rid in cancelled:
            continue
        together = _final(stream)
        assert together.text == alone[rid].text, rid
        assert together.usage.completion_tokens == alone[rid].usage.completion_tokens
        assert together.usage.prompt_tokens == alone[rid].usage.prompt_tokens
    deadline = time.monotonic() + 5
    while engine.stats()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats()["in_flight"] == 0


def test_a_resent_image_reuses_its_vision_embeddings(tiny) -> None:
    engine = make_engine(tiny, prefix_cache=False)  # else its KV blocks are reused whole
    image = factory.encode(factory.photo(900, 600, seed=11), "PNG")
    job = lambda rid: ChatJob(rid, (ChatMessage(Role.USER, (  # noqa: E731
        ImagePart(data=image), TextPart("again?"))),), SamplingParams(max_new_tokens=6))
    first = _final(engine.submit(job("c1")))
    second = _final(engine.submit(job("c2")))
    assert first.usage.cached_tiles == 0 and first.usage.image_tiles > 1
    assert second.usage.cached_tiles == second.usage.image_tiles == first.usage.image_tiles
    assert second.text == first.text
    stats = engine.stats()
    assert (stats["vision_cache_hits"], stats["vision_cache_misses"]) == (1, 1)
    engine.drain(0)


def test_out_of_memory_fails_that_job_alone(tiny) -> None:
    engine = make_engine(tiny)

    def hook(stage: str, what) -> None:
        if stage == "prefill" and what.job.request_id == "huge":
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    engine.fault_hook = hook
    huge = ChatJob("huge", (ChatMessage(Role.USER, (TextPart("big"),)),))
    with pytest.raises(OutOfMemory, match="ran out of memory for this request"):
        list(engine.submit(huge))
    small = ChatJob("next", (ChatMessage(Role.USER, (TextPart("small"),)),),
                    SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert _final(engine.submit(small)).usage.completion_tokens == 3

    fired = []

    def step_hook(stage: str, rows) -> None:
        if stage == "step" and len(rows) == 2 and not fired:
            fired.append(True)
            raise torch.OutOfMemoryError("injected")

    engine.fault_hook = step_hook
    long = ChatJob("long", (ChatMessage(Role.USER, (TextPart("x " * 200),)),),
                   SamplingParams(max_new_tokens=40, ignore_eos=True))
    short = ChatJob("short", (ChatMessage(Role.USER, (TextPart("y"),)),),
                    SamplingParams(max_new_tokens=40, ignore_eos=True))
    streams = [engine.submit(long), engine.submit(short)]
    with pytest.raises(OutOfMemory):
        list(streams[0])  # the job holding the most cache leaves
    assert _final(streams[1]).usage.completion_tokens == 40  # the other carries on
    engine.drain(0)


def test_a_packed_prefill_out_of_memory_retries_each_prompt_alone(tiny) -> None:
    """Short prompts share a prefill pass; if the pass does not fit, each prompt gets one of
    its own and only a prompt that fails alone fails."""
    engine = make_engine(tiny, prefix_cache=False)  # the prompts repeat: no cache hits here
    alone = _final(engine.submit(ChatJob("ref", (ChatMessage(Role.USER, (TextPart("a b c"),)),),
                                         SamplingParams(max_new_tokens=6))))
    real = engine.decoder.prefill_many
    passes = []

    def tight(prompts):
        passes.append(len(prompts))
        if len(prompts) > 1:
            raise torch.OutOfMemoryError("injected: the pack does not fit")
        return real(prompts)

    streams = []

    def submit_four_at_once(stage: str, what) -> None:  # from inside a step: one admission
        if stage != "step" or streams:
            return
        streams.extend(engine.submit(ChatJob(f"p{i}", (ChatMessage(Role.USER, (
            TextPart("a b c"),)),), SamplingParams(max_new_tokens=6))) for i in range(4))
        deadline = time.monotonic() + 10
        while len(engine._waiting) < 4 and time.monotonic() < deadline:
            time.sleep(0.005)

    engine.decoder.prefill_many = tight
    engine.fault_hook = submit_four_at_once
    long = engine.submit(ChatJob("bg", (ChatMessage(Role.USER, (TextPart("x"),)),),
                                 SamplingParams(max_new_tokens=30, ignore_eos=True)))
    while len(streams) < 4:
        time.sleep(0.005)
    finals = [_final(s) for s in streams]
    assert _final(long).usage.completion_tokens == 30
    assert passes[-5:] == [4, 1, 1, 1, 1]
    assert [f.text for f in finals] == [alone.text] * 4
    engine.drain(0)
