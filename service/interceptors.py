"""Server interceptors: bearer-token authentication for unary and streaming methods alike."""
from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

import grpc

# Kubernetes' gRPC probes cannot send a token; health tells nothing secret.
_OPEN = ("/grpc.health.v1.Health/",)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks `authorization: Bearer <token>` in constant time; never logs the token."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(_OPEN):
            return await continuation(details)
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        sent_bytes = sent.encode() if isinstance(sent, str) else bytes(sent)
        if hmac.compare_digest(sent_bytes, self._expected):
            return await continuation(details)
        handler = await continuation(details)
        why = ("missing authorization metadata: send 'authorization: Bearer <token>'"
               if not sent else "the bearer token is not valid")
        return _deny(handler, why)


def _deny(handler: grpc.RpcMethodHandler | None, why: str) -> grpc.RpcMethodHandler:
    """A handler of the same cardinality as the real one that aborts UNAUTHENTICATED."""

    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

    async def stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
        yield  # pragma: no cover (makes this an async generator)

    streaming = handler is not None and handler.response_streaming
    if handler is not None and handler.request_streaming:
        raise NotImplementedError("no client-streaming methods are served")
    kwargs = {}
    if handler is not None:
        kwargs = {"request_deserializer": handler.request_deserializer,
                  "response_serializer": handler.response_serializer}
    if streaming:
        return grpc.unary_stream_rpc_method_handler(stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
