"""Hostile input over gRPC: each case gets its exact status and message; nothing is fetched
from internal addresses; the server stays SERVING with bounded memory afterwards."""
from __future__ import annotations

import math
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import factory
import grpc
import pytest
from eagle.v1 import chat_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import RunningServer
from test_media import REJECTED, png_declaring

from preprocess.refs import RefPolicy
from service.engine.prepare import MediaSettings

P = chat_pb2
CODE = grpc.StatusCode
JPEG = factory.encode(factory.photo(320, 240), "JPEG")
CLIP = factory.video(None, seconds=3, fps=10)
MKV = factory.video(None, seconds=6, fps=10, fmt="matroska")


class _Canary(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802
        type(self).hits.append(self.path)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def canary():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Canary)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


@pytest.fixture(scope="module")
def hostile(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-media")
    (root / "clip.mp4").write_bytes(CLIP)
    (root.parent / "outside.mp4").write_bytes(CLIP)
    os.symlink(root.parent / "outside.mp4", root / "escape.mp4")
    os.symlink("/dev/zero", root / "zero.mp4")
    os.mkfifo(root / "fifo.mp4")
    media = MediaSettings(refs=RefPolicy(media_roots=(root,), allow_urls=True,
                                         connect_timeout_s=1, read_timeout_s=1))
    from dataclasses import replace

    from service.engine.scheduler import EngineSettings, NativeEngine

    engine = NativeEngine(tiny, replace(EngineSettings(video_workers=1), media=media))
    srv = RunningServer(engine, media_roots=(str(root),), max_image_bytes=2 * 1024 * 1024,
                        max_request_bytes=8 * 1024 * 1024)
    yield srv
    srv.stop()
    engine.drain(0)


def req(*parts, gen=None, vision=None, rid="", messages=None) -> P.ChatRequest:
    r = P.ChatRequest(request_id=rid, generation=gen or P.GenerationConfig(max_new_tokens=2),
                      vision=vision or P.VisionConfig())
    if messages is not None:
        r.messages.extend(messages)
        return r
    msg = r.messages.add(role=P.ROLE_USER)
    for part in parts + (P.Part(text="what is this?"),):
        msg.parts.append(part)
    return r


def img(data: bytes = b"", uri: str = "") -> P.Part:
    return P.Part(image=P.Image(uri=uri) if uri else P.Image(data=data))


def vid(uri: str = "", data: bytes = b"", **kw) -> P.Part:
    return P.Part(video=P.Video(uri=uri, **kw) if uri else P.Video(data=data, **kw))


def msg(role, *texts) -> P.Message:
    return P.Message(role=role, parts=[P.Part(text=t) for t in texts])


def gen(**kw) -> P.GenerationConfig:
    return P.GenerationConfig(**{"max_new_tokens": 2, **kw})


IA, NF, PD, RE = CODE.INVALID_ARGUMENT, CODE.NOT_FOUND, CODE.PERMISSION_DENIED, \
    CODE.RESOURCE_EXHAUSTED
IMG0 = "messages[0].parts[0].image"
VID0 = "messages[0].parts[0].video"

CASES = {
    # images
    "truncated JPEG": (lambda p: req(img(REJECTED["truncated JPEG"][0])), IA,
                       "image 1: the JPEG data is damaged or truncated"),
    "truncated PNG": (lambda p: req(img(REJECTED["truncated PNG"][0])), IA,
                      "image 1: the PNG data is damaged or truncated"),
    "random bytes image": (lambda p: req(img(os.urandom(5000))), IA,
                           "image 1: not a supported image; send JPEG, PNG, WebP, GIF or BMP"),
    "empty image": (lambda p: req(img(b"")), IA, f"{IMG0}: the image has neither data nor uri"),
    "PNG bomb 20000x20000": (lambda p: req(img(png_declaring(20000, 20000))), IA,
                             "image 1: PNG is 400,000,000 pixels, over the 64-megapixel limit"),
    "PNG 10000x9000": (lambda p: req(img(png_declaring(10000, 9000))), IA,
                       "image 1: PNG is 10000x9000, over the 64-megapixel limit"),
    "EPS as image": (lambda p: req(img(REJECTED["EPS"][0])), IA, "looks like PostScript/EPS"),
    "PSD as image": (lambda p: req(img(REJECTED["PSD"][0])), IA, "looks like PSD"),
    "TIFF as image": (lambda p: req(img(REJECTED["TIFF"][0])), IA, "looks like TIFF"),
    "PDF as image": (lambda p: req(img(REJECTED["PDF"][0])), IA, "looks like PDF"),
    "image over the byte cap": (lambda p: req(img(b"\xff\xd8\xff" + b"0" * (3 * 1024**2))), IA,
                                f"{IMG0}.data: the image is 3,145,731 bytes, over the "
                                f"2,097,152-byte limit"),
    "17 images": (lambda p: req(*[img(JPEG)] * 17), IA,
                  "messages[0].parts[16].image: more than 16 images in the request, the limit"),
    "image in an assistant turn": (lambda p: req(messages=[
        msg(P.ROLE_USER, "a"), P.Message(role=P.ROLE_ASSISTANT, parts=[img(JPEG)]), msg(P.ROLE_USER, "b")]),
        IA, "messages[1].parts[0].image: images are allowed in USER messages only"),
    "image reference outside the root": (lambda p: req(img(uri="../outside.mp4")), PD,
                                         "image 1: '../outside.mp4' is outside the server's "
                                         "media roots"),
    "image URL to loopback": (lambda p: req(img(uri=f"http://127.0.0.1:{p}/a.png")), PD,
                              "resolves to 127.0.0.1, which is not a public address"),
    # videos
    "random bytes video": (lambda p: req(vid(data=os.urandom(20000))), IA,
                           "video 1: not a supported video container"),
    "truncated MP4": (lambda p: req(vid(data=CLIP[: len(CLIP) // 2])), IA, "video 1: "),
    "lying MKV header": (lambda p: req(vid(data=MKV[: len(MKV) // 3], num_frames=8)), IA,
                         "video 1: "),
    "HLS playlist to the canary": (lambda p: req(vid(data=(
        f"#EXTM3U\n#EXTINF:10,\nhttp://127.0.0.1:{p}/seg.ts\n").encode(), num_frames=2)), IA,
        "video 1: not a supported video container"),
    "too many frames": (lambda p: req(vid(uri="clip.mp4", num_frames=500)), IA,
                        f"{VID0}.num_frames: 500 frames, over the limit of 64"),
    "end before start": (lambda p: req(vid(uri="clip.mp4", start_seconds=2, end_seconds=1)),
                         IA, f"{VID0}.end_seconds: must be after start_seconds (2.0), got 1.0"),
    "negative start": (lambda p: req(vid(uri="clip.mp4", start_seconds=-1)), IA,
                       f"{VID0}.start_seconds: must be a finite number >= 0, got -1.0"),
    "NaN start": (lambda p: req(vid(uri="clip.mp4", start_seconds=math.nan)), IA,
                  f"{VID0}.start_seconds: must be a finite number >= 0, got nan"),
    "start past the end": (lambda p: req(vid(uri="clip.mp4", start_seconds=99)), IA,
                           "video 1: start_seconds (99.0) is past the end of the 3.00-second"),
    "traversal": (lambda p: req(vid(uri="../../../../etc/passwd")), PD,
                  "is outside the server's media roots"),
    "absolute path": (lambda p: req(vid(uri="/etc/passwd")), PD,
                      "video 1: '/etc/passwd' is outside the server's media roots"),
    "symlink out of the root": (lambda p: req(vid(uri="escape.mp4")), PD,
                                "video 1: 'escape.mp4' is outside the server's media roots"),
    "symlink to /dev/zero": (lambda p: req(vid(uri="zero.mp4")), PD, "is outside the server's"),
    "FIFO": (lambda p: req(vid(uri="fifo.mp4")), PD, "video 1: 'fifo.mp4' is not a regular file"),
    "missing file": (lambda p: req(vid(uri="nope.mp4")), NF,
                     "video 1: 'nope.mp4' does not exist under the media roots"),
    "file:// outside": (lambda p: req(vid(uri="file:///etc/hostname")), PD,
                        "is outside the server's media roots"),
    "URL to 127.0.0.1": (lambda p: req(vid(uri=f"http://127.0.0.1:{p}/v.mp4")), PD,
                         "video 1: the host '127.0.0.1' resolves to 127.0.0.1"),
    "URL to [::1]": (lambda p: req(vid(uri=f"http://[::1]:{p}/v.mp4")), PD, "resolves to ::1"),
    "URL to 2130706433": (lambda p: req(vid(uri=f"http://2130706433:{p}/")), PD,
                          "resolves to 127.0.0.1"),
    "URL to metadata service": (lambda p: req(vid(uri="http://169.254.169.254/latest")), PD,
                                "resolves to 169.254.169.254"),
    "gopher URL": (lambda p: req(vid(uri=f"gopher://127.0.0.1:{p}/")), PD,
                   "the scheme 'gopher' is not allowed"),
    # messages
    "no messages": (lambda p: req(messages=[]), IA,
                    "messages: at least one user message is required"),
    "a message without parts": (lambda p: req(messages=[P.Message(role=P.ROLE_USER)]), IA,
                                "messages[0].parts: a message needs at least one part"),
    "unset role": (lambda p: req(messages=[P.Message(parts=[P.Part(text="x")])]), IA,
                   "messages[0].role: must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT"),
    "system in the middle": (lambda p: req(messages=[msg(P.ROLE_USER, "a"), msg(P.ROLE_SYSTEM, "b")]),
                             IA, "messages[1].role: a ROLE_SYSTEM message may only come first"),
    "assistant first": (lambda p: req(messages=[msg(P.ROLE_ASSISTANT, "a"), msg(P.ROLE_USER, "b")]), IA,
                        "messages[0].role: expected ROLE_USER"),
    "two users in a row": (lambda p: req(messages=[msg(P.ROLE_USER, "a"), msg(P.ROLE_USER, "b")]), IA,
                           "messages[1].role: expected ROLE_ASSISTANT"),
    "ends with assistant": (lambda p: req(messages=[msg(P.ROLE_USER, "a"), msg(P.ROLE_ASSISTANT, "b")]),
                            IA, "messages[1].role: the last message must be from ROLE_USER"),
    "129 parts": (lambda p: req(messages=[msg(P.ROLE_USER, *["x"] * 129)]), IA,
                  "messages[0].parts[128]: more than 128 parts in the request, the limit"),
    "65 messages": (lambda p: req(messages=[msg(P.ROLE_USER if i % 2 == 0 else P.ROLE_ASSISTANT, "x")
                                            for i in range(65)]), IA,
                    "messages: 65 messages, over the limit of 64"),
    "text over the character cap": (lambda p: req(messages=[msg(P.ROLE_USER, "x" * 200_001)]), IA,
                                    "the request's text is over the 200,000-character limit"),
    "text over the context": (lambda p: req(messages=[msg(P.ROLE_USER, "w " * 99_000)]), IA,
                              "tokens over; shorten the text"),
    "empty part in a system message": (lambda p: req(messages=[
        P.Message(role=P.ROLE_SYSTEM, parts=[P.Part()]), msg(P.ROLE_USER, "x")]), IA,
        "messages[0].parts[0]: the part has no text, image or video"),
    # generation and vision settings
    "max_new_tokens huge": (lambda p: req(gen=gen(max_new_tokens=10**9)), IA,
                            "generation.max_new_tokens: 1000000000 is over the limit of 4096"),
    "temperature NaN": (lambda p: req(gen=gen(temperature=math.nan)), IA,
                        "generation.temperature: must be between 0 and 2, got nan"),
    "temperature negative": (lambda p: req(gen=gen(temperature=-1)), IA,
                             "generation.temperature: must be between 0 and 2, got -1.0"),
    "top_p zero": (lambda p: req(gen=gen(top_p=0)), IA, "generation.top_p: must be in (0, 1]"),
    "top_p over one": (lambda p: req(gen=gen(top_p=1.5)), IA, "generation.top_p"),
    "top_k huge": (lambda p: req(gen=gen(top_k=10**6)), IA,
                   "generation.top_k: 1000000 is over the limit of 1000"),
    "repetition_penalty zero": (lambda p: req(gen=gen(repetition_penalty=0)), IA,
                                "generation.repetition_penalty: must be in (0, 2], got 0.0"),
    "9 stop strings": (lambda p: req(gen=gen(stop=["a"] * 9)), IA,
                       "generation.stop: 9 stop strings, over the limit of 8"),
    "a 100-character stop string": (lambda p: req(gen=gen(stop=["s" * 100])), IA,
                                    "generation.stop[0]: must be 1 to 64 characters, got 100"),
    "tiles per image 99": (lambda p: req(vision=P.VisionConfig(max_tiles_per_image=99)), IA,
                           "vision.max_tiles_per_image: 99 is over the limit of 40"),
    "video frames 999": (lambda p: req(vision=P.VisionConfig(max_video_frames=999)), IA,
                         "vision.max_video_frames: 999 is over the limit of 64"),
    "request id with spaces": (lambda p: req(rid="a b"), IA, "request_id: must be at most 128"),
    "request id too long": (lambda p: req(rid="r" * 129), IA, "request_id: must be at most 128"),
    "message over the size cap": (lambda p: req(img(b"\x00" * (9 * 1024**2))), RE,
                                  "Received message larger than max"),
}


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _call(target: str, body: bytes):
    channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", -1)])
    call = channel.unary_unary("/eagle.v1.ChatService/Chat",
                               request_serializer=lambda b: b,
                               response_deserializer=P.ChatResponse.FromString)
    try:
        return call(body, timeout=60)
    finally:
        channel.close()


def test_there_are_at_least_forty_cases() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_case(hostile, canary, name: str) -> None:
    build, code, message = CASES[name]
    body = build(canary).SerializeToString()
    with pytest.raises(grpc.RpcError) as info:
        _call(hostile.target, body)
    assert info.value.code() is code, info.value.details()
    assert message in info.value.details()


@pytest.mark.parametrize("body,why", [
    (b"\x12\x05\x12\x03\x0a\x01\xff", "not a valid eagle.v1.ChatRequest"),  # invalid UTF-8 text
    (b"\xff\xff\xff\xff", "not a valid eagle.v1.ChatRequest"),
    # a valid request, then generation.stop = [b"\xff"]: invalid UTF-8 in a stop string
    (req().SerializeToString() + b"\x1a\x03\x3a\x01\xff", "not a valid eagle.v1.ChatRequest"),
])
def test_bytes_that_are_not_a_request(hostile, body: bytes, why: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _call(hostile.target, body)
    assert info.value.code() is CODE.INVALID_ARGUMENT and why in info.value.details()


def test_after_the_onslaught_the_server_serves_and_nothing_was_fetched(hostile, canary) -> None:
    before = _rss_mb()
    for _ in range(3):  # a second and third round must not grow memory
        for name in ("PNG bomb 20000x20000", "truncated JPEG", "lying MKV header",
                     "random bytes video", "text over the context"):
            build, code, _ = CASES[name]
            with pytest.raises(grpc.RpcError):
                _call(hostile.target, build(canary).SerializeToString())
    assert _rss_mb() - before < 150
    assert _Canary.hits == []
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(hostile.target))
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
        health_pb2.HealthCheckResponse.SERVING
    ok = _call(hostile.target, req(img(JPEG), vid(uri="clip.mp4", num_frames=3)).SerializeToString())
    assert ok.usage.video_frames == 3 and ok.usage.image_tiles >= 1
    assert hostile.app.engine.stats()["in_flight"] == 0
