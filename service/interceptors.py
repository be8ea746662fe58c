"""Server interceptors: bearer-token authentication for unary and streaming methods alike."""
from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc

from service.tenants import Tenants

# Kubernetes' gRPC probes cannot send a token; health tells nothing secret.
_OPEN = ("/grpc.health.v1.Health/",)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks `authorization: Bearer <token>` against the tenants' tokens in constant time
    (the scheme in any case, as HTTP auth schemes are); never logs the token. Every method
    kind is covered: unary, server, client and bidirectional streaming (reflection is the
    last). Every token is compared, so the time taken does not say which matched; which
    tenant it names is the servicer's to find (service.tenants)."""

    def __init__(self, tenants: Tenants) -> None:
        self._tenants = tenants

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(_OPEN):
            return await continuation(details)
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        sent = sent if isinstance(sent, str) else bytes(sent).decode("latin-1")
        why = denial(self._tenants, sent)
        if not why:
            return await continuation(details)
        return _deny(await continuation(details), why)


def denial(tenants: Tenants, sent: str) -> str:
    """Why an `authorization` value (metadata or HTTP header) is refused, "" if it is a
    valid `Bearer <token>`: the one check of both ports."""
    scheme, _, token = sent.strip().partition(" ")
    found = tenants.match(token.strip().encode("latin-1", "replace"))
    if scheme.lower() == "bearer" and found is not None:
        return ""
    return ("missing authorization metadata: send 'authorization: Bearer <token>'"
            if not sent else "the bearer token is not valid")


def _deny(handler: grpc.RpcMethodHandler | None, why: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as the real one (unary or streaming, each way) that aborts
    UNAUTHENTICATED without reading the request."""

    async def respond_once(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

    async def respond_streaming(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
        yield  # pragma: no cover (makes this an async generator)

    kwargs = {}
    if handler is not None:
        kwargs = {"request_deserializer": handler.request_deserializer,
                  "response_serializer": handler.response_serializer}
    requests = handler is not None and handler.request_streaming
    responses = handler is not None and handler.response_streaming
    make = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}[(requests, responses)]
    return make(respond_streaming if responses else respond_once, **kwargs)
