"""The ChatService servicer: convert the request, one engine call, convert the result."""
from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn, Protocol

import grpc
from eagle.v1 import chat_pb2, chat_pb2_grpc

from service import __version__, converters, logs
from service.engine.job import Delta, Finished, Trace, Unavailable
from service.errors import RequestError, classify, rich_status
from service.ledger import NoLedger
from service.metrics import Metrics
from service.quotas import Quotas
from service.tenants import TenantPolicy, Tenants, from_settings

if TYPE_CHECKING:  # the server process does not import torch when the engine is a child
    from service.engine.interface import Engine
    from service.tracing import Tracing

log = logging.getLogger(__name__)


@dataclass
class ServingState:
    """Whether new requests are taken: false while warming up and while draining."""

    ready: bool = False
    draining: bool = False

    def check(self) -> None:
        if self.draining:
            raise Unavailable("the server is shutting down; retry on another replica")
        if not self.ready:
            raise Unavailable("the server is warming up; retry shortly")


@dataclass(frozen=True)
class Undecodable:
    """Request bytes that did not parse as the method's request message."""

    why: str
    message: str = "ChatRequest"


# The metadata key a mesh uses for request ids (Envoy sets and forwards it); taken when the
# request's own request_id is empty, and sent back in the trailing metadata of every call.
REQUEST_ID_KEY = "x-request-id"
# gRFC A6: a client whose retry policy covers the status waits this many milliseconds before
# its next attempt (a negative value: no retry).
PUSHBACK_KEY = "grpc-retry-pushback-ms"


def _metadata_value(context: grpc.aio.ServicerContext, key: str) -> str:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode("ascii", "replace")
    return ""


class CallContext(Protocol):
    """What the servicer needs of a call's transport: gRPC (`GrpcContext`) and HTTP, Connect
    and gRPC-Web (`service.http`) each give it, so every rule is written once, here."""

    peer: str

    def header(self, key: str) -> str:
        """A request header (gRPC metadata) by its lower-case name; "" when absent."""

    def time_remaining(self) -> float | None:
        """Seconds left of the client's deadline, None when it sent none."""

    def set_trailer(self, key: str, value: str) -> None:
        """Sent back with the reply, success or error (gRPC trailing metadata)."""

    def common_name(self) -> str:
        """The client certificate's common name under mutual TLS, else ""."""

    async def abort(self, code: grpc.StatusCode, message: str, field: str, retry_ms: int,
                    extra: tuple[tuple[str, str], ...]) -> NoReturn:
        """End the call with this status, its details (field, retry) and extra trailers."""


