"""The one place that maps protobuf to domain objects and back, validating every field."""
from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import dataclass

from eagle.v1 import chat_pb2
from google.protobuf import unknown_fields

from service.engine.job import (
    BATCH,
    INTERACTIVE,
    ChatJob,
    ChatMessage,
    Delta,
    Finished,
    FinishReason,
    ImagePart,
    ResponseFormat,
    Role,
    SamplingParams,
    TextPart,
    Timing,
    TokenLogprob,
    Usage,
    VideoPart,
    VisionParams,
)
from service.errors import RequestError
from service.settings import Settings
from service.tenants import DEFAULT as DEFAULT_TENANT

_ROLES = {chat_pb2.ROLE_SYSTEM: Role.SYSTEM, chat_pb2.ROLE_USER: Role.USER,
          chat_pb2.ROLE_ASSISTANT: Role.ASSISTANT}
_FINISH = {FinishReason.STOP: chat_pb2.FINISH_REASON_STOP,
           FinishReason.LENGTH: chat_pb2.FINISH_REASON_LENGTH,
           FinishReason.STOP_SEQUENCE: chat_pb2.FINISH_REASON_STOP_SEQUENCE}
# Chat and StreamChat each have their own request message (Buf's STANDARD rules); the two
# carry the same fields under the same numbers, so one validation serves both.
AnyChatRequest = chat_pb2.ChatRequest | chat_pb2.StreamChatRequest
MAX_STOP_STRINGS, MAX_STOP_CHARS, MAX_TOP_K = 8, 64, 1000
MAX_TOP_LOGPROBS = 20
MAX_FORMAT_CHARS = 256 * 1024  # a schema, regex or grammar
# Shapes a grammar engine handles in time and stack: chained rules past a few thousand
# overflowed llguidance's stack (a segfault), and deep nesting costs recursion alike. What
# passes these is still compiled first in a killable process (service/engine/grammar_probe).
MAX_GRAMMAR_RULES = 1000
MAX_NESTING = 64  # brackets in a grammar or regex, objects and arrays in a JSON Schema
_RULE = re.compile(r"^[ \t]*[?!]?[A-Za-z_][\w.-]*[ \t]*(?:::=|:)", re.MULTILINE)
_QUOTED = re.compile(r'"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\\\n]|\\.)*\'')
_ESCAPED = re.compile(r"\\.")
_CLASS = re.compile(r"\[(?:[^\]\\]|\\.)*\]")
MAX_CHOICES, MAX_CHOICE_CHARS = 1024, 1024


@dataclass(frozen=True)
class Limits:
    """The request limits the converters enforce (a view of Settings)."""

    max_messages: int
    max_parts: int
    max_text_chars: int
    max_images: int
    max_image_bytes: int
    max_tiles_per_image: int
    max_videos: int
    max_video_frames: int
    default_video_frames: int
    max_video_bytes: int
    max_new_tokens: int
    default_max_new_tokens: int
    default_temperature: float
    model_max_tiles: int = 12

    @classmethod
    def from_settings(cls, s: Settings, info=None) -> Limits:
        """The settings' limits; frame limits the settings leave at 0 (and the tile default)
        come from the engine's EngineInfo (the model's own)."""
        most = s.max_video_frames or getattr(info, "max_video_frames", 64)
        default = min(s.default_video_frames or getattr(info, "default_video_frames", 32), most)
        return cls(s.max_messages, s.max_parts, s.max_text_chars, s.max_images,
                   s.max_image_bytes, s.max_tiles_per_image, s.max_videos, most, default,
                   s.max_video_bytes, s.max_new_tokens, s.default_max_new_tokens,
                   s.default_temperature, getattr(info, "max_tiles_per_image", 12))


def request_id(request: AnyChatRequest, metadata_id: str = "") -> str:
    """The request's own id; when it is empty, the call's x-request-id metadata (a mesh
    proxy's id); when both are empty, a fresh one. Either must be valid."""
    rid = request.request_id
    if not rid and metadata_id:
        if not _valid_id(metadata_id):
            raise RequestError("x-request-id", "the metadata value must be at most 128 "
                                               "printable ASCII characters without spaces")
        return metadata_id
    if not rid:
        return uuid.uuid4().hex
    if not _valid_id(rid):
        raise RequestError("request_id", "must be at most 128 printable ASCII characters "
                                         "without spaces")
    return rid


