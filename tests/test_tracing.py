"""OpenTelemetry: one request gives the RPC span (continuing the caller's traceparent) and a
child span per stage, with their attributes, whether the engine runs here or in its own
process. Spans go to an in-memory exporter."""
from __future__ import annotations

import signal
import time

import factory
import grpc
import pytest
from eagle.v1 import chat_pb2, chat_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import RunningServer, free_port
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from service.tracing import Tracing, wanted

TRACE_ID, PARENT_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
PHOTO = factory.encode(factory.photo(1000, 500), "JPEG")
STAGES = {"eagle.preprocess", "eagle.queue", "eagle.vision", "eagle.prefill", "eagle.decode"}


@pytest.fixture()
def traced():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider), exporter


def chat_with_image(target: str, tokens: int = 3, image: bytes = PHOTO, **kw):
    req = chat_pb2.ChatRequest(request_id="traced-1", generation=chat_pb2.GenerationConfig(
        max_new_tokens=tokens, ignore_eos=True))
    msg = req.messages.add(role=chat_pb2.ROLE_USER)
    msg.parts.add(image=chat_pb2.Image(data=image))
    msg.parts.add(text="What is in this picture?")
    with grpc.insecure_channel(target) as channel:
        return chat_pb2_grpc.ChatServiceStub(channel).Chat(
            req, timeout=60, metadata=(("traceparent", TRACEPARENT),), **kw)


def finished(exporter, timeout: float = 5.0):
    """The spans once the RPC span has ended: the client may see the status a moment before
    the server's handler has returned."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        spans = exporter.get_finished_spans()
        if any(s.name.startswith("/eagle.v1.") for s in spans):
            return spans
        time.sleep(0.01)
    raise AssertionError(f"no RPC span after {timeout} s: {[s.name for s in spans]}")


def check_tree(spans, reply) -> None:
    """The RPC span continues the caller's trace; every stage is its child (decode and
    tiling under preprocessing), inside its time, in order, with the request's figures."""
    [rpc] = [s for s in spans if s.name == "/eagle.v1.ChatService/Chat"]
    assert rpc.kind is SpanKind.SERVER
    assert format(rpc.context.trace_id, "032x") == TRACE_ID
    assert format(rpc.parent.span_id, "016x") == PARENT_ID and rpc.parent.is_remote
    assert {format(s.context.trace_id, "032x") for s in spans} == {TRACE_ID}
    children = {s.name: s for s in spans if s.parent and s.parent.span_id == rpc.context.span_id}
    assert set(children) == STAGES
    pre = children["eagle.preprocess"]
    under = sorted(s.name for s in spans if s.parent and s.parent.span_id == pre.context.span_id)
    assert under == ["eagle.media.decode", "eagle.tiling"]
    for span in spans:
        if span is not rpc:
            assert rpc.start_time <= span.start_time <= span.end_time <= rpc.end_time, span.name
    order = [children[n] for n in ("eagle.preprocess", "eagle.queue", "eagle.prefill",
                                   "eagle.decode")]
    assert all(a.end_time <= b.start_time for a, b in zip(order, order[1:]))
    u = reply.usage
    tiling = next(s for s in spans if s.name == "eagle.tiling")
    decode = next(s for s in spans if s.name == "eagle.media.decode")
    assert tiling.attributes["eagle.tiles"] == u.image_tiles == 3
    assert (decode.attributes["eagle.format"], decode.attributes["eagle.width"]) == ("JPEG", 1000)
    assert pre.attributes["eagle.image_tiles"] == 3
    assert children["eagle.vision"].attributes["eagle.tiles"] == 3
    assert children["eagle.prefill"].attributes["eagle.prompt_tokens"] == u.prompt_tokens
    assert dict(children["eagle.decode"].attributes) == {
        "eagle.completion_tokens": 3, "eagle.finish_reason": "length"}
    assert rpc.attributes["eagle.request_id"] == "traced-1"
    assert (rpc.attributes["eagle.tenant"], rpc.attributes["eagle.priority"]) == \
        ("default", "interactive")
    assert rpc.attributes["eagle.finish_reason"] == "length"
    assert rpc.attributes["eagle.completion_tokens"] == 3
    assert rpc.status.status_code is not StatusCode.ERROR


def test_one_request_yields_the_span_tree(tiny, traced) -> None:
    from conftest import make_engine

    tracing, exporter = traced
    engine = make_engine(tiny)
    try:
        with RunningServer(engine, tracing=tracing) as srv:
            exporter.clear()  # the warm-up is not a traced call
            reply = chat_with_image(srv.target)
            check_tree(finished(exporter), reply)
            exporter.clear()
            with grpc.insecure_channel(srv.target) as channel:  # probes make no spans
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert exporter.get_finished_spans() == ()
    finally:
        engine.drain(0)


def test_the_engine_process_stages_join_the_trace(tiny_dir, traced) -> None:
    from service.engine_process import EngineProcess
    from service.settings import Settings

    tracing, exporter = traced
    engine = EngineProcess(Settings(cache_dir=str(tiny_dir.parent), video_workers=0,
                                    log_level="WARNING"))
    try:
        with RunningServer(engine, tracing=tracing) as srv:
            exporter.clear()
            reply = chat_with_image(srv.target)
            check_tree(finished(exporter), reply)
    finally:
        engine.drain(0)


