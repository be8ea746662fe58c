"""What the sync and asyncio clients share: request building, channel options, errors."""
from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# gRPC's ring_hash reads its request hash from a header only with this on (gRFC A76, still
# gated in grpcio 1.85); it must be set before the first channel reads gRPC's settings.
os.environ.setdefault("GRPC_EXPERIMENTAL_RING_HASH_SET_REQUEST_HASH_KEY", "true")

import grpc  # noqa: E402
from eagle.v1 import chat_pb2  # noqa: E402

DEFAULT_TARGET = "127.0.0.1:50051"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

SERVICE = "eagle.v1.ChatService"
# Retries: UNAVAILABLE only (a warming, draining, restarting or dead replica), and only
# before any response data has arrived (gRPC never replays a call once the server's headers
# or a message came back, so a stream that sent text is not repeated); no hedging.
# UNAVAILABLE: a replica warming up, draining or gone. RESOURCE_EXHAUSTED: a replica (or
# the caller's tenant) at capacity or over a quota; the server's grpc-retry-pushback-ms
# trailer says when to try again (gRPC waits that long instead of its backoff), and -1 where
# a retry cannot help (out of memory for that request), which gRPC then does not retry. A
# message over the server's size limit is never retried: it is larger than gRPC's retry
# buffer.
RETRY_POLICY = {"maxAttempts": 5, "initialBackoff": "0.2s", "maxBackoff": "3s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]}
PRIORITIES = {"interactive": chat_pb2.PRIORITY_INTERACTIVE, "batch": chat_pb2.PRIORITY_BATCH}
BALANCING = ("round_robin", "pick_first", "ring_hash")
# A call with an affinity key (a conversation id) goes to the replica its key hashes to on a
# ring over the healthy replicas, so a conversation's turns meet their cached vision (and,
# later, prompt) state; keyless calls stay round_robin. Go, Java, C++ and Envoy read the same
# header from the same service config.
AFFINITY_HEADER = "x-eagle-affinity"
# Reconnect backoff: gRPC's default grows to 120 s, so a replica that was down for a while sat
# idle up to 20-39 s after it came back (measured in a rolling restart); capped at 2 s, a
# restarted replica takes calls within about 2 s of answering (tests/test_fleet.py).
RECONNECT_BACKOFF = (("grpc.initial_reconnect_backoff_ms", 250),
                     ("grpc.min_reconnect_backoff_ms", 250),
                     ("grpc.max_reconnect_backoff_ms", 2000))


def service_config(load_balancing: str = "round_robin", retries: bool = True) -> str:
    """The gRPC service config the client library uses.

    `round_robin` (the default) spreads calls over every address the target resolves to
    (`dns:///eagle.ns.svc:50051` with a headless Service, `ipv4:10.0.0.1:50051,10.0.0.2:50051`,
    or one address) and checks each replica's health (`grpc.health.v1`, service
    eagle.v1.ChatService): a replica warming up or draining gets no new calls.
    `pick_first` keeps one connection to the first address that answers, as before.
    `ring_hash` sends each call to the replica its `x-eagle-affinity` header hashes to
    (consistent hashing over the healthy replicas: one that drains or dies hands its keys to
    the next on the ring, and only those move); the library uses it for calls that carry an
    affinity key.
    """
    if load_balancing not in BALANCING:
        raise ValueError(f"load_balancing must be one of {', '.join(BALANCING)}, not "
                         f"{load_balancing!r}")
    policy: dict[str, Any] = {load_balancing: {}}
    if load_balancing == "ring_hash":
        policy = {"ring_hash_experimental": {"requestHashHeader": AFFINITY_HEADER}}
    config: dict[str, Any] = {"loadBalancingConfig": [policy]}
    if load_balancing != "pick_first":
        config["healthCheckConfig"] = {"serviceName": SERVICE}
    if retries:
        config["methodConfig"] = [{"name": [{"service": SERVICE}], "retryPolicy": RETRY_POLICY}]
    return json.dumps(config)


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES, retries: bool = True,
                    load_balancing: str = "round_robin") -> list[tuple[str, Any]]:
    """Keepalive every 60 s (the server allows pings every 10 s), message sizes, reconnect
    backoff capped at 2 s, balancing and retries (see service_config)."""
    return [
        *RECONNECT_BACKOFF,
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.enable_retries", int(retries)),
        ("grpc.service_config", service_config(load_balancing, retries)),
    ]


