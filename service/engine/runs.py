"""What the engine thread keeps of each job it runs: a job queued for the batch, the running
job, a long prompt being prefilled a chunk at a time, and how any failure becomes the job's
error."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from service.engine.detok import TextAssembler
from service.engine.grammar import Constraint
from service.engine.job import EngineError, OutOfMemory
from service.engine.prepare import Prepared
from service.engine.sampling import Sampler
from service.engine.stream import JobStream
from service.engine.vision import VisionSteps

log = logging.getLogger("service.engine.scheduler")


@dataclass
class Running:
    stream: JobStream
    prep: Prepared
    sampler: Sampler
    text: TextAssembler
    seen: torch.Tensor  # prompt + reply ids, for the repetition penalty
    constraint: Constraint | None = None  # the job's response_format
    length: int = 0  # tokens in the KV row
    last: int = 0  # the sampled token not yet in the KV row
    generated: int = 0
    cached_tiles: int = 0
    t_submit: float = 0.0
    t_admit: float = 0.0
    t_first: float = 0.0
    first_ns: int = 0  # wall clock of the first token, for the trace
    finished: bool = field(default=False)
    table: list[int] = field(default_factory=list)  # its KV blocks, in position order
    tokens: list[int] = field(default_factory=list)  # ids at positions 0.. (prompt, reply)
    hashes: list[bytes] = field(default_factory=list)  # of its full blocks, in order
    registered: int = 0  # leading full blocks named in the prefix index
    cached_tokens: int = 0  # prompt positions whose keys came from the prefix cache
    preemptions: int = 0  # times its blocks were taken back, to be computed again
    started: bool = False  # its first token was taken


@dataclass
class Queued:
    """A prepared job waiting for the batch, or a preempted one waiting to come back
    (`resume`). At admission it gets its blocks: `cached` leading positions shared from the
    prefix index, the rest new."""

    stream: JobStream
    prep: Prepared
    t_submit: float
    resume: Running | None = None
    table: list[int] = field(default_factory=list)
    cached: int = 0


@dataclass
class Chunked:
    """A long prompt being prefilled a step at a time: its vision features a slice of tiles
    per step, then its prompt a chunk per step into its blocks."""

    run: Running
    vision: VisionSteps | None  # None when its media positions were cached
    embeds: torch.Tensor | None = None  # (prompt, hidden), once the vision is done
    done: int = 0  # positions already in its blocks (a prefix-cache hit's to start with)
    chunks: int = 0
    start_ns: int = 0


def as_engine_error(exc: BaseException) -> EngineError:
    if isinstance(exc, EngineError):
        return exc
    if isinstance(exc, torch.OutOfMemoryError):
        return OutOfMemory("the model ran out of memory for this request; send fewer or smaller "
                           "images, fewer frames, or a lower max_new_tokens")
    log.error("engine step failed", exc_info=exc)
    return EngineError(f"internal error in the engine: {type(exc).__name__}")


__all__ = ["Chunked", "Queued", "Running", "as_engine_error"]
