"""Build, start, warm up and gracefully stop the gRPC server around an engine."""
from __future__ import annotations

import asyncio
import io
import logging
import signal
from pathlib import Path

import grpc
import numpy as np
from eagle.v1 import chat_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from PIL import Image

from service import tenants
from service.converters import Limits
from service.engine.job import ChatJob, ChatMessage, ImagePart, Role, SamplingParams, TextPart
from service.interceptors import AuthInterceptor
from service.ledger import Ledger
from service.metrics import Metrics
from service.reflection import add_reflection
from service.runtime import trim_malloc
from service.servicer import ChatServicer, ServingState, Undecodable
from service.settings import Settings

log = logging.getLogger(__name__)
SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
# Health service names: "" and SERVICE say whether new calls are taken (NOT_SERVING while
# warming up, draining, or wedged: readiness, client-side health checking); LIVENESS says
# whether the process should be left running (NOT_SERVING only when the engine is wedged, so
# a liveness probe never kills a replica that is loading its model or draining).
LIVENESS = "liveness"


def chat_handlers(servicer: ChatServicer) -> grpc.GenericRpcHandler:
    """ChatService's handlers, with a request parser that never fails: bytes that are not a
    ChatRequest (invalid UTF-8 in a string field, garbage) reach the servicer as
    Undecodable and get INVALID_ARGUMENT, where grpcio would answer INTERNAL."""

    def parser(message):
        def parse(data: bytes):
            try:
                return message.FromString(data)
            except Exception as exc:  # protobuf's DecodeError; UnicodeDecodeError in strings
                return Undecodable(str(exc) or type(exc).__name__, message.__name__)
        return parse

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Chat": grpc.unary_unary_rpc_method_handler(
            servicer.Chat, parser(chat_pb2.ChatRequest),
            chat_pb2.ChatResponse.SerializeToString),
        "StreamChat": grpc.unary_stream_rpc_method_handler(
            servicer.StreamChat, parser(chat_pb2.StreamChatRequest),
            chat_pb2.StreamChatResponse.SerializeToString),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo, chat_pb2.GetModelInfoRequest.FromString,
            chat_pb2.GetModelInfoResponse.SerializeToString),
    })


def server_options(s: Settings) -> list[tuple[str, int]]:
    """Message size, keepalive and connection-age settings; the client library uses matching
    keepalive ones."""
    opts = [
        ("grpc.max_receive_message_length", s.max_request_bytes),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ("grpc.keepalive_time_ms", s.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", s.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", s.min_ping_interval_ms),
        ("grpc.http2.max_ping_strikes", s.max_ping_strikes),
    ]
    if s.max_connection_age_s > 0:  # GOAWAY at the age: clients reconnect (and rebalance)
        opts += [("grpc.max_connection_age_ms", int(s.max_connection_age_s * 1000)),
                 ("grpc.max_connection_age_grace_ms",
                  int(s.max_connection_age_grace_s * 1000))]
    return opts