def open_channel(api: Any, target: str, tls: bool, root_certificates: Any, client_cert: Any,
                 client_key: Any, max_message_bytes: int, retries: bool,
                 load_balancing: str = "round_robin") -> Any:
    """A channel from `api` (the grpc module or grpc.aio) with our options and credentials.
    `target` is any gRPC target: an address, `dns:///name:port`, `ipv4:a:p,b:p`."""
    creds = credentials(tls, root_certificates, client_cert, client_key)
    opts = channel_options(max_message_bytes, retries, load_balancing)
    return api.secure_channel(target, creds, opts) if creds else api.insecure_channel(target, opts)


class Channels:
    """The client's channel and stub, and a second one balanced by ring_hash that carries
    the calls with an affinity key (opened on the first such call), so keyless calls stay
    round_robin. With `pick_first` (a mesh sidecar) or `ring_hash` for everything, the one
    channel carries all and the key is only a header (Envoy can hash on it itself)."""

    def __init__(self, api: Any, stub_class: Any, target: str, load_balancing: str,
                 token: str | None, **open_args: Any) -> None:
        self._open = lambda balancing: open_channel(api, target, load_balancing=balancing,
                                                    **open_args)
        self._stub_class, self.balancing = stub_class, load_balancing
        self.main = self._open(load_balancing)
        self.stub = stub_class(self.main)
        self.metadata = metadata(token)
        self.keyed: Any = None
        self._lock = threading.Lock()

    def route(self, affinity_key: str | None) -> tuple[Any, tuple[tuple[str, str], ...]]:
        """The stub and metadata for one call."""
        if not affinity_key:
            return self.stub, self.metadata
        headers = self.metadata + ((AFFINITY_HEADER, affinity_key),)
        if self.balancing != "round_robin":
            return self.stub, headers
        with self._lock:
            if self.keyed is None:
                self.keyed = self._open("ring_hash")
                self._keyed_stub = self._stub_class(self.keyed)
        return self._keyed_stub, headers

    def all(self) -> list[Any]:
        return [c for c in (self.main, self.keyed) if c is not None]


def credentials(tls: bool, root_certificates: bytes | str | Path | None,
                client_cert: bytes | str | Path | None,
                client_key: bytes | str | Path | None) -> grpc.ChannelCredentials | None:
    if not (tls or root_certificates or client_cert):
        return None
    return grpc.ssl_channel_credentials(_read(root_certificates), _read(client_key),
                                        _read(client_cert))


