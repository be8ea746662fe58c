"""The chat service over HTTP: the Connect protocol (JSON or binary, unary as a plain POST,
server streaming as enveloped frames) and gRPC-Web, from the official Connect library on
uvicorn, in the server's own process and event loop, over the same servicer as the gRPC
port. Plus `GET /healthz` and `GET /readyz` for load balancers that only speak HTTP.

Only the transport is here: every rule (limits, tenants, quotas, request ids, deadlines,
errors, metrics) is the servicer's, reached through `ConnectContext`, its CallContext."""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import grpc
from connectrpc.code import Code
from connectrpc.codec import Codec
from connectrpc.compat import google_protobuf_binary_codec
from connectrpc.errors import ConnectError
from eagle.v1 import chat_pb2
from eagle.v1.chat_connect import ChatServiceASGIApplication
from google.protobuf import json_format
from protobuf.wkt import Any as ConnectAny

from service.errors import bounded, status_details
from service.interceptors import denial
from service.servicer import ChatServicer, ServingState

if TYPE_CHECKING:
    from connectrpc.request import RequestContext

    from service.tenants import Tenants

log = logging.getLogger(__name__)

# base64 in JSON makes a message's bytes a third longer: the body a JSON request may send
# for the same media the gRPC port takes (--max-request-bytes), plus room for the text
JSON_GROWTH = 4 / 3
JSON_SLACK = 64 * 1024


class JsonCodec(Codec):
    """proto3 JSON on one line (the library's indents it, which a stream of frames pays for
    in every frame) and strict: a field the contract does not have is refused with its name
    (a misspelt `maxNewToken` must not be dropped in silence)."""

    def name(self) -> str:
        return "json"

    def encode(self, message) -> bytes:
        return json.dumps(json_format.MessageToDict(message), ensure_ascii=False,
                          separators=(",", ":")).encode()

    def decode(self, data: bytes | bytearray, message_class):
        message = message_class()
        try:
            json_format.Parse(bytes(data), message, ignore_unknown_fields=False)
        except json_format.ParseError as exc:
            raise ConnectError(Code.INVALID_ARGUMENT, bounded(
                f"the body is not a valid {message_class.DESCRIPTOR.full_name} in proto3 "
                f"JSON: {exc}")) from None
        return message


class ConnectContext:
    """The servicer's CallContext over a Connect (or gRPC-Web) request."""

    def __init__(self, ctx: RequestContext) -> None:
        self.ctx = ctx
        self.peer = f"http:{ctx.client_address or 'unknown'}"

    def header(self, key: str) -> str:
        return self.ctx.request_headers.get(key, "") or ""

    def time_remaining(self) -> float | None:
        remaining = self.ctx.timeout_ms
        return None if remaining is None else max(0.0, remaining / 1000)

    def set_trailer(self, key: str, value: str) -> None:
        # in the headers too: a unary Connect reply has no trailers of its own (they travel
        # as `trailer-` headers), and `curl -i` should show the request id
        self.ctx.response_headers[key] = value
        self.ctx.response_trailers[key] = value

    def common_name(self) -> str:
        return ""  # not read on this port (the settings refuse mTLS tenants without tokens)

    async def abort(self, code: grpc.StatusCode, message: str, field: str, retry_ms: int,
                    extra: tuple[tuple[str, str], ...]) -> NoReturn:
        for key, value in extra:
            self.set_trailer(key, value)
        if retry_ms > 0:  # HTTP's own form of the wait, for clients that know no RetryInfo
            self.ctx.response_headers["retry-after"] = str(max(1, math.ceil(retry_ms / 1000)))
        message = bounded(message)
        details = [ConnectAny(type_url=d.type_url, value=d.value)
                   for d in status_details(message, field, retry_ms)]
        raise ConnectError(connect_code(code), message, details)


def connect_code(code: grpc.StatusCode) -> Code:
    """The Connect code of a gRPC status code (the same seventeen, named alike but for
    CANCELLED, which Connect spells CANCELED)."""
    return Code.CANCELED if code is grpc.StatusCode.CANCELLED else Code[code.name]


class ConnectChat:
    """eagle.v1.ChatService for the Connect library: authentication as the gRPC port's
    interceptor does it, then the servicer."""

    def __init__(self, servicer: ChatServicer, tenants: Tenants) -> None:
        self.servicer, self.tenants = servicer, tenants

    def _authenticate(self, ctx: RequestContext) -> None:
        if self.tenants.auth:
            why = denial(self.tenants, ctx.request_headers.get("authorization", "") or "")
            if why:
                raise ConnectError(Code.UNAUTHENTICATED, why)

    async def chat(self, request: chat_pb2.ChatRequest,
                   ctx: RequestContext) -> chat_pb2.ChatResponse:
        self._authenticate(ctx)
        return await self.servicer.chat(request, ConnectContext(ctx))

    async def stream_chat(self, request: chat_pb2.StreamChatRequest,
                          ctx: RequestContext) -> AsyncIterator[chat_pb2.StreamChatResponse]:
        self._authenticate(ctx)
        chunks = self.servicer.stream_chat(request, ConnectContext(ctx))
        try:
            async for chunk in chunks:
                yield chunk
        finally:  # a closed connection ends the job now (the library cancels this task)
            await chunks.aclose()

    async def get_model_info(self, request: chat_pb2.GetModelInfoRequest,
                             ctx: RequestContext) -> chat_pb2.GetModelInfoResponse:
        self._authenticate(ctx)
        return self.servicer.model_info(ConnectContext(ctx))


