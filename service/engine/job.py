"""Domain types of one chat job and its events: no protobuf, no tensors."""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum

from preprocess.errors import FieldError
from service.tenants import DEFAULT as DEFAULT_TENANT


class Role(str, Enum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ImagePart:
    """An image by bytes or by reference (exactly one is set)."""

    data: bytes = b""
    uri: str = ""
    field: str = ""  # request path, for error details ("messages[1].parts[0].image")


@dataclass(frozen=True)
class VideoPart:
    """A video by reference or bytes, with its sampling."""

    uri: str = ""
    data: bytes = b""
    num_frames: int = 0
    start_seconds: float = 0.0
    end_seconds: float = 0.0
    field: str = ""


Part = TextPart | ImagePart | VideoPart


@dataclass(frozen=True)
class ChatMessage:
    role: Role
    parts: tuple[Part, ...]


@dataclass(frozen=True)
class ResponseFormat:
    """What a constrained reply must be. `kind` is one of KINDS; `spec` is the schema (JSON
    text), the regex, the grammar, or the choices as a JSON list; `field` is its request
    path, for errors."""

    KINDS = ("json_schema", "json_object", "regex", "choice", "lark", "gbnf")

    kind: str
    spec: str = ""
    strict: bool = False
    field: str = ""


@dataclass(frozen=True)
class SamplingParams:
    """Generation settings, already validated and defaulted."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks only: generate exactly max_new_tokens
    response_format: ResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True)
class VisionParams:
    max_tiles_per_image: int = 12
    max_video_frames: int = 32
    frame_timestamps: bool = True


INTERACTIVE, BATCH = "interactive", "batch"


@dataclass
class ChatJob:
    """One request as the engine sees it. Per-request state lives here, never on the model."""

    request_id: str
    messages: tuple[ChatMessage, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    vision: VisionParams = field(default_factory=VisionParams)
    deadline: float | None = None  # time.monotonic() seconds
    created: float = field(default_factory=time.monotonic)
    traced: bool = False  # record Stages for the request's trace
    # Whose caches the job reads and adds to (KV blocks, vision embeddings, tokenized text,
    # compiled formats): shared only within one namespace, the caller's tenant and the
    # request's cache_salt (see converters).
    cache_namespace: str = ""
    tenant: str = DEFAULT_TENANT  # whose share of the replica the job is served from
    priority: str = INTERACTIVE  # INTERACTIVE or BATCH, within the tenant

    def expired(self, now: float | None = None) -> bool:
        return self.deadline is not None and (now or time.monotonic()) >= self.deadline


@dataclass(frozen=True)
class Stage:
    """A timed step of one job, for its trace. Wall-clock nanoseconds (time.time_ns), which
    the engine process and the server process share; `parent` names the enclosing stage."""

    name: str
    start_ns: int
    end_ns: int
    attributes: tuple[tuple[str, object], ...] = ()
    parent: str = ""
    error: str = ""  # the exception's type when the step failed


@contextmanager
def timed(stages: list[Stage] | None, name: str, parent: str = "",
          **attributes: object) -> Iterator[dict[str, object]]:
    """Record the enclosed block as a Stage in `stages` (nothing when None). The yielded
    dict takes attributes known only inside the block; a failure is recorded and re-raised."""
    if stages is None:
        yield {}
        return
    extra: dict[str, object] = {}
    start, error = time.time_ns(), ""
    try:
        yield extra
    except BaseException as exc:
        error = type(exc).__name__
        raise
    finally:
        stages.append(Stage(name, start, time.time_ns(),
                            tuple({**attributes, **extra}.items()), parent, error))


class FinishReason(str, Enum):
    STOP = "stop"  # the model's end-of-turn token
    LENGTH = "length"  # max_new_tokens or the context
    STOP_SEQUENCE = "stop_sequence"  # one of SamplingParams.stop


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    vision_tokens: int = 0
    image_tiles: int = 0
    video_frames: int = 0
    cached_tiles: int = 0
    cached_prompt_tokens: int = 0


@dataclass
class Timing:
    queue_ms: float = 0.0
    preprocess_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log probability, and the top alternatives at its step as
    (token id, bytes, log probability), most likely first."""

    token_id: int
    token_bytes: bytes
    logprob: float
    top: tuple[tuple[int, bytes, float], ...] = ()


@dataclass(frozen=True)
class Delta:
    """New reply text (never splits a character), and the log probabilities of the tokens
    sampled since the last Delta when the job asked for them."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    """The last event of a successful job."""

    reason: FinishReason
    text: str
    usage: Usage
    timing: Timing
    adjustments: tuple[str, ...] = ()
    stop_sequence: str = ""  # the stop string that ended the reply (STOP_SEQUENCE)


@dataclass(frozen=True)
class Trace:
    """The stages of a traced job, sent just before its last event (Finished or an error)."""

    stages: tuple[Stage, ...]


Event = Delta | Finished | Trace


@dataclass(frozen=True)
class EngineInfo:
    """What the engine serves; it crosses to the server process, so it lives here with the
    other light types (nothing in this module imports torch)."""

    model_name: str
    model_type: str
    context_length: int
    tokens_per_tile: int
    tile_size: int
    max_tiles_per_image: int
    device: str
    prompt_style: str = "eagle2"  # eagle2 (the upstream worker's) or eagle2.5 (its processor's)
    max_video_frames: int = 64  # the frame limits the engine's media stage enforces
    default_video_frames: int = 32
    kv_block_size: int = 0  # tokens per KV block
    kv_blocks: int = 0  # blocks in the KV pool


class ModelLoadError(Exception):
    """A checkpoint that cannot be served: its message names the file, key or field."""


class EngineError(FieldError):
    """A job that cannot complete; `code` is one of the names in service.errors' table.
    `retry_ms`, for RESOURCE_EXHAUSTED: when a retry may succeed (the call's
    grpc-retry-pushback-ms and RetryInfo), or -1 when retrying cannot help."""

    code = "INTERNAL"
    retry_ms = 0


class InvalidRequest(EngineError):
    code = "INVALID_ARGUMENT"


class Overloaded(EngineError):
    code = "RESOURCE_EXHAUSTED"
    retry_ms = 1000  # a slot is likely free by then


class OutOfMemory(EngineError):
    code = "RESOURCE_EXHAUSTED"
    retry_ms = -1  # the same request runs out again


class Unavailable(EngineError):
    code = "UNAVAILABLE"


class Cancelled(EngineError):
    code = "CANCELLED"


class DeadlineExceeded(EngineError):
    code = "DEADLINE_EXCEEDED"


def check_admission(wedged: bool, accepting: bool) -> None:
    """Raise the error a new job gets when the engine takes none now."""
    if wedged:
        raise Unavailable("the model is stuck; this replica is restarting, retry on another")
    if not accepting:
        raise Unavailable("the server is shutting down; retry on another replica")


class Capacity:
    """What may be in flight (accepted, not finished), per tenant: the running slots plus the
    tenant's queue (its max_queue in `tenants`, else `max_queue`). A tenant at its limit is
    refused while the others are still admitted; with one tenant this is the engine's whole
    capacity. `tenants` is EngineSettings.tenants: (name, weight, max_queue)."""

    def __init__(self, max_running: int, max_queue: int,
                 tenants: tuple[tuple[str, float, int], ...] = ()) -> None:
        self.max_running, self.max_queue = max_running, max_queue
        self.queues = {name: queue for name, _, queue in tenants if queue}
        self.by_tenant: dict[str, int] = {}
        self.total = 0

    def queue_of(self, tenant: str) -> int:
        return self.queues.get(tenant, self.max_queue)

    def take(self, tenant: str) -> None:
        """Count a new job of `tenant`, or raise Overloaded naming the limit it is at (the
        caller holds the engine's lock)."""
        queue = self.queue_of(tenant)
        held = self.by_tenant.get(tenant, 0)
        if held >= self.max_running + queue:
            if tenant == DEFAULT_TENANT:
                raise Overloaded(f"the server is at capacity ({self.max_running} running, "
                                 f"{queue} queued); retry later")
            raise Overloaded(f"tenant {tenant!r} is at its limit of {held} requests in "
                             f"flight ({self.max_running} running + {queue} queued); retry "
                             f"later")
        self.by_tenant[tenant] = held + 1
        self.total += 1

    def clear(self) -> None:
        self.by_tenant.clear()
        self.total = 0

    def give(self, tenant: str) -> None:
        held = self.by_tenant.get(tenant, 0) - 1
        if held > 0:
            self.by_tenant[tenant] = held
        else:
            self.by_tenant.pop(tenant, None)
        self.total -= 1