class EagleServer:
    """The grpc.aio server with the chat service, health and reflection over one engine."""

    def __init__(self, settings: Settings, engine, metrics: Metrics | None = None,
                 tracing=None) -> None:
        self.settings = settings
        self.tracing = tracing  # service.tracing.Tracing, or None when tracing is off
        self.engine = engine
        self.metrics = metrics or Metrics()
        self.metrics.bind_engine(engine)
        self.state = ServingState()
        self.failed = asyncio.Event()  # set when the engine is wedged
        self._monitor: asyncio.Task | None = None
        self._trimmer: asyncio.Task | None = None
        self.health = health.aio.HealthServicer()
        interceptors = [tracing.interceptor()] if tracing is not None else []
        self.tenants = tenants.from_settings(settings.auth_token, bool(settings.tls_client_ca))
        if self.tenants.auth:  # after tracing: a refused call is traced too
            interceptors.append(AuthInterceptor(self.tenants))
        # every tenant may fill the running slots and its own queue (service.engine.job's
        # Capacity); a tenant the file does not name gets the server's queue
        queues = sum(t.max_queue or settings.max_queue for t in self.tenants.known()
                     if t.name != tenants.DEFAULT)
        rpcs = settings.max_concurrent_rpcs or (settings.max_running + settings.max_queue
                                                + queues + 64)
        self.server = grpc.aio.server(interceptors=interceptors, options=server_options(settings),
                                      maximum_concurrent_rpcs=rpcs)
        limits = Limits.from_settings(settings, engine.info())
        self.ledger = Ledger(settings.ledger_file) if settings.ledger_file else None
        self.servicer = ChatServicer(engine, limits, self.metrics, self.state,
                                     {"max_request_bytes": settings.max_request_bytes,
                                      "max_queue": settings.max_queue},
                                     settings.default_deadline_s, self.ledger, tracing,
                                     self.tenants)
        self.server.add_generic_rpc_handlers((chat_handlers(self.servicer),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        add_reflection(self.server, (SERVICE, health.SERVICE_NAME))
        self.port = self._bind()
        self.http = None  # the chat service over HTTP (service.http), when --http-port
        if settings.http_port:
            from service.http import HttpApp, HttpServer, cors

            app = HttpApp(self.servicer, self.tenants, self.state,
                          lambda: not getattr(self.engine, "wedged", False),
                          settings.max_request_bytes)
            if settings.cors_origins:
                app = cors(app, settings.cors_origins)
            if tracing is not None:
                app = tracing.asgi(app)
            self.http = HttpServer(app, settings.host, settings.http_port,
                                   tls=(settings.tls_cert, settings.tls_key,
                                        settings.tls_client_ca) if settings.tls else None)
        self.health_server = None  # plaintext health for probes beside a TLS port
        if settings.health_port:
            self.health_server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            host = settings.address.rsplit(":", 1)[0]
            self.health_port = self.health_server.add_insecure_port(
                f"{host}:{settings.health_port}")

    def _bind(self) -> int:
        s = self.settings
        if not s.tls:
            return self.server.add_insecure_port(s.address)
        key, cert = Path(s.tls_key).read_bytes(), Path(s.tls_cert).read_bytes()
        ca = Path(s.tls_client_ca).read_bytes() if s.tls_client_ca else None
        creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                            require_client_auth=ca is not None)
        return self.server.add_secure_port(s.address, creds)

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE):
            await self.health.set(name, status)

    async def start(self) -> None:
        """Listen at once, NOT_SERVING until the warm-up request has gone through the model."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()
        if self.http is not None:
            self.http_port = await self.http.start()
        if self.settings.warmup:
            await asyncio.to_thread(warm_up, self.engine)
        self.state.ready = True
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._monitor = asyncio.create_task(self._watch_engine())
        self._trimmer = asyncio.create_task(self._give_memory_back())
        log.info("serving", extra={"address": self.settings.address, "port": self.port})

    async def _watch_engine(self) -> None:
        """NOT_SERVING while the engine process restarts after a crash, SERVING again once it
        is back; a wedged engine (a crash loop) ends the process (exit 3)."""
        serving = True
        while not getattr(self.engine, "wedged", False):
            up = not getattr(self.engine, "restarting", False)
            if up != serving and not self.state.draining:
                serving = up
                await self._set_health(health_pb2.HealthCheckResponse.SERVING if up else
                                       health_pb2.HealthCheckResponse.NOT_SERVING)
                log.warning("the engine is %s", "back: serving" if up else
                            "restarting: not serving")
            await asyncio.sleep(0.1)
        self.state.draining = True
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.failed.set()

    async def _give_memory_back(self, every_s: float = 2.0, trim=trim_malloc) -> None:
        """After a burst, once no call is running: freed heap pages back to the OS (without
        this the process stayed ~30 MB above idle after the image load of `make bench`)."""
        seen = self.servicer.calls
        while True:
            await asyncio.sleep(every_s)
            if self.servicer.calls != seen and not self.servicer.active:
                seen = self.servicer.calls
                await asyncio.to_thread(trim)

    async def stop(self, grace: float | None = None, delay: float | None = None) -> None:
        """Drain: NOT_SERVING and refuse new calls with UNAVAILABLE for `delay` s (clients
        retry them elsewhere, and health-checking clients stop sending), then close the port
        and let running calls finish within `grace`."""
        grace = self.settings.grace_seconds if grace is None else grace
        delay = self.settings.drain_delay_s if delay is None else delay
        for task in (self._monitor, self._trimmer):
            if task is not None:
                task.cancel()
        self.state.draining = True
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        # Closing the port at once would have gRPC cancel the calls it has received but not
        # yet handed to us (clients see CANCELLED, which they must not retry); a moment of
        # clean UNAVAILABLE refusals first lets every client move away.
        await asyncio.sleep(delay)
        if self.http is not None:  # both ports drain at once, within the one grace period
            await asyncio.gather(self.server.stop(grace), self.http.stop(grace))
        else:
            await self.server.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(0)
        await asyncio.to_thread(self.engine.drain, 0)
        if self.ledger is not None:
            self.ledger.close()
        if self.tracing is not None:  # export what is still buffered
            await asyncio.to_thread(self.tracing.shutdown)
        log.info("stopped")


def warm_up(engine) -> None:
    """One small image-and-text request through the whole engine path."""
    buf = io.BytesIO()
    Image.fromarray(np.full((448, 448, 3), 127, np.uint8)).save(buf, "PNG")
    job = ChatJob("warm-up", (ChatMessage(Role.USER, (ImagePart(data=buf.getvalue()),
                                                      TextPart("warm-up"))),),
                  SamplingParams(max_new_tokens=2))
    for _ in engine.submit(job):
        pass


class BackgroundServer:
    """An EagleServer started on an event loop of its own thread: for tests and benchmarks
    that drive the server from plain code. `target`, `app`, `call(coro)`, `stop()`."""

    def __init__(self, settings: Settings, engine, tracing=None) -> None:
        import threading

        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="eagle-server",
                                        daemon=True)
        self._thread.start()
        self.app: EagleServer = self.call(self._build(engine, tracing))
        self.port = self.app.port
        self.target = f"127.0.0.1:{self.port}"

    async def _build(self, engine, tracing) -> EagleServer:
        app = EagleServer(self.settings, engine, tracing=tracing)
        await app.start()
        return app

    def call(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 1.0) -> None:
        self.call(self.app.server.stop(grace))
        if self.app.http is not None:
            self.call(self.app.http.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def serve(settings: Settings, engine, metrics: Metrics | None = None,
                tracing=None) -> int:
    """Run until SIGTERM or SIGINT, then drain within the grace period; returns the exit code."""
    app = EagleServer(settings, engine, metrics, tracing)
    if settings.metrics_port:
        app.metrics.serve(settings.metrics_host, settings.metrics_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.create_task(app.start())
    stopped, failed = asyncio.create_task(stop.wait()), asyncio.create_task(app.failed.wait())
    await asyncio.wait([stopped, failed], return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
    if app.failed.is_set():
        log.error("the engine is wedged: stopping so the supervisor restarts this replica")
        await app.stop(grace=1.0, delay=0.0)
        return 3
    log.info("signal received: draining", extra={"grace_s": settings.grace_seconds})
    await app.stop()
    return 0