class HttpApp:
    """The ASGI application of the HTTP port: the chat service under /eagle.v1.ChatService/,
    the playground at /, health under /healthz (alive) and /readyz (takes new calls), 404
    elsewhere."""

    def __init__(self, servicer: ChatServicer, tenants: Tenants, state: ServingState,
                 alive, max_request_bytes: int) -> None:
        self.chat = ChatServiceASGIApplication(
            ConnectChat(servicer, tenants),
            read_max_bytes=int(max_request_bytes * JSON_GROWTH) + JSON_SLACK,
            codecs=[google_protobuf_binary_codec(), JsonCodec()])
        self.prefix = self.chat.path + "/"
        self.state, self.alive = state, alive

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path.startswith(self.prefix):
            await self.chat(scope, receive, send)
        elif path in STATIC and scope["method"] in ("GET", "HEAD"):
            await _static(send, *STATIC[path], head=scope["method"] == "HEAD")
        elif path == "/favicon.ico":  # browsers ask for it: no icon, and no 404 logged
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
        elif path in ("/healthz", "/readyz") and scope["method"] in ("GET", "HEAD"):
            if path == "/healthz":
                ok, why = self.alive(), "the engine is wedged"
            else:
                ok = self.state.ready and not self.state.draining and self.alive()
                why = ("draining" if self.state.draining else
                       "warming up" if not self.state.ready else "the engine is wedged")
            await _text(send, 200 if ok else 503, "ok\n" if ok else f"not ready: {why}\n",
                        head=scope["method"] == "HEAD")
        else:
            await _text(send, 404, f"no such path: {path} (the chat service is at "
                                   f"{self.prefix}Chat, StreamChat and GetModelInfo)\n")


# The playground (GET /): a page and its script, bundled from clients/ts by `make web`.
_STATIC_DIR = Path(__file__).parent / "static"
STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/index.html": ("index.html", "text/html; charset=utf-8"),
          "/playground.js": ("playground.js", "text/javascript; charset=utf-8")}
# the page runs only its own script and talks only to this origin; media previews are blobs
_CSP = (b"default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; "
        b"connect-src 'self'; img-src 'self' blob:; media-src 'self' blob:; "
        b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@functools.cache
def _static_bytes(name: str) -> bytes:
    return (_STATIC_DIR / name).read_bytes()  # read once: the files change only by a release


async def _static(send, name: str, kind: str, head: bool) -> None:
    data = _static_bytes(name)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", kind.encode()),
                            (b"content-length", str(len(data)).encode()),
                            (b"cache-control", b"no-cache"),
                            (b"x-content-type-options", b"nosniff"),
                            (b"content-security-policy", _CSP)]})
    await send({"type": "http.response.body", "body": b"" if head else data})


# What a browser page on another origin may send and read (Connect's and gRPC-Web's own
# headers, and this service's): the preflight's answer and the headers exposed to scripts.
CORS_REQUEST_HEADERS = ("content-type", "connect-protocol-version", "connect-timeout-ms",
                        "grpc-timeout", "x-grpc-web", "x-user-agent", "authorization",
                        "x-request-id", "x-eagle-priority", "traceparent", "tracestate")
CORS_EXPOSED_HEADERS = ("grpc-status", "grpc-message", "grpc-status-details-bin",
                        "x-request-id", "retry-after", "grpc-retry-pushback-ms")


def cors(app, origins: list[str]):
    """`app` answering cross-origin calls from `origins` (Starlette's CORS middleware)."""
    from starlette.middleware.cors import CORSMiddleware

    return CORSMiddleware(app, allow_origins=origins, allow_methods=("GET", "POST"),
                          allow_headers=CORS_REQUEST_HEADERS,
                          expose_headers=CORS_EXPOSED_HEADERS, max_age=7200)


async def _lifespan(receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _text(send, status: int, body: str, head: bool = False) -> None:
    data = body.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": b"" if head else data})


class HttpServer:
    """uvicorn serving `HttpApp` on the running event loop (the gRPC server's), started and
    stopped with it."""

    def __init__(self, app, host: str, port: int,
                 tls: tuple[str, str, str] | None = None) -> None:
        import ssl

        import uvicorn

        secure = {}
        if tls is not None:  # the gRPC port's certificate and, for mutual TLS, its CA
            cert, key, client_ca = tls
            secure = {"ssl_certfile": cert, "ssl_keyfile": key}
            if client_ca:
                secure.update(ssl_ca_certs=client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        self.config = uvicorn.Config(app, host=host, port=port, log_config=None,
                                     access_log=False, lifespan="off",
                                     timeout_graceful_shutdown=None, **secure)
        self.server = uvicorn.Server(self.config)
        self.server.install_signal_handlers = lambda: None  # the gRPC server owns signals
        self._task: asyncio.Task | None = None
        self.port = port

    async def start(self) -> int:
        self._task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            if self._task.done():  # it could not bind (uvicorn logs why and exits)
                try:
                    self._task.result()
                except BaseException as exc:  # noqa: BLE001 - uvicorn's SystemExit(1)
                    raise OSError(f"the HTTP port {self.port} could not be opened") from exc
                raise OSError(f"the HTTP port {self.port} could not be opened")
            await asyncio.sleep(0.01)
        sockets = [s for server in self.server.servers for s in server.sockets]
        self.port = sockets[0].getsockname()[1] if sockets else self.port
        return self.port

    async def stop(self, grace: float) -> None:
        if self._task is None:
            return
        self.config.timeout_graceful_shutdown = grace
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace + 5)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            self.server.force_exit = True