def _valid_id(rid: str) -> bool:
    return len(rid) <= 128 and all(32 < ord(c) < 127 for c in rid)


def to_job(request: AnyChatRequest, limits: Limits, rid: str,
           timeout_s: float | None = None, tenant: str = "default",
           priority_header: str = "") -> ChatJob:
    """Validate a ChatRequest and build the engine's ChatJob. Raises RequestError(field, why).
    `tenant` is the caller's (service.tenants): every cache the job touches is the tenant's
    and the request's cache_salt's (`cache_namespace`); `priority_header` is the call's
    x-eagle-priority metadata, used when the request leaves `priority` unset."""
    messages = _messages(request, limits)
    salt = request.cache_salt
    if len(salt.encode()) > MAX_CACHE_SALT:
        raise RequestError("cache_salt", f"{len(salt.encode())} bytes, over the limit of "
                                         f"{MAX_CACHE_SALT}")
    return ChatJob(
        request_id=rid,
        messages=messages,
        sampling=_sampling(request.generation, limits),
        vision=_vision(request.vision, limits),
        deadline=None if timeout_s is None else time.monotonic() + timeout_s,
        cache_namespace=cache_namespace(tenant, salt),
        tenant=tenant,
        priority=_priority(request.priority, priority_header),
    )


MAX_CACHE_SALT = 256
PRIORITY_KEY = "x-eagle-priority"
_PRIORITIES = {chat_pb2.PRIORITY_INTERACTIVE: INTERACTIVE, chat_pb2.PRIORITY_BATCH: BATCH}


def cache_namespace(tenant: str, salt: str = "") -> str:
    """Whose caches a request may use: its tenant's (the server's own without tenants, as
    before there were any) and, within it, its cache_salt's."""
    namespace = "" if tenant == DEFAULT_TENANT else f"tenant:{tenant}"
    return f"{namespace}\0{salt}" if salt else namespace


def _priority(value: int, header: str) -> str:
    if value in _PRIORITIES:
        return _PRIORITIES[value]
    if value != chat_pb2.PRIORITY_UNSPECIFIED:
        raise RequestError("priority", f"unknown value {value}: use PRIORITY_INTERACTIVE or "
                                       f"PRIORITY_BATCH")
    word = header.strip().lower()
    if word in ("", INTERACTIVE):
        return INTERACTIVE
    if word == BATCH:
        return BATCH
    raise RequestError(PRIORITY_KEY, f"{header[:40]!r} is not a priority: use interactive or "
                                     f"batch")


def _messages(request: AnyChatRequest, limits: Limits) -> tuple[ChatMessage, ...]:
    msgs = request.messages
    if not msgs:
        raise RequestError("messages", "at least one user message is required")
    if len(msgs) > limits.max_messages:
        raise RequestError("messages", f"{len(msgs)} messages, over the limit of "
                                       f"{limits.max_messages}")
    out: list[ChatMessage] = []
    counts = {"parts": 0, "chars": 0, "images": 0, "videos": 0}
    expected = Role.USER
    for i, msg in enumerate(msgs):
        path = f"messages[{i}]"
        role = _ROLES.get(msg.role)
        if role is None:
            raise RequestError(f"{path}.role", "must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT")
        if role is Role.SYSTEM:
            if i != 0:
                raise RequestError(f"{path}.role", "a ROLE_SYSTEM message may only come first")
        elif role is not expected:
            raise RequestError(f"{path}.role", f"expected ROLE_{expected.name}: after the "
                                               f"optional system message, ROLE_USER and "
                                               f"ROLE_ASSISTANT alternate, starting with "
                                               f"ROLE_USER")
        else:
            expected = Role.ASSISTANT if role is Role.USER else Role.USER
        if not msg.parts:
            raise RequestError(f"{path}.parts", "a message needs at least one part")
        parts = tuple(_part(p, role, f"{path}.parts[{j}]", limits, counts)
                      for j, p in enumerate(msg.parts))
        out.append(ChatMessage(role, parts))
    if out[-1].role is not Role.USER:
        raise RequestError(f"messages[{len(msgs) - 1}].role",
                           "the last message must be from ROLE_USER")
    return tuple(out)


