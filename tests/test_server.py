"""End to end over real gRPC on 127.0.0.1 with the tiny model: RPCs, status codes, lifecycle."""
from __future__ import annotations

import threading
import time

import factory
import grpc
import pytest
from conftest import make_engine
from eagle.v1 import chat_pb2, chat_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from harness import RunningServer

from client import AsyncEagleClient, EagleClient, EagleError, Video
from service.engine.job import EngineError

PHOTO = factory.encode(factory.photo(1000, 500), "JPEG")


def stub(target: str) -> chat_pb2_grpc.ChatServiceStub:
    return chat_pb2_grpc.ChatServiceStub(grpc.insecure_channel(target))


def long_text(text: str, tokens: int = 4000) -> chat_pb2.StreamChatRequest:
    """A StreamChat request that generates exactly `tokens` tokens (end-of-turn ignored)."""
    return user_text(text, chat_pb2.StreamChatRequest, max_new_tokens=tokens, ignore_eos=True)


def user_text(text: str, message=chat_pb2.ChatRequest, **gen) -> chat_pb2.ChatRequest:
    req = message(generation=chat_pb2.GenerationConfig(**gen))
    req.messages.add(role=chat_pb2.ROLE_USER).parts.add(text=text)
    return req


def test_chat_and_stream_agree_and_report_usage(server) -> None:
    with EagleClient(server.target) as client:
        whole = client.chat("Describe the image.", images=[PHOTO], max_new_tokens=16,
                            max_tiles_per_image=2, request_id="abc-1")
        stream = client.stream_chat("Describe the image.", images=[PHOTO], max_new_tokens=16,
                                    max_tiles_per_image=2)
        deltas = list(stream)
    assert whole.request_id == "abc-1"
    assert "".join(deltas) == whole.text == stream.result.text and len(deltas) > 1
    assert stream.result.request_id and stream.result.request_id != "abc-1"
    assert whole.finish_reason == "length" and whole.usage.completion_tokens == 16
    assert whole.usage.image_tiles == 3 and whole.usage.vision_tokens == 768
    assert whole.usage.prompt_tokens > 768
    assert whole.timing.prefill_ms > 0 and whole.timing.decode_ms > 0
    assert whole.timing.preprocess_ms > 0


def test_streamed_chunks_put_finish_reason_on_the_last_only(server) -> None:
    chunks = list(stub(server.target).StreamChat(user_text("Hi", chat_pb2.StreamChatRequest, max_new_tokens=8), timeout=30))
    assert [c.finish_reason for c in chunks[:-1]] == [chat_pb2.FINISH_REASON_UNSPECIFIED] * (
        len(chunks) - 1)
    assert chunks[-1].finish_reason == chat_pb2.FINISH_REASON_LENGTH
    assert chunks[-1].usage.completion_tokens == 8 and not chunks[0].HasField("usage")
    assert len({c.request_id for c in chunks}) == 1


def test_model_info(server) -> None:
    with EagleClient(server.target) as client:
        info = client.model_info()
    assert (info.model_name, info.model_type) == ("tiny-v1", "eagle_chat")
    assert info.tokens_per_tile == 256 and info.tile_size == 448
    assert info.context_length == 32768 and info.device == "cpu float32"
    assert info.max_request_bytes == 64 * 1024 * 1024


def test_video_by_reference_and_by_bytes(server, media_root) -> None:
    with EagleClient(server.target) as client:
        by_ref = client.chat("What happens?", videos=[Video(uri="clip.mp4", num_frames=4)],
                             max_new_tokens=4)
        by_bytes = client.chat("What happens?", videos=[
            Video(data=(media_root / "clip.mp4").read_bytes(), num_frames=4)], max_new_tokens=4)
    assert by_ref.usage.video_frames == 4 == by_bytes.usage.video_frames
    assert by_ref.text == by_bytes.text