def _read(value: bytes | str | Path | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


class EagleError(Exception):
    """A failed call. `code` is the grpc.StatusCode; `details` the server's message;
    `field` the request field it names (when the server sent BadRequest details);
    `retry_after_ms` the server's grpc-retry-pushback-ms on a refusal: when a new call may
    pass (-1: it will not; None: the server said nothing). gRPC's retry policy has already
    waited and retried where it could before this is raised."""

    def __init__(self, code: grpc.StatusCode, details: str, field: str = "",
                 retry_after_ms: int | None = None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.field = field
        self.retry_after_ms = retry_after_ms

    @classmethod
    def from_rpc(cls, err: grpc.RpcError, trailers: Iterable[tuple[str, Any]] = ()) -> EagleError:
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        details = err.details() if hasattr(err, "details") else str(err)
        trailers = tuple(trailers or ())
        return cls(code, details or "", _bad_field(trailers), _pushback(trailers))


def _pushback(trailers: Iterable[tuple[str, Any]]) -> int | None:
    for key, value in trailers:
        if key == "grpc-retry-pushback-ms":
            try:
                return int(value)
            except (TypeError, ValueError):
                return None
    return None


def _bad_field(trailers: Iterable[tuple[str, Any]]) -> str:
    """The first BadRequest field violation, when google.rpc protos are installed."""
    try:
        from google.rpc import error_details_pb2, status_pb2
    except ImportError:  # the light client install: the message still names the field
        return ""
    for key, value in trailers or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                bad = error_details_pb2.BadRequest()
                if detail.Unpack(bad) and bad.field_violations:
                    return bad.field_violations[0].field
    return ""


@dataclass(frozen=True)
class Video:
    """A video by reference (`uri`: a path under the server's media roots, file:// or
    http(s):// when allowed) or by bytes (`data`), with optional sampling."""

    uri: str = ""
    data: bytes = b""
    num_frames: int = 0
    start_seconds: float = 0.0
    end_seconds: float = 0.0


@dataclass
class ChatResult:
    """The whole reply with its finish reason, usage, timing and any context adjustments."""

    request_id: str
    text: str
    finish_reason: str  # "stop", "length" or "stop_sequence"
    usage: chat_pb2.Usage
    timing: chat_pb2.Timing
    adjustments: list[str] = field(default_factory=list)
    stop_sequence: str = ""  # the stop string that ended the reply, if one did
    # per generated token, when asked for (logprobs=True or top_logprobs=n)
    logprobs: list[chat_pb2.TokenLogprob] = field(default_factory=list)
    # the reply parsed as the pydantic model given as json_schema (None if it was cut short)
    parsed: Any = None

    @classmethod
    def from_response(cls, r: chat_pb2.ChatResponse | chat_pb2.StreamChatResponse,
                      text: str | None = None,
                      logprobs: list[chat_pb2.TokenLogprob] | None = None) -> ChatResult:
        return cls(r.request_id, r.text if text is None else text,
                   finish_reason_name(r.finish_reason), r.usage, r.timing,
                   list(r.adjustments), r.stop_sequence,
                   list(r.logprobs) if logprobs is None else logprobs)

    def parse_as(self, model: Any) -> ChatResult:
        """Fill `parsed` with the text validated by `model` (a pydantic model class), when
        the format was completed (finish_reason "stop")."""
        if model is not None and self.finish_reason == "stop":
            self.parsed = model.model_validate_json(self.text)
        return self

    def to_dict(self) -> dict[str, Any]:
        from google.protobuf.json_format import MessageToDict

        return {"request_id": self.request_id, "text": self.text,
                "finish_reason": self.finish_reason, "stop_sequence": self.stop_sequence,
                "usage": MessageToDict(self.usage, always_print_fields_with_no_presence=True,
                                       preserving_proto_field_name=True),
                "timing": MessageToDict(self.timing, always_print_fields_with_no_presence=True,
                                        preserving_proto_field_name=True),
                "adjustments": self.adjustments,
                **({"logprobs": [MessageToDict(t, preserving_proto_field_name=True,
                                               always_print_fields_with_no_presence=True)
                                 for t in self.logprobs]} if self.logprobs else {})}


def finish_reason_name(value: int) -> str:
    """FINISH_REASON_STOP_SEQUENCE -> "stop_sequence"."""
    return chat_pb2.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()


ImageLike = bytes | str | os.PathLike | Any  # bytes, a path, or a PIL image
AnyChatRequest = chat_pb2.ChatRequest | chat_pb2.StreamChatRequest
VideoLike = Video | bytes | str


def _image(img: ImageLike) -> chat_pb2.Image:
    if isinstance(img, chat_pb2.Image):
        return img
    if isinstance(img, bytes | bytearray):
        return chat_pb2.Image(data=bytes(img))
    if isinstance(img, str | os.PathLike):
        text = os.fspath(img)
        if "://" in text:
            return chat_pb2.Image(uri=text)
        return chat_pb2.Image(data=Path(text).read_bytes())
    if hasattr(img, "save"):  # a PIL image: sent as PNG
        import io

        buf = io.BytesIO()
        img.save(buf, "PNG")
        return chat_pb2.Image(data=buf.getvalue())
    raise TypeError(f"an image must be bytes, a path or a PIL image, not {type(img).__name__}")


def _video(v: VideoLike) -> chat_pb2.Video:
    if isinstance(v, chat_pb2.Video):
        return v
    if isinstance(v, bytes | bytearray):
        return chat_pb2.Video(data=bytes(v))
    if isinstance(v, str):
        return chat_pb2.Video(uri=v)
    if isinstance(v, Video):
        pb = chat_pb2.Video(num_frames=v.num_frames, start_seconds=v.start_seconds,
                            end_seconds=v.end_seconds)
        if v.data:
            pb.data = v.data
        else:
            pb.uri = v.uri
        return pb
    raise TypeError(f"a video must be a Video, bytes or a reference string, not "
                    f"{type(v).__name__}")


def schema_model(json_schema: Any) -> Any:
    """The pydantic model class given as a json_schema, or None."""
    return json_schema if isinstance(json_schema, type) and hasattr(
        json_schema, "model_json_schema") else None


def _set_format(g: chat_pb2.GenerationConfig, json_schema: Any, strict: bool, json_object: bool,
                regex: str | None, choice: Sequence[str] | None, lark: str | None,
                gbnf: str | None) -> None:
    given = [name for name, value in (("json_schema", json_schema), ("json_object", json_object),
                                      ("regex", regex), ("choice", choice), ("lark", lark),
                                      ("gbnf", gbnf)) if value not in (None, False)]
    if len(given) > 1:
        raise ValueError(f"give at most one response format, not {' and '.join(given)}")
    if json_schema is not None:
        model = schema_model(json_schema)
        if model is not None:
            json_schema = model.model_json_schema()
        text = json_schema if isinstance(json_schema, str) else json.dumps(json_schema)
        g.json_schema.schema, g.json_schema.strict = text, strict
    elif json_object:
        g.json_object.SetInParent()
    elif regex is not None:
        g.regex = regex
    elif choice is not None:
        g.choice.choices.extend(choice)
    elif lark is not None:
        g.grammar.lark = lark
    elif gbnf is not None:
        g.grammar.gbnf = gbnf


def build_request(text: str = "", *, images: Sequence[ImageLike] = (),
                  videos: Sequence[VideoLike] = (), system: str | None = None,
                  history: Sequence[tuple[str, str]] = (), max_new_tokens: int | None = None,
                  temperature: float | None = None, top_p: float | None = None,
                  top_k: int | None = None, repetition_penalty: float | None = None,
                  seed: int | None = None, stop: Sequence[str] = (), ignore_eos: bool = False,
                  max_tiles_per_image: int | None = None, max_video_frames: int | None = None,
                  frame_timestamps: bool | None = None, request_id: str = "",
                  json_schema: Any = None, strict: bool = True, json_object: bool = False,
                  regex: str | None = None, choice: Sequence[str] | None = None,
                  lark: str | None = None, gbnf: str | None = None, logprobs: bool = False,
                  top_logprobs: int = 0, cache_salt: str = "", priority: str | None = None,
                  message: type[AnyChatRequest] = chat_pb2.ChatRequest) -> AnyChatRequest:
    """A ChatRequest (or, with `message`, a StreamChatRequest: the same fields): optional
    system, (user, assistant) history pairs, then the new user message with its images,
    videos and text in that order (as the upstream worker orders).

    At most one response format: `json_schema` (a dict, JSON text, or a pydantic model
    class; `strict`: unsupported keywords are an error rather than ignored), `json_object`,
    `regex`, `choice` (a list of strings), or a grammar (`lark` or `gbnf`). `cache_salt`
    keeps the request's prompt prefix out of other salts' reach in the server's prefix
    cache (see the .proto). `priority`: "interactive" (the server's default) or "batch":
    within the caller's tenant, batch requests are admitted after and preempted before
    interactive ones."""
    req = message(request_id=request_id, cache_salt=cache_salt)
    if priority is not None:
        if priority not in PRIORITIES:
            raise ValueError(f"priority {priority!r}: use interactive or batch")
        req.priority = PRIORITIES[priority]
    if system is not None:
        req.messages.add(role=chat_pb2.ROLE_SYSTEM).parts.add(text=system)
    for question, answer in history:
        req.messages.add(role=chat_pb2.ROLE_USER).parts.add(text=question)
        req.messages.add(role=chat_pb2.ROLE_ASSISTANT).parts.add(text=answer)
    msg = req.messages.add(role=chat_pb2.ROLE_USER)
    for img in images:
        msg.parts.add(image=_image(img))
    for v in videos:
        msg.parts.add(video=_video(v))
    if text or not msg.parts:
        msg.parts.add(text=text)
    g = req.generation
    if max_new_tokens is not None:
        g.max_new_tokens = max_new_tokens
    if temperature is not None:
        g.temperature = temperature
    if top_p is not None:
        g.top_p = top_p
    if top_k is not None:
        g.top_k = top_k
    if repetition_penalty is not None:
        g.repetition_penalty = repetition_penalty
    if seed is not None:
        g.seed = seed
    g.stop.extend(stop)
    g.ignore_eos = ignore_eos
    _set_format(g, json_schema, strict, json_object, regex, choice, lark, gbnf)
    g.logprobs = logprobs
    g.top_logprobs = top_logprobs
    if max_tiles_per_image is not None:
        req.vision.max_tiles_per_image = max_tiles_per_image
    if max_video_frames is not None:
        req.vision.max_video_frames = max_video_frames
    if frame_timestamps is not None:
        req.vision.frame_timestamps = frame_timestamps
    return req