def _part(part: chat_pb2.Part, role: Role, path: str, limits: Limits,
          counts: dict[str, int]) -> TextPart | ImagePart | VideoPart:
    counts["parts"] += 1
    if counts["parts"] > limits.max_parts:
        raise RequestError(path, f"more than {limits.max_parts} parts in the request, the limit")
    kind = part.WhichOneof("kind")
    if kind is None:
        raise RequestError(path, "the part has no text, image or video")
    if kind != "text" and role is not Role.USER:
        raise RequestError(f"{path}.{kind}", f"{kind}s are allowed in USER messages only")
    if kind == "text":
        counts["chars"] += len(part.text)
        if counts["chars"] > limits.max_text_chars:
            raise RequestError(f"{path}.text", f"the request's text is over the "
                                               f"{limits.max_text_chars:,}-character limit")
        return TextPart(part.text)
    if kind == "image":
        counts["images"] += 1
        img = part.image
        where = f"{path}.image"
        if counts["images"] > limits.max_images:
            raise RequestError(where, f"more than {limits.max_images} images in the request, "
                                      f"the limit")
        _check_source(img, "image", where, limits.max_image_bytes)
        return ImagePart(data=img.data, uri=img.uri, field=where)
    counts["videos"] += 1
    video = part.video
    where = f"{path}.video"
    if counts["videos"] > limits.max_videos:
        raise RequestError(where, f"more than {limits.max_videos} videos in the request, the limit")
    _check_source(video, "video", where, limits.max_video_bytes)
    if video.num_frames > limits.max_video_frames:
        raise RequestError(f"{where}.num_frames", f"{video.num_frames} frames, over the limit "
                                                  f"of {limits.max_video_frames}")
    for name in ("start_seconds", "end_seconds"):
        value = getattr(video, name)
        if not math.isfinite(value) or value < 0:
            raise RequestError(f"{where}.{name}", f"must be a finite number >= 0, got {value}")
    if video.end_seconds and video.end_seconds <= video.start_seconds:
        raise RequestError(f"{where}.end_seconds", f"must be after start_seconds "
                                                   f"({video.start_seconds}), got "
                                                   f"{video.end_seconds}")
    return VideoPart(uri=video.uri, data=video.data, num_frames=video.num_frames,
                     start_seconds=video.start_seconds, end_seconds=video.end_seconds, field=where)


def _check_source(media: chat_pb2.Image | chat_pb2.Video, kind: str, where: str,
                  max_bytes: int) -> None:
    """Exactly one non-empty source, and inline bytes within the limit."""
    source = media.WhichOneof("source")
    if source is None or not getattr(media, source):
        raise RequestError(where, f"the {kind} has neither data nor uri")
    if len(media.data) > max_bytes:
        raise RequestError(f"{where}.data", f"the {kind} is {len(media.data):,} bytes, over the "
                                            f"{max_bytes:,}-byte limit")


