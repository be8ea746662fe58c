"""Generation: greedy determinism, seeded sampling, exact streamed text, stop strings, usage."""
from __future__ import annotations

import factory
import pytest

from service.engine.detok import TextAssembler
from service.engine.job import (
    ChatJob,
    ChatMessage,
    Delta,
    Finished,
    FinishReason,
    ImagePart,
    Role,
    SamplingParams,
    TextPart,
    VisionParams,
)


def job(text: str, rid: str = "g", image: bytes = b"", **sampling) -> ChatJob:
    parts = ((ImagePart(data=image),) if image else ()) + (TextPart(text),)
    return ChatJob(rid, (ChatMessage(Role.USER, parts),),
                   SamplingParams(**{"max_new_tokens": 24, **sampling}),
                   VisionParams(max_tiles_per_image=2))


def run(engine, j: ChatJob) -> tuple[list[str], Finished]:
    events = list(engine.submit(j))
    deltas = [e.text for e in events if isinstance(e, Delta)]
    final = events[-1]
    assert isinstance(final, Finished) and all(isinstance(e, Delta) for e in events[:-1])
    return deltas, final


def test_greedy_is_deterministic_and_usage_is_counted(engine) -> None:
    image = factory.encode(factory.photo(1000, 500), "JPEG")  # 2x1 grid + thumbnail
    a_deltas, a = run(engine, job("Describe this image.", image=image))
    b_deltas, b = run(engine, job("Describe this image.", image=image))
    assert a.text == b.text and a_deltas == b_deltas
    assert "".join(a_deltas) == a.text
    assert a.usage.image_tiles == 3 and a.usage.vision_tokens == 3 * 256
    assert a.usage.prompt_tokens > a.usage.vision_tokens
    assert a.reason is FinishReason.LENGTH and a.usage.completion_tokens == 24
    assert a.timing.preprocess_ms > 0 and a.timing.prefill_ms > 0 and a.timing.decode_ms > 0


def test_seeded_sampling_is_reproducible(engine) -> None:
    params = {"temperature": 0.9, "top_p": 0.95, "top_k": 50}
    first = run(engine, job("Tell me a story", seed=7, **params))[1].text
    again = run(engine, job("Tell me a story", seed=7, **params))[1].text
    other = run(engine, job("Tell me a story", seed=8, **params))[1].text
    assert first == again and first != other
    penalised = run(engine, job("Tell me a story", seed=7, repetition_penalty=1.3, **params))[1]
    assert penalised.usage.completion_tokens >= 1


def test_streamed_deltas_join_to_the_text_with_multibyte_characters(engine) -> None:
    seen_non_ascii = False
    for seed in range(12):
        deltas, final = run(engine, job("Unicode: café 東京 😀", seed=seed, temperature=1.0,
                                        max_new_tokens=40))
        assert "".join(deltas) == final.text
        seen_non_ascii |= any(ord(c) > 127 and c != "\ufffd" for c in final.text)
    assert seen_non_ascii


def test_assembler_never_splits_a_character_and_holds_stop_prefixes(tiny) -> None:
    tok = tiny.tokenizer
    text = "Unicode: café 東京 😀 done"
    asm = TextAssembler(tok)
    deltas = [asm.add(i) for i in tok.encode(text, add_special_tokens=False)]
    deltas.append(asm.finish())
    assert "".join(deltas) == text == asm.text
    assert all("\ufffd" not in d for d in deltas)  # no delta ends inside a character
    broken = TextAssembler(tok)  # bytes that never form a character are let out, not held
    invalid = tok.convert_tokens_to_ids(["Ã"] * 6)
    out = "".join(broken.add(i) for i in invalid) + broken.finish()
    assert out == broken.text and out
    stopper = TextAssembler(tok, stop=("東京",))
    out = [stopper.add(i) for i in tok.encode(text, add_special_tokens=False)]
    out.append(stopper.finish())
    assert "".join(out) == "Unicode: café " and stopper.stopped and stopper.stopped_by == "東京"


def test_stop_strings_end_the_reply_without_the_stop_text(engine) -> None:
    _, free = run(engine, job("Describe a park", max_new_tokens=30))
    cut = free.text[6:9]
    assert len(cut) == 3
    deltas, stopped = run(engine, job("Describe a park", max_new_tokens=30, stop=(cut,)))
    assert stopped.reason is FinishReason.STOP_SEQUENCE and stopped.stop_sequence == cut
    assert stopped.text == free.text[: free.text.index(cut)]
    assert "".join(deltas) == stopped.text and cut not in stopped.text


@pytest.mark.parametrize("n", [1, 5])
def test_max_new_tokens_is_respected(engine, n: int) -> None:
    _, final = run(engine, job("Count", max_new_tokens=n))
    assert final.usage.completion_tokens == n and final.reason is FinishReason.LENGTH


def test_batched_jobs_produce_what_they_produce_alone(engine) -> None:
    image = factory.encode(factory.photo(500, 300, seed=4), "PNG")
    jobs = [job(f"question {i} " * (i + 1), rid=f"b{i}", image=image if i % 2 else b"",
                max_new_tokens=10 + i) for i in range(6)]
    alone = [run(engine, j)[1].text for j in jobs]
    streams = [engine.submit(j) for j in jobs]
    together = [[e for e in s][-1].text for s in streams]
    assert together == alone