def test_a_failed_request_marks_its_spans(traced, tiny) -> None:
    from conftest import make_engine

    tracing, exporter = traced
    engine = make_engine(tiny)
    try:
        with RunningServer(engine, tracing=tracing) as srv:
            exporter.clear()
            with pytest.raises(grpc.RpcError) as info:
                chat_with_image(srv.target, image=PHOTO[: len(PHOTO) // 2])
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            spans = {s.name: s for s in finished(exporter)}
            rpc = spans["/eagle.v1.ChatService/Chat"]
            assert rpc.status.status_code is StatusCode.ERROR
            assert rpc.status.description == f"INVALID_ARGUMENT: {info.value.details()}"
            assert rpc.attributes["rpc.grpc.status_code"] == 3
            assert spans["eagle.preprocess"].status.status_code is StatusCode.ERROR
            assert spans["eagle.media.decode"].status.description == "MediaError"
            assert "eagle.decode" not in spans
    finally:
        engine.drain(0)


@pytest.mark.parametrize("env,on", [
    ({}, False),
    ({"OTEL_TRACES_EXPORTER": "none"}, False),
    ({"OTEL_TRACES_EXPORTER": "console"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_SDK_DISABLED": "true"}, False),
])
def test_tracing_is_off_unless_the_otel_variables_ask(env, on) -> None:
    assert wanted(env) is on
    assert (Tracing.from_env(env) is not None) is on


def test_an_unknown_exporter_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="OTEL_TRACES_EXPORTER='zipkin' is not supported"):
        Tracing.from_env({"OTEL_TRACES_EXPORTER": "zipkin"})


def test_the_server_process_exports_the_trace_over_otlp(tiny_dir) -> None:
    """`eagle-serve` with only the standard variables set: the whole tree, engine-process
    stages included, reaches an OTLP collector (a fake one here) under the caller's trace."""
    from concurrent import futures

    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
    from test_process import _wait_serving, serve

    received: list = []

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):  # noqa: N802 (OTLP's name)
            received.append(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    collector = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), collector)
    port = collector.add_insecure_port("127.0.0.1:0")
    collector.start()
    proc, target = serve(tiny_dir, "--warmup", "false", env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true", "OTEL_BSP_SCHEDULE_DELAY": "50",
        "OTEL_SERVICE_NAME": "eagle-under-test"})
    try:
        _wait_serving(target, proc)
        chat_with_image(target)
        end, names = time.monotonic() + 20, set()
        while time.monotonic() < end and "eagle.decode" not in names:
            time.sleep(0.05)
            spans = [(rs, s) for r in list(received) for rs in r.resource_spans
                     for ss in rs.scope_spans for s in ss.spans]
            names = {s.name for _, s in spans}
        assert names == STAGES | {"/eagle.v1.ChatService/Chat", "eagle.media.decode",
                                  "eagle.tiling"}
        assert {s.trace_id.hex() for _, s in spans} == {TRACE_ID}
        service = {a.value.string_value for rs, _ in spans for a in rs.resource.attributes
                   if a.key == "service.name"}
        assert service == {"eagle-under-test"}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        collector.stop(0)


def test_an_http_request_gets_the_same_span_tree(tiny, traced) -> None:
    """A Connect JSON request to the HTTP port: a server span continuing the caller's
    traceparent, the engine's stages under it, the request's attributes; health unspanned."""
    import base64
    import json
    import urllib.request

    from conftest import make_engine

    tracing, exporter = traced
    engine = make_engine(tiny)
    port = free_port()
    body = {"requestId": "traced-1", "generation": {"maxNewTokens": 3, "ignoreEos": True},
            "messages": [{"role": "ROLE_USER", "parts": [
                {"image": {"data": base64.b64encode(PHOTO).decode()}},
                {"text": "What is in this picture?"}]}]}
    try:
        with RunningServer(engine, tracing=tracing, http_port=port):
            exporter.clear()
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/eagle.v1.ChatService/Chat", method="POST",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json", "traceparent": TRACEPARENT})
            with urllib.request.urlopen(req, timeout=60) as r:
                reply = json.loads(r.read())
            end = time.monotonic() + 5
            while not any(s.kind is SpanKind.SERVER for s in exporter.get_finished_spans()):
                assert time.monotonic() < end, "no server span"
                time.sleep(0.01)
            spans = exporter.get_finished_spans()
            [server] = [s for s in spans if s.kind is SpanKind.SERVER]
            assert server.name == "POST /eagle.v1.ChatService/Chat"
            assert format(server.context.trace_id, "032x") == TRACE_ID
            assert format(server.parent.span_id, "016x") == PARENT_ID
            children = {s.name for s in spans
                        if s.parent and s.parent.span_id == server.context.span_id}
            assert children == STAGES
            assert server.attributes["eagle.request_id"] == "traced-1"
            assert server.attributes["eagle.completion_tokens"] == 3
            assert reply["usage"]["completionTokens"] == 3
            exporter.clear()
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10).read()
            assert exporter.get_finished_spans() == ()
    finally:
        engine.drain(0)