def _sampling(g: chat_pb2.GenerationConfig, limits: Limits) -> SamplingParams:
    unknown = sorted({f.field_number for f in unknown_fields.UnknownFieldSet(g)})
    if unknown:  # a newer client's setting (a response format, say): never silently ignored
        raise RequestError("generation", f"field {unknown[0]} is not known to this server "
                                         f"(a client built from a newer contract?); refusing "
                                         f"rather than ignoring a generation setting")
    max_new = g.max_new_tokens or limits.default_max_new_tokens
    if max_new > limits.max_new_tokens:
        raise RequestError("generation.max_new_tokens", f"{g.max_new_tokens} is over the "
                                                        f"limit of {limits.max_new_tokens}")
    temperature = g.temperature if g.HasField("temperature") else limits.default_temperature
    if not (math.isfinite(temperature) and 0 <= temperature <= 2):
        raise RequestError("generation.temperature", f"must be between 0 and 2, got {temperature}")
    top_p = g.top_p if g.HasField("top_p") else 1.0
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise RequestError("generation.top_p", f"must be in (0, 1], got {top_p}")
    if g.top_k > MAX_TOP_K:
        raise RequestError("generation.top_k", f"{g.top_k} is over the limit of {MAX_TOP_K}")
    penalty = g.repetition_penalty if g.HasField("repetition_penalty") else 1.0
    if not (math.isfinite(penalty) and 0 < penalty <= 2):
        raise RequestError("generation.repetition_penalty", f"must be in (0, 2], got {penalty}")
    if len(g.stop) > MAX_STOP_STRINGS:
        raise RequestError("generation.stop", f"{len(g.stop)} stop strings, over the limit of "
                                              f"{MAX_STOP_STRINGS}")
    for k, s in enumerate(g.stop):
        if not s or len(s) > MAX_STOP_CHARS:
            raise RequestError(f"generation.stop[{k}]", f"must be 1 to {MAX_STOP_CHARS} "
                                                        f"characters, got {len(s)}")
    if g.top_logprobs > MAX_TOP_LOGPROBS:
        raise RequestError("generation.top_logprobs", f"{g.top_logprobs} is over the limit of "
                                                      f"{MAX_TOP_LOGPROBS}")
    return SamplingParams(max_new_tokens=max_new, temperature=float(temperature),
                          top_p=float(top_p), top_k=g.top_k, repetition_penalty=float(penalty),
                          seed=g.seed if g.HasField("seed") else None, stop=tuple(g.stop),
                          ignore_eos=g.ignore_eos, response_format=_response_format(g),
                          logprobs=g.logprobs or g.top_logprobs > 0,
                          top_logprobs=g.top_logprobs)


def _response_format(g: chat_pb2.GenerationConfig) -> ResponseFormat | None:
    """The format's kind and text, checked for size and shape; whether the grammar engine
    accepts it is decided when it is compiled (the engine names the same field)."""
    kind = g.WhichOneof("response_format")
    if kind is None:
        return None
    where = f"generation.response_format.{kind}"
    if kind == "json_object":
        return ResponseFormat("json_object", field=where)
    if kind == "json_schema":
        text = g.json_schema.schema
        _check_format_text(text, f"{where}.schema")
        _check_nesting(_QUOTED.sub("", text), "{[", "}]", f"{where}.schema",
                       "the schema nests objects and arrays")
        try:
            schema = json.loads(text)
        except ValueError as exc:
            raise RequestError(f"{where}.schema", f"not valid JSON: {exc}") from None
        if not isinstance(schema, dict):
            raise RequestError(f"{where}.schema", f"a JSON Schema must be a JSON object, got "
                                                  f"{type(schema).__name__}")
        return ResponseFormat("json_schema", text, g.json_schema.strict, where)
    if kind == "regex":
        _check_format_text(g.regex, where)
        _check_nesting(_CLASS.sub("", _ESCAPED.sub("", g.regex)), "(", ")", where,
                       "the regex nests groups")
        return ResponseFormat("regex", g.regex, field=where)
    if kind == "choice":
        choices = list(g.choice.choices)
        if not 1 <= len(choices) <= MAX_CHOICES:
            raise RequestError(f"{where}.choices", f"give 1 to {MAX_CHOICES} choices, got "
                                                   f"{len(choices)}")
        for k, c in enumerate(choices):
            if not c or len(c) > MAX_CHOICE_CHARS:
                raise RequestError(f"{where}.choices[{k}]", f"must be 1 to {MAX_CHOICE_CHARS} "
                                                            f"characters, got {len(c)}")
        return ResponseFormat("choice", json.dumps(choices), field=where)
    syntax = g.grammar.WhichOneof("syntax")
    if syntax is None:
        raise RequestError(where, "the grammar has neither lark nor gbnf")
    text = getattr(g.grammar, syntax)
    _check_format_text(text, f"{where}.{syntax}")
    rules = len(_RULE.findall(text))
    if rules > MAX_GRAMMAR_RULES:
        raise RequestError(f"{where}.{syntax}", f"{rules:,} rules, over the limit of "
                                                f"{MAX_GRAMMAR_RULES:,}")
    _check_nesting(_CLASS.sub("", _QUOTED.sub("", _ESCAPED.sub("", text))), "([{", ")]}",
                   f"{where}.{syntax}", "the grammar nests brackets")
    return ResponseFormat(syntax, text, field=f"{where}.{syntax}")