class GrpcContext:
    """CallContext over grpc.aio's ServicerContext."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self.context = context
        # read now: grpc.aio crashes (a segfault) on peer() once a cancelled call has ended
        self.peer = context.peer()

    def header(self, key: str) -> str:
        return _metadata_value(self.context, key)

    def time_remaining(self) -> float | None:
        return self.context.time_remaining()

    def set_trailer(self, key: str, value: str) -> None:
        self.context.set_trailing_metadata(((key, value),))

    def common_name(self) -> str:
        try:
            found = (self.context.auth_context() or {}).get("x509_common_name") or ()
        except Exception:  # noqa: BLE001 - a transport without an auth context
            found = ()
        if not found:
            return ""
        return found[0].decode("utf-8", "replace") if isinstance(found[0], bytes) \
            else str(found[0])

    async def abort(self, code: grpc.StatusCode, message: str, field: str, retry_ms: int,
                    extra: tuple[tuple[str, str], ...]) -> NoReturn:
        await self.context.abort_with_status(rich_status(code, message, field, retry_ms,
                                                         extra))


class _Call:
    """Bookkeeping of one Chat/StreamChat RPC: id, timing, metrics, cancellation, one log line."""

    def __init__(self, owner: ChatServicer, method: str, context: CallContext):
        self.owner, self.method, self.context = owner, method, context
        self.peer = context.peer
        self.start = time.monotonic()
        self.code = "CANCELLED"  # until proven otherwise: a client that goes away
        self.rid = ""
        self.stream = None
        self.first = 0.0
        self.done: Finished | None = None
        self.logprobs: list = []  # Chat's, gathered from the deltas
        self._token = None
        self.tenant = owner.tenant_of(context)
        self._quota = False  # counted in the tenant's quotas (released at close)
        self.span = owner.tracing.current_span() if owner.tracing is not None else None

    def submit(self, request: converters.AnyChatRequest | Undecodable):
        self.owner.metrics.active.inc()
        self.owner.calls += 1
        self.owner.active += 1
        if isinstance(request, Undecodable):
            raise RequestError("request", f"the message is not a valid eagle.v1."
                                          f"{request.message} ({request.why[:200]})")
        self.rid = converters.request_id(request, self.context.header(REQUEST_ID_KEY))
        self.context.set_trailer(REQUEST_ID_KEY, self.rid)
        self._token = logs.request_id.set(self.rid)
        self.owner.ledger.write("accepted", self.rid, method=self.method)
        self.owner.state.check()
        remaining = self.context.time_remaining()
        if remaining is None:  # no deadline from the client: the server's default applies
            remaining = self.owner.default_deadline_s
        job = converters.to_job(request, self.owner.limits, self.rid, remaining,
                                self.tenant.name,
                                self.context.header(converters.PRIORITY_KEY))
        if self.span is not None and self.span.is_recording():
            self.span.set_attributes({"eagle.request_id": self.rid,
                                      "eagle.tenant": self.tenant.name,
                                      "eagle.priority": job.priority})
            job.traced = True
        self.owner.quotas.admit(self.tenant)
        self._quota = True
        self.stream = self.owner.engine.submit(job)
        return self.stream

    def traced(self, event: Trace) -> None:
        self.owner.tracing.record(self.span, event.stages)

    def saw_text(self) -> None:
        if not self.first:
            self.first = time.monotonic()
            self.owner.metrics.ttft.labels(self.tenant.label).observe(self.first - self.start)

    def finished(self, done: Finished) -> None:
        self.done, self.code = done, "OK"
        m = self.owner.metrics
        m.prompt_tokens.labels(self.tenant.label).inc(done.usage.prompt_tokens)
        m.completion_tokens.labels(self.tenant.label).inc(done.usage.completion_tokens)
        m.queue.labels(self.tenant.label).observe(done.timing.queue_ms / 1000)
        m.vision_tiles.inc(done.usage.image_tiles + done.usage.video_frames)
        if self.span is not None:
            u = done.usage
            self.span.set_attributes({
                "eagle.finish_reason": done.reason.value, "eagle.prompt_tokens": u.prompt_tokens,
                "eagle.completion_tokens": u.completion_tokens, "eagle.image_tiles": u.image_tiles,
                "eagle.video_frames": u.video_frames, "eagle.cached_tiles": u.cached_tiles,
                "eagle.cached_prompt_tokens": u.cached_prompt_tokens})

    async def fail(self, exc: Exception) -> None:
        code, message, field = classify(exc)
        self.code = code.name
        retry = 1000 if code is grpc.StatusCode.UNAVAILABLE else 0
        extra = ((REQUEST_ID_KEY, self.rid),) if self.rid else ()
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            # gRPC's retry policy waits this long before trying again (-1: do not retry),
            # for clients whose policy retries RESOURCE_EXHAUSTED, as this library's does
            pushback = getattr(exc, "retry_ms", 0) or 1000
            retry = max(0, pushback)
            extra += ((PUSHBACK_KEY, str(pushback)),)
            limit = getattr(exc, "limit", "capacity" if pushback > 0 else "memory")
            self.owner.metrics.refusals.labels(self.tenant.label, limit).inc()
        if self.span is not None:  # abort_with_status bypasses the instrumentation's context
            self.owner.tracing.failed(self.span, code, message)
        await self.context.abort(code, message, field, retry, extra)

    def close(self) -> None:
        if self.stream is not None and not self.stream.done.is_set():
            self.stream.cancel()  # the client went away or the deadline hit: free the job
            self.owner.engine.cancel(self.rid)
        elapsed = time.monotonic() - self.start
        m = self.owner.metrics
        m.active.dec()
        self.owner.active -= 1
        m.requests.labels(self.method, self.code, self.tenant.label).inc()
        m.latency.labels(self.method).observe(elapsed)
        extra = {"method": self.method, "code": self.code, "ms": round(elapsed * 1000, 1),
                 "peer": self.peer, "tenant": self.tenant.name}
        used = 0
        if self.done is not None:
            extra.update(prompt_tokens=self.done.usage.prompt_tokens,
                         completion_tokens=self.done.usage.completion_tokens)
            used = self.done.usage.prompt_tokens + self.done.usage.completion_tokens
        if self._quota:
            self.owner.quotas.release(self.tenant.name, used)
        log.info("rpc done", extra=extra)
        if self.rid:
            self.owner.ledger.write("terminal", self.rid, code=self.code)
        if self._token is not None:
            try:
                logs.request_id.reset(self._token)
            except ValueError:  # a cancelled stream's generator is closed by asyncio's
                pass  # finaliser in a context of its own; the one it was set in is gone


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    """Thin: every rule lives in converters, the engine and the error table."""

    def __init__(self, engine: Engine, limits: converters.Limits, metrics: Metrics,
                 state: ServingState, info: dict[str, int],
                 default_deadline_s: float = 600.0, ledger=None,
                 tracing: Tracing | None = None, tenants: Tenants | None = None,
                 quotas: Quotas | None = None) -> None:
        self.engine, self.limits, self.metrics, self.state = engine, limits, metrics, state
        self.tracing = tracing
        self.tenants = tenants or from_settings("", client_ca=False)  # `default` alone
        self.quotas = quotas or Quotas()
        self.info = info
        self.default_deadline_s = default_deadline_s
        self.ledger = ledger or NoLedger()
        self.calls = 0  # Chat/StreamChat calls started, and those not yet ended
        self.active = 0

    # the gRPC methods: the contract's names over the transport-neutral ones below
    async def Chat(self, request: chat_pb2.ChatRequest,  # noqa: N802 (the contract's name)
                   context: grpc.aio.ServicerContext) -> chat_pb2.ChatResponse:
        return await self.chat(request, GrpcContext(context))

    async def StreamChat(self, request: chat_pb2.StreamChatRequest,  # noqa: N802
                         context: grpc.aio.ServicerContext
                         ) -> AsyncIterator[chat_pb2.StreamChatResponse]:
        chunks = self.stream_chat(request, GrpcContext(context))
        try:
            async for chunk in chunks:
                yield chunk
        finally:  # a cancelled call ends the job now, not when the generator is collected
            await chunks.aclose()

    async def GetModelInfo(self, request: chat_pb2.GetModelInfoRequest,  # noqa: N802
                           context: grpc.aio.ServicerContext
                           ) -> chat_pb2.GetModelInfoResponse:
        return self.model_info(GrpcContext(context))

    async def chat(self, request: chat_pb2.ChatRequest | Undecodable,
                   context: CallContext) -> chat_pb2.ChatResponse:
        call = _Call(self, "Chat", context)
        try:
            async for event in call.submit(request):
                if isinstance(event, Finished):
                    call.finished(event)
                    return converters.to_response(call.rid, event, call.logprobs)
                if isinstance(event, Trace):
                    call.traced(event)
                else:
                    call.saw_text()
                    call.logprobs.extend(event.logprobs)
            raise RuntimeError("the engine ended a job without a final event")
        except Exception as exc:  # mapped once, in service.errors
            await call.fail(exc)
        finally:
            call.close()

    async def stream_chat(self, request: chat_pb2.StreamChatRequest | Undecodable,
                          context: CallContext
                          ) -> AsyncIterator[chat_pb2.StreamChatResponse]:
        call = _Call(self, "StreamChat", context)
        try:
            async for event in call.submit(request):
                if isinstance(event, Delta):
                    call.saw_text()
                    yield converters.delta_chunk(call.rid, event)
                elif isinstance(event, Trace):
                    call.traced(event)
                else:
                    call.finished(event)
                    yield converters.final_chunk(call.rid, event)
                    return
            raise RuntimeError("the engine ended a job without a final event")
        except Exception as exc:
            await call.fail(exc)
        finally:
            call.close()

    def model_info(self, context: CallContext) -> chat_pb2.GetModelInfoResponse:
        info = self.engine.info()
        return chat_pb2.GetModelInfoResponse(
            model_name=info.model_name, model_type=info.model_type,
            context_length=info.context_length, tokens_per_tile=info.tokens_per_tile,
            tile_size=info.tile_size, max_tiles_per_image=self.limits.max_tiles_per_image,
            max_video_frames=self.limits.max_video_frames,
            max_images_per_request=self.limits.max_images,
            max_new_tokens=self.limits.max_new_tokens, device=info.device,
            max_request_bytes=self.info["max_request_bytes"], server_version=__version__,
            kv_block_size=info.kv_block_size, kv_cache_blocks=info.kv_blocks,
            tenant=self.tenant_info(self.tenant_of(context)))

    def tenant_of(self, context: CallContext) -> TenantPolicy:
        """The caller's tenant: by its bearer token (the transport has checked it), by its
        client certificate's common name under mutual TLS, else `default`."""
        name = "" if self.tenants.auth else context.common_name()
        return self.tenants.identify(context.header("authorization"), name)

    def tenant_info(self, tenant: TenantPolicy) -> chat_pb2.TenantInfo:
        """What the caller may use of this replica and what it uses now."""
        return chat_pb2.TenantInfo(
            name=tenant.name, weight=tenant.weight,
            max_queue=tenant.max_queue or self.info.get("max_queue", 0),
            max_in_flight=tenant.max_in_flight, tokens_per_minute=tenant.tokens_per_minute,
            in_flight=self.quotas.in_flight(tenant.name),
            tokens_last_minute=self.quotas.tokens_last_minute(tenant.name))
