"""Hypothesis-generated ChatRequests against a live server: never UNKNOWN or INTERNAL, and the
server is still SERVING with nothing in flight afterwards."""
from __future__ import annotations

import factory
import grpc
import pytest
from eagle.v1 import chat_pb2 as P
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import RunningServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_media import REJECTED

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED,
           grpc.StatusCode.DEADLINE_EXCEEDED}
CLIP = factory.video(None, seconds=1, fps=10, width=64, height=48)
IMAGES = [factory.encode(factory.photo(120, 90), "JPEG"), factory.encode(factory.photo(50, 500),
                                                                        "PNG"),
          b"", b"\x00" * 10, REJECTED["truncated JPEG"][0], REJECTED["PNG declaring 20000x20000"][0],
          REJECTED["EPS"][0]]
URIS = ["clip.mp4", "missing.mp4", "../x.mp4", "/etc/passwd", "http://127.0.0.1:9/x",
        "file:///etc/hostname", "", "clip.mp4\x00"]

floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
text_part = st.builds(lambda t: P.Part(text=t), st.text(max_size=120))
image_part = st.one_of(
    st.builds(lambda d: P.Part(image=P.Image(data=d)), st.sampled_from(IMAGES)),
    st.builds(lambda u: P.Part(image=P.Image(uri=u)), st.sampled_from(URIS)))
video_part = st.builds(
    lambda source, n, a, b: P.Part(video=P.Video(**source, num_frames=n, start_seconds=a,
                                                 end_seconds=b)),
    st.one_of(st.sampled_from([{"data": CLIP}, {"data": b""}, {"data": b"\x1aE\xdf\xa3junk"}]),
              st.builds(lambda u: {"uri": u}, st.sampled_from(URIS))),
    st.integers(0, 300), st.floats(allow_nan=True, allow_infinity=True),
    st.floats(allow_nan=True, allow_infinity=True))
part = st.one_of(text_part, text_part, image_part, video_part, st.just(P.Part()))
message = st.builds(lambda role, parts: P.Message(role=role, parts=parts),
                    st.sampled_from([0, 1, 2, 2, 3, 3, 9]), st.lists(part, max_size=3))


def _generation(draw):
    g = P.GenerationConfig(max_new_tokens=draw(st.sampled_from([0, 1, 3, 5000])),
                           top_k=draw(st.integers(0, 2000)),
                           stop=draw(st.lists(st.text(max_size=70), max_size=9)))
    for name in ("temperature", "top_p", "repetition_penalty"):
        if draw(st.booleans()):
            setattr(g, name, draw(floats))
    if draw(st.booleans()):
        g.seed = draw(st.integers(0, 2**64 - 1))
    return g


@st.composite
def requests(draw):
    r = P.ChatRequest(request_id=draw(st.text(max_size=140)),
                      messages=draw(st.lists(message, max_size=4)),
                      generation=_generation(draw),
                      vision=P.VisionConfig(max_tiles_per_image=draw(st.integers(0, 50)),
                                            max_video_frames=draw(st.integers(0, 100))))
    if draw(st.booleans()):  # most requests should get far enough to reach the model
        r.ClearField("messages")
        r.messages.add(role=P.ROLE_USER).parts.extend(draw(st.lists(part, min_size=1, max_size=3)))
    return r


@pytest.fixture(scope="module")
def fuzz_server(tiny, media_root):
    from dataclasses import replace

    from preprocess.refs import RefPolicy
    from service.engine.prepare import MediaSettings
    from service.engine.scheduler import EngineSettings, NativeEngine

    media = MediaSettings(refs=RefPolicy(media_roots=(media_root,)))
    engine = NativeEngine(tiny, replace(EngineSettings(), media=media))
    srv = RunningServer(engine, media_roots=(str(media_root),), default_max_new_tokens=4)
    yield srv
    srv.stop()
    engine.drain(0)


@settings(max_examples=int(__import__("os").environ.get("EAGLE_FUZZ_EXAMPLES", "80")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(request=requests())
def test_generated_requests_never_get_unknown_or_internal(fuzz_server, request) -> None:
    channel = grpc.insecure_channel(fuzz_server.target)
    stub = channel.unary_unary("/eagle.v1.ChatService/Chat",
                               request_serializer=P.ChatRequest.SerializeToString,
                               response_deserializer=P.ChatResponse.FromString)
    try:
        stub(request, timeout=30)
        code = grpc.StatusCode.OK
    except grpc.RpcError as err:
        code = err.code()
        assert code in ALLOWED, (code, err.details())
        assert err.details()
    finally:
        channel.close()


def test_still_serving_after_the_fuzz(fuzz_server) -> None:
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(fuzz_server.target))
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
        health_pb2.HealthCheckResponse.SERVING
    assert fuzz_server.app.engine.stats()["in_flight"] == 0