def _check_nesting(text: str, opening: str, closing: str, where: str, what: str) -> None:
    """Depth of the brackets in `text` (strings already removed), without recursion."""
    depth = deepest = 0
    for ch in re.sub(f"[^{re.escape(opening + closing)}]", "", text):  # brackets only
        if ch in opening:
            depth += 1
            deepest = max(deepest, depth)
        elif ch in closing:
            depth = max(0, depth - 1)
    if deepest > MAX_NESTING:
        raise RequestError(where, f"{what} {deepest} levels deep, over the limit of "
                                  f"{MAX_NESTING}")


def _check_format_text(text: str, where: str) -> None:
    if not text:
        raise RequestError(where, "must not be empty")
    if len(text) > MAX_FORMAT_CHARS:
        raise RequestError(where, f"{len(text):,} characters, over the limit of "
                                  f"{MAX_FORMAT_CHARS:,}")


def _vision(v: chat_pb2.VisionConfig, limits: Limits) -> VisionParams:
    tiles = v.max_tiles_per_image or limits.model_max_tiles
    if tiles > limits.max_tiles_per_image:
        raise RequestError("vision.max_tiles_per_image", f"{tiles} is over the limit of "
                                                         f"{limits.max_tiles_per_image}")
    frames = v.max_video_frames or limits.default_video_frames
    if frames > limits.max_video_frames:
        raise RequestError("vision.max_video_frames", f"{frames} is over the limit of "
                                                      f"{limits.max_video_frames}")
    stamps = v.frame_timestamps if v.HasField("frame_timestamps") else True
    return VisionParams(max_tiles_per_image=tiles, max_video_frames=frames,
                        frame_timestamps=stamps)


def usage_pb(u: Usage) -> chat_pb2.Usage:
    return chat_pb2.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                          vision_tokens=u.vision_tokens, image_tiles=u.image_tiles,
                          video_frames=u.video_frames, cached_tiles=u.cached_tiles,
                          cached_prompt_tokens=u.cached_prompt_tokens)


def timing_pb(t: Timing) -> chat_pb2.Timing:
    return chat_pb2.Timing(queue_ms=t.queue_ms, preprocess_ms=t.preprocess_ms,
                           prefill_ms=t.prefill_ms, decode_ms=t.decode_ms)


def logprobs_pb(items: tuple[TokenLogprob, ...] | list[TokenLogprob]
                ) -> list[chat_pb2.TokenLogprob]:
    return [chat_pb2.TokenLogprob(
        token_id=t.token_id, token=t.token_bytes.decode("utf-8", "replace"),
        token_bytes=t.token_bytes, logprob=t.logprob,
        top_logprobs=[chat_pb2.TopLogprob(token_id=i, token=b.decode("utf-8", "replace"),
                                          token_bytes=b, logprob=v) for i, b, v in t.top])
        for t in items]


def to_response(rid: str, done: Finished,
                logprobs: list[TokenLogprob] = ()) -> chat_pb2.ChatResponse:
    return chat_pb2.ChatResponse(request_id=rid, text=done.text,
                                 finish_reason=_FINISH[done.reason], usage=usage_pb(done.usage),
                                 timing=timing_pb(done.timing), adjustments=done.adjustments,
                                 stop_sequence=done.stop_sequence,
                                 logprobs=logprobs_pb(logprobs))


def delta_chunk(rid: str, delta: Delta) -> chat_pb2.StreamChatResponse:
    return chat_pb2.StreamChatResponse(request_id=rid, text=delta.text,
                                       logprobs=logprobs_pb(delta.logprobs))


def final_chunk(rid: str, done: Finished, text: str = "") -> chat_pb2.StreamChatResponse:
    return chat_pb2.StreamChatResponse(
        request_id=rid, text=text, finish_reason=_FINISH[done.reason],
        usage=usage_pb(done.usage), timing=timing_pb(done.timing),
        adjustments=done.adjustments, stop_sequence=done.stop_sequence)