def _fails(target: str, req: chat_pb2.ChatRequest, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        stub(target).Chat(req, timeout=30, **kw)
    return info.value


@pytest.mark.parametrize("mutate,field,message", [
    (lambda r: r.ClearField("messages"), "messages", "at least one user message is required"),
    (lambda r: r.messages.add(role=chat_pb2.ROLE_ASSISTANT).parts.add(text="x"),
     "messages[1].role", "the last message must be from ROLE_USER"),
    (lambda r: setattr(r.messages[0], "role", 0), "messages[0].role",
     "must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT"),
    (lambda r: r.messages[0].parts.add(), "messages[0].parts[1]",
     "the part has no text, image or video"),
    (lambda r: setattr(r.generation, "max_new_tokens", 100000), "generation.max_new_tokens",
     "100000 is over the limit of 4096"),
    (lambda r: setattr(r.generation, "temperature", 7.0), "generation.temperature",
     "must be between 0 and 2, got 7.0"),
    (lambda r: setattr(r.generation, "top_p", 0.0), "generation.top_p", "must be in (0, 1]"),
    (lambda r: r.generation.stop.extend([""]), "generation.stop[0]", "must be 1 to 64"),
    (lambda r: setattr(r.vision, "max_tiles_per_image", 99), "vision.max_tiles_per_image",
     "99 is over the limit of 40"),
    (lambda r: setattr(r, "request_id", "has space"), "request_id", "printable ASCII"),
])
def test_invalid_fields_name_the_field(server, mutate, field, message) -> None:
    req = user_text("hello")
    mutate(req)
    err = _fails(server.target, req)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(f"{field}: ") and message in err.details()
    status = rpc_status.from_call(err)
    assert status.details and status.details[0].type_url.endswith("google.rpc.BadRequest")


def test_a_bad_image_is_invalid_argument_with_its_field_path(server) -> None:
    req = chat_pb2.ChatRequest()
    req.messages.add(role=chat_pb2.ROLE_USER).parts.add(text="first")
    req.messages.add(role=chat_pb2.ROLE_ASSISTANT).parts.add(text="ok")
    last = req.messages.add(role=chat_pb2.ROLE_USER)
    last.parts.add(image=chat_pb2.Image(data=PHOTO[: len(PHOTO) // 3]))
    last.parts.add(text="what now?")
    err = _fails(server.target, req)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("image 1: the JPEG data is damaged or truncated (")
    from google.rpc import error_details_pb2

    bad = error_details_pb2.BadRequest()
    rpc_status.from_call(err).details[0].Unpack(bad)
    assert bad.field_violations[0].field == "messages[2].parts[0].image"


@pytest.mark.parametrize("uri,code,message", [
    ("missing.mp4", grpc.StatusCode.NOT_FOUND, "'missing.mp4' does not exist under the media"),
    ("../../etc/passwd", grpc.StatusCode.PERMISSION_DENIED, "is outside the server's media roots"),
    ("http://169.254.169.254/", grpc.StatusCode.PERMISSION_DENIED, "URL fetching is switched off"),
])
def test_video_references_map_to_their_codes(server, uri, code, message) -> None:
    with EagleClient(server.target) as client:
        with pytest.raises(EagleError) as info:
            client.chat("?", videos=[uri])
    assert info.value.code is code and message in info.value.details
    assert info.value.field == "messages[0].parts[0].video"


def test_oversized_message_is_resource_exhausted(tiny) -> None:
    with RunningServer(make_engine(tiny), max_request_bytes=200_000) as srv:
        req = user_text("x")
        req.messages[0].parts.add(image=chat_pb2.Image(data=b"\xff" * 300_000))
        err = _fails(srv.target, req)
        assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "300" in err.details() and "200000" in err.details()
        assert stub(srv.target).Chat(user_text("ok", max_new_tokens=2), timeout=30).text != \
            None  # noqa: E711 (the server still serves)


def test_overload_rejects_the_third_call_at_once(tiny) -> None:
    engine = make_engine(tiny, max_running=1, max_queue=1)
    with RunningServer(engine) as srv:
        s = stub(srv.target)
        running = s.StreamChat(long_text("long"), timeout=60)
        next(running)  # the first is running ...
        queued = s.StreamChat(long_text("long"), timeout=60)
        long = [running, queued]
        deadline = time.monotonic() + 10
        while engine.stats()["waiting"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)  # the second is prepared and waits for the running one
        assert engine.stats()["running"] == 1 and engine.stats()["waiting"] == 1
        start = time.monotonic()
        err = _fails(srv.target, user_text("third", max_new_tokens=2))
        assert time.monotonic() - start < 2.0  # at once: no waiting behind the queue
        assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.details() == "the server is at capacity (1 running, 1 queued); retry later"
        for call in long:
            call.cancel()
        deadline = time.monotonic() + 10
        while engine.stats()["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats()["in_flight"] == 0
    engine.drain(0)


def test_cancel_after_first_chunk_frees_the_job(server) -> None:
    engine = server.app.engine
    call = stub(server.target).StreamChat(long_text("go"), timeout=60)
    first = next(call)
    assert first.text or first.request_id
    call.cancel()
    deadline = time.monotonic() + 5
    while engine.stats()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats() == {**engine.stats(), "in_flight": 0, "running": 0, "waiting": 0}
    cancelled = server.app.metrics.requests.labels("StreamChat", "CANCELLED",
                                                   "default")._value.get()
    assert cancelled >= 1


def test_deadline_ends_a_long_generation_promptly(server) -> None:
    start = time.monotonic()
    err = None
    try:
        stub(server.target).Chat(user_text("long", max_new_tokens=4000, ignore_eos=True), timeout=0.2)
    except grpc.RpcError as exc:
        err = exc
    assert err is not None and err.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 2.0  # the 4000-token reply would take several seconds
    deadline = time.monotonic() + 5
    while server.app.engine.stats()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.app.engine.stats()["in_flight"] == 0
    ok = stub(server.target).Chat(user_text("next", max_new_tokens=3), timeout=30)
    assert ok.usage.completion_tokens == 3


class _BrokenEngine:
    """Fails every job the way a bug would, or as unavailable when told to."""

    def __init__(self, real, error: Exception) -> None:
        self.real, self.error = real, error

    def submit(self, job):
        raise self.error

    def cancel(self, request_id: str) -> bool:
        return False

    def info(self):
        return self.real.info()

    def stats(self):
        return {"in_flight": 0, "waiting": 0, "running": 0, "steps": 0}

    def drain(self, grace: float) -> None:
        pass


@pytest.mark.parametrize("error,code,message", [
    (RuntimeError("boom"), grpc.StatusCode.INTERNAL, "internal error (RuntimeError); it has "
                                                     "been logged"),
    (EngineError("the engine failed"), grpc.StatusCode.INTERNAL, "the engine failed"),
])
def test_bugs_are_internal_never_unknown(tiny, error, code, message) -> None:
    with RunningServer(_BrokenEngine(make_engine(tiny), error), warmup=False) as srv:
        err = _fails(srv.target, user_text("x"))
        assert err.code() is code and err.details() == message
        with pytest.raises(grpc.RpcError) as info:
            list(stub(srv.target).StreamChat(user_text("x", chat_pb2.StreamChatRequest), timeout=10))
        assert info.value.code() is code


def test_unavailable_while_draining(tiny) -> None:
    srv = RunningServer(make_engine(tiny))
    try:
        srv.app.state.draining = True
        err = _fails(srv.target, user_text("x"))
        assert err.code() is grpc.StatusCode.UNAVAILABLE
        assert err.details() == "the server is shutting down; retry on another replica"
    finally:
        srv.stop()


def test_health_transitions_and_reflection(tiny) -> None:
    engine = make_engine(tiny)
    srv = RunningServer.__new__(RunningServer)
    # build without starting, to watch NOT_SERVING -> SERVING -> NOT_SERVING
    import asyncio
    from dataclasses import replace

    from service.server import EagleServer
    from service.settings import Settings

    srv.settings = replace(Settings(port=0, grace_seconds=1))
    srv.loop = asyncio.new_event_loop()
    srv._thread = threading.Thread(target=srv.loop.run_forever, daemon=True)
    srv._thread.start()

    async def build():
        return EagleServer(srv.settings, engine)

    srv.app = srv.call(build())
    port = srv.app.port
    started = srv.loop.call_soon_threadsafe(lambda: srv.loop.create_task(srv.app.start()))
    del started
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    health = health_pb2_grpc.HealthStub(channel)
    seen = []
    watch = health.Watch(health_pb2.HealthCheckRequest(service="eagle.v1.ChatService"),
                         timeout=30)
    for update in watch:
        seen.append(update.status)
        if update.status == health_pb2.HealthCheckResponse.SERVING:
            break
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="bogus"), timeout=5)
    assert info.value.code() is grpc.StatusCode.NOT_FOUND
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    answer = next(refl.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
    names = {s.name for s in answer.list_services_response.service}
    assert {"eagle.v1.ChatService", "grpc.health.v1.Health"} <= names
    srv.call(srv.app.stop(0.5))
    for update in watch:
        seen.append(update.status)
        break
    watch.cancel()
    NOT, OK = health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING
    assert seen[0] == NOT and seen[-2:] == [OK, NOT]
    srv.loop.call_soon_threadsafe(srv.loop.stop)


def test_async_client(server) -> None:
    import asyncio

    async def go():
        async with AsyncEagleClient(server.target) as client:
            whole = await client.chat("Hello", max_new_tokens=6)
            stream = client.stream_chat("Hello", max_new_tokens=6)
            parts = [d async for d in stream]
            with pytest.raises(EagleError) as info:
                await client.chat("x", max_new_tokens=99999)
            return whole, parts, stream.result, info.value

    whole, parts, result, err = asyncio.run(go())
    assert "".join(parts) == whole.text == result.text
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT
    assert err.field == "generation.max_new_tokens"


def test_freed_memory_is_handed_back_once_calls_stop() -> None:
    """The server trims the heap after traffic, once no call runs (never during a call, never
    twice for the same calls); glibc here, so the C calls themselves succeed."""
    import asyncio
    from types import SimpleNamespace

    from service import runtime, server

    assert runtime.limit_malloc_arenas() is True and runtime.trim_malloc() is True
    trims = []
    calls = SimpleNamespace(calls=0, active=0)
    app = SimpleNamespace(servicer=calls)

    async def scenario() -> list[int]:
        task = asyncio.create_task(server.EagleServer._give_memory_back(
            app, every_s=0.01, trim=lambda: trims.append(1)))
        seen = []
        for calls.calls, calls.active in ((0, 0), (3, 2), (3, 0), (3, 0), (5, 0)):
            await asyncio.sleep(0.2)  # some 20 checks of the trimmer per state
            seen.append(len(trims))
        task.cancel()
        return seen

    assert asyncio.run(scenario()) == [0, 0, 1, 1, 2]
