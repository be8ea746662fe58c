"""Engine on the tiny model, in process: prefill time by tile count, single-stream decode rate."""
from __future__ import annotations

import statistics
from pathlib import Path

from bench.common import table
from service.engine.job import (
    ChatJob,
    ChatMessage,
    Finished,
    ImagePart,
    Role,
    SamplingParams,
    TextPart,
    VisionParams,
)
from tests import factory

# (image size, tile cap) giving 1, 7 and 13 tiles (grid + thumbnail)
SHAPES = {1: ((448, 448), 1), 7: ((1344, 896), 6), 13: ((4032, 3024), 12)}


def _job(image: bytes, cap: int, tokens: int) -> ChatJob:
    return ChatJob("bench", (ChatMessage(Role.USER, (ImagePart(data=image),
                                                     TextPart("Describe this image."))),),
                   SamplingParams(max_new_tokens=tokens), VisionParams(max_tiles_per_image=cap))


def run(out: Path, engine) -> tuple[str, dict]:
    rows, record = [], []
    for tiles, ((w, h), cap) in SHAPES.items():
        image = factory.encode(factory.photo(w, h), "JPEG")
        results = [list(engine.submit(_job(image, cap, 64)))[-1] for _ in range(4)][1:]
        assert all(isinstance(r, Finished) for r in results)
        assert results[0].usage.image_tiles == tiles
        prefill = statistics.median(r.timing.prefill_ms for r in results)
        pre = statistics.median(r.timing.preprocess_ms for r in results)
        rate = statistics.median((r.usage.completion_tokens - 1) / (r.timing.decode_ms / 1000)
                                 for r in results)
        rows.append([tiles, results[0].usage.prompt_tokens, f"{pre:.0f}", f"{prefill:.0f}",
                     f"{rate:.0f}"])
        record.append({"tiles": tiles, "prompt_tokens": results[0].usage.prompt_tokens,
                       "preprocess_ms": pre, "prefill_ms": prefill, "decode_tokens_per_s": rate})
    text = table("Engine, tiny model, in process (median of 3)",
                 ["tiles", "prompt tokens", "preprocess ms", "prefill ms (vision + LLM)",
                  "decode tok/s (1 stream)"], rows)
    return text, {"engine": record}
