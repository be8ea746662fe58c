"""Chunks of a long prompt sized by measured cost (service/engine/pacing.py): fed a known
cost, the sizer keeps the streams' gap within the slowdown when a chunk can, keeps the
prompt's time to first token within it too, and when no chunk can do both, weighs the
streams against the prompt by how many they are."""
from __future__ import annotations

import pytest
from conftest import make_engine

from service.engine.job import ChatJob, ChatMessage, Finished, Role, SamplingParams, TextPart
from service.engine.pacing import ChunkSizer

DECODE = 0.004  # a decode step: 4 ms


def _fed(cost, slowdown: float = 2.0, x: int = 20_000) -> ChunkSizer:
    """A sizer that has measured a decode step and chunks of several sizes near `x`."""
    sizer = ChunkSizer(slowdown, start=256, cap=4096, floor=16)
    for _ in range(5):
        sizer.iteration_took(DECODE)  # a plain iteration: the decode step
        sizer.iteration_took(DECODE + 0.5, 0.5)  # one with a chunk: the same besides it
    for i, n in enumerate((64, 256, 128, 512, 96, 384)):
        sizer.chunk_took(n, x + 10 * i, cost(n))
    return sizer


def test_the_fit_recovers_a_chunks_fixed_part_and_cost_per_token() -> None:
    sizer = _fed(lambda n: 0.015 + n * 3e-5)
    fixed, per = sizer.fit()
    assert fixed == pytest.approx(0.015, rel=1e-6) and per == pytest.approx(3e-5, rel=1e-6)
    # sizes too alike to tell the parts apart: the next chunk probes twice the size
    alike = ChunkSizer(2.0, start=256, cap=4096)
    alike.iteration_took(DECODE)
    for i in range(4):
        alike.chunk_took(16, 1000 * i, 0.015 + 16 * 3e-5)
    assert alike.fit() is None
    assert alike.next(5000, rows=6, remaining=100_000) == 32
    alike.chunk_took(32, 5000, 0.015 + 32 * 3e-5)
    assert alike.fit() == (pytest.approx(0.015), pytest.approx(3e-5))


def test_a_few_chunks_slowed_by_something_else_do_not_move_the_fit() -> None:
    """Two of eight chunks took ten times as long (another process had the cores): the
    medians of the pairwise slopes and of the remainders stay on the true costs."""
    sizer = ChunkSizer(2.0, start=256, cap=4096)
    for i, n in enumerate((64, 256, 128, 512, 96, 384, 192, 320)):
        slow = 10.0 if i in (2, 5) else 1.0
        sizer.chunk_took(n, 20_000 + i, slow * (0.015 + n * 3e-5))
    fixed, per = sizer.fit()
    assert fixed == pytest.approx(0.015, rel=0.1) and per == pytest.approx(3e-5, rel=0.1)


def test_the_streams_bound_holds_where_a_chunk_can_keep_both() -> None:
    """A fixed part well under a decode step and a slowdown of 3: the largest chunk within
    two more decode steps, which keeps the prompt within 3x its time alone as well. (At 2 the
    bounds meet at one size only when a chunk has no fixed part: next test.)"""
    def cost(n: int) -> float:
        return 0.0002 + n * 2e-5

    sizer = _fed(cost, slowdown=3.0)
    n = sizer.next(20_100, rows=6, remaining=100_000)
    assert cost(n) <= 2 * DECODE * 1.01  # the gap within 3 decode steps
    assert cost(n + 16) > 2 * DECODE * 0.99  # the largest such chunk
    assert (cost(n) + DECODE) / (n * 2e-5) <= 3.0  # the prompt within 3x its time alone


def test_when_no_chunk_keeps_both_the_prompts_bound_wins_with_the_smallest_chunk() -> None:
    """A fixed part of 15 ms per chunk far into the prompt (a CPU at 20K positions): no chunk
    fits in one 4 ms decode step. The chunk is the smallest whose iteration costs the prompt
    at most twice what one pass would: its time to first token keeps its bound."""
    def cost(n: int) -> float:
        return 0.015 + n * 3e-5

    sizer = _fed(cost)
    n = sizer.next(20_100, rows=6, remaining=100_000)
    assert n <= 2 * 384  # no more than twice the last chunk per step
    sizer.chunk_took(n, 20_200, cost(n))
    n = sizer.next(20_300, rows=6, remaining=100_000)
    assert (cost(n) + DECODE) / (n * 3e-5) <= 2.0 * 1.01
    assert (cost(n - 8) + DECODE) / ((n - 8) * 3e-5) > 2.0
    assert n == 634  # (F + d) / p = 0.019 / 3e-5


def test_no_stream_running_takes_the_whole_cap_and_nothing_measured_takes_the_start() -> None:
    sizer = ChunkSizer(2.0, start=256, cap=4096)
    assert sizer.next(0, rows=3, remaining=50_000) == 256
    assert sizer.next(0, rows=0, remaining=50_000) == 4096
    assert sizer.next(0, rows=0, remaining=1000) == 1000
    with pytest.raises(ValueError, match="must be above 1"):
        ChunkSizer(1.0, start=256, cap=4096)


def test_a_paced_chunked_prefill_gives_the_one_pass_tokens(tiny) -> None:
    text = " ".join(f"word{i}" for i in range(1200))  # ~7,800 tokens, over chunk_above
    paced = make_engine(tiny, max_running=4)
    whole = make_engine(tiny, chunk_above=0)
    try:
        streams = [paced.submit(ChatJob(f"s{i}", (ChatMessage(Role.USER, (TextPart("hi"),)),),
                                        SamplingParams(max_new_tokens=4000, ignore_eos=True)))
                   for i in range(2)]
        job = ChatJob("long", (ChatMessage(Role.USER, (TextPart(text),)),),
                      SamplingParams(max_new_tokens=8))
        a = list(paced.submit(job))[-1]
        b = list(whole.submit(job))[-1]
        assert isinstance(a, Finished) and a.text == b.text
        assert a.usage.prompt_tokens == b.usage.prompt_tokens > 7000
        assert paced.pacing.samples > 3 and paced.pacing.gap_s > 0
        for s in streams:
            s.cancel()
    finally:
        paced.drain(0)
        whole.drain(0)
