"""The chat service over HTTP (--http-port): Connect JSON and binary, gRPC-Web, curl, health,
errors, auth, deadlines and disconnects, against the same expectations as the gRPC port."""
from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import factory
import pytest
from conftest import make_engine
from eagle.v1 import chat_pb2
from google.rpc import error_details_pb2
from harness import RunningServer, free_port

from client import EagleClient

PHOTO = factory.encode(factory.photo(1000, 500), "JPEG")
HI = {"messages": [{"role": "ROLE_USER", "parts": [{"text": "Hi"}]}],
      "generation": {"maxNewTokens": 8}}


@pytest.fixture(scope="module")
def web(tiny):
    engine = make_engine(tiny, max_running=16, max_queue=64)
    srv = RunningServer(engine, http_port=free_port(), max_queue=64)
    srv.url = f"http://127.0.0.1:{srv.app.http_port}"
    yield srv
    srv.stop()
    engine.drain(0)


def post(url: str, body: bytes, content_type: str = "application/json",
         headers: dict | None = None, timeout: float = 60) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": content_type, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def frames(data: bytes) -> list[tuple[int, bytes]]:
    """Connect's streaming envelope: (flags, payload) for each frame."""
    out, at = [], 0
    while at < len(data):
        flags, size = data[at], int.from_bytes(data[at + 1:at + 5], "big")
        out.append((flags, data[at + 5:at + 5 + size]))
        at += 5 + size
    return out


def envelope(payload: bytes, flags: int = 0) -> bytes:
    return bytes([flags]) + len(payload).to_bytes(4, "big") + payload


def test_connect_json_chat_answers_what_grpc_answers(web) -> None:
    """The same request over gRPC and as a JSON POST: the same text and usage (greedy), the
    request id in the body and the x-request-id header."""
    status, headers, body = post(f"{web.url}/eagle.v1.ChatService/Chat",
                                 json.dumps({**HI, "requestId": "web-1"}).encode())
    assert status == 200 and headers["content-type"] == "application/json"
    reply = json.loads(body)
    assert reply["requestId"] == "web-1" and headers["x-request-id"] == "web-1"
    assert reply["finishReason"] == "FINISH_REASON_LENGTH"
    assert reply["usage"]["completionTokens"] == 8
    with EagleClient(web.target) as client:
        same = client.chat("Hi", max_new_tokens=8)
    assert reply["text"] == same.text
    assert reply["usage"]["promptTokens"] == same.usage.prompt_tokens


def test_an_image_goes_in_as_base64_bytes(web) -> None:
    request = {"messages": [{"role": "ROLE_USER", "parts": [
        {"image": {"data": base64.b64encode(PHOTO).decode()}},
        {"text": "Describe the image."}]}],
        "generation": {"maxNewTokens": 4}, "vision": {"maxTilesPerImage": 2}}
    status, _, body = post(f"{web.url}/eagle.v1.ChatService/Chat", json.dumps(request).encode())
    assert status == 200, body
    usage = json.loads(body)["usage"]
    assert usage["imageTiles"] == 3 and usage["visionTokens"] == 768


def test_stream_chat_streams_enveloped_json_frames_ending_in_usage(web) -> None:
    # 32 tokens: enough that a busy machine does not deliver them all in one frame
    long = {**HI, "generation": {"maxNewTokens": 32, "ignoreEos": True}}
    status, headers, body = post(f"{web.url}/eagle.v1.ChatService/StreamChat",
                                 envelope(json.dumps(long).encode()), "application/connect+json")
    assert status == 200 and headers["content-type"] == "application/connect+json"
    got = frames(body)
    messages = [json.loads(p) for f, p in got if f == 0]
    end = [json.loads(p) for f, p in got if f == 2]
    assert len(messages) > 2 and all("finishReason" not in m for m in messages[:-1])
    assert messages[-1]["finishReason"] == "FINISH_REASON_LENGTH"
    assert messages[-1]["usage"]["completionTokens"] == 32
    rid = messages[0]["requestId"]
    assert end == [{"metadata": {"x-request-id": [rid]}}]
    with EagleClient(web.target) as client:
        assert "".join(m.get("text", "") for m in messages) == client.chat(
            "Hi", max_new_tokens=32, ignore_eos=True).text


def test_connect_binary_and_grpc_web_from_the_connect_client(web) -> None:
    """The official Connect client over both of its HTTP/1.1 protocols: unary, streaming
    and GetModelInfo answer as over gRPC."""
    from connectrpc.protocol import ProtocolType
    from eagle.v1.chat_connect import ChatServiceClientSync

    request = chat_pb2.ChatRequest(generation=chat_pb2.GenerationConfig(max_new_tokens=8))
    request.messages.add(role=chat_pb2.ROLE_USER).parts.add(text="Hi")
    stream = chat_pb2.StreamChatRequest()
    stream.CopyFrom(chat_pb2.StreamChatRequest.FromString(request.SerializeToString()))
    with EagleClient(web.target) as client:
        expected = client.chat("Hi", max_new_tokens=8).text
    for protocol in (ProtocolType.CONNECT, ProtocolType.GRPC_WEB):
        with ChatServiceClientSync(web.url, protocol=protocol) as c:
            reply = c.chat(request)
            chunks = list(c.stream_chat(stream))
            info = c.get_model_info(chat_pb2.GetModelInfoRequest())
        assert reply.text == expected and reply.usage.completion_tokens == 8, protocol
        assert "".join(ch.text for ch in chunks) == expected, protocol
        assert chunks[-1].finish_reason == chat_pb2.FINISH_REASON_LENGTH
        assert info.model_name and info.tenant.name == "default" and info.max_new_tokens > 0


def test_errors_carry_the_grpc_code_message_and_field_path(web) -> None:
    """A bad request: HTTP 400, Connect's invalid_argument, the servicer's message, and the
    field in a google.rpc.BadRequest detail; a typo in a field name is refused by name."""
    too_many = {**HI, "generation": {"maxNewTokens": 10**6}}
    status, _, body = post(f"{web.url}/eagle.v1.ChatService/Chat", json.dumps(too_many).encode())
    err = json.loads(body)
    assert status == 400 and err["code"] == "invalid_argument"
    assert err["message"].startswith("generation.max_new_tokens: ")
    detail = err["details"][0]
    assert detail["type"] == "google.rpc.BadRequest"
    bad = error_details_pb2.BadRequest.FromString(
        base64.b64decode(detail["value"] + "=" * (-len(detail["value"]) % 4)))
    assert bad.field_violations[0].field == "generation.max_new_tokens"
    status, _, body = post(f"{web.url}/eagle.v1.ChatService/Chat",
                           b'{"messages": [], "generation": {"maxNewToken": 8}}')
    err = json.loads(body)
    assert status == 400 and err["code"] == "invalid_argument"
    assert 'no field named "maxNewToken"' in err["message"]
    assert "eagle.v1.ChatRequest" in err["message"]


def test_health_paths_and_unknown_paths(web) -> None:
    for path in ("/healthz", "/readyz"):
        with urllib.request.urlopen(web.url + path, timeout=10) as r:
            assert r.status == 200 and r.read() == b"ok\n"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(web.url + "/nope", timeout=10)
    assert e.value.code == 404
    assert b"/eagle.v1.ChatService/Chat" in e.value.read()


def test_readyz_says_not_ready_while_draining(tiny) -> None:
    engine = make_engine(tiny)
    srv = RunningServer(engine, http_port=free_port())
    url = f"http://127.0.0.1:{srv.app.http_port}"
    try:
        srv.app.state.draining = True
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + "/readyz", timeout=10)
        assert e.value.code == 503 and e.value.read() == b"not ready: draining\n"
        with urllib.request.urlopen(url + "/healthz", timeout=10) as r:
            assert r.status == 200  # alive: a draining replica is not restarted
        status, _, body = post(f"{url}/eagle.v1.ChatService/Chat", json.dumps(HI).encode())
        assert status == 503 and json.loads(body)["code"] == "unavailable"
        assert "shutting down" in json.loads(body)["message"]
    finally:
        srv.app.state.draining = False
        srv.stop()
        engine.drain(0)


def test_the_bearer_token_is_checked_as_on_the_grpc_port(tiny) -> None:
    engine = make_engine(tiny)
    srv = RunningServer(engine, http_port=free_port(), auth_token="web:s3cret weight=2")
    url = f"http://127.0.0.1:{srv.app.http_port}/eagle.v1.ChatService"
    try:
        status, _, body = post(f"{url}/Chat", json.dumps(HI).encode())
        assert status == 401 and json.loads(body) == {
            "code": "unauthenticated",
            "message": "missing authorization metadata: send 'authorization: Bearer <token>'"}
        status, _, body = post(f"{url}/Chat", json.dumps(HI).encode(),
                               headers={"Authorization": "Bearer wrong"})
        assert status == 401 and json.loads(body)["message"] == "the bearer token is not valid"
        status, _, body = post(f"{url}/GetModelInfo", b"{}",
                               headers={"Authorization": "Bearer s3cret"})
        assert status == 200 and json.loads(body)["tenant"]["name"] == "web"
        assert json.loads(body)["tenant"]["weight"] == 2
        with urllib.request.urlopen(url.rsplit("/", 1)[0] + "/healthz", timeout=10) as r:
            assert r.status == 200  # health stays open, as on the gRPC port
    finally:
        srv.stop()
        engine.drain(0)


def test_connect_timeout_ms_is_the_deadline(web) -> None:
    long = {**HI, "generation": {"maxNewTokens": 4000, "ignoreEos": True}}
    start = time.monotonic()
    status, _, body = post(f"{web.url}/eagle.v1.ChatService/Chat", json.dumps(long).encode(),
                           headers={"Connect-Timeout-Ms": "300"})
    assert time.monotonic() - start < 10
    assert status == 504 and json.loads(body)["code"] == "deadline_exceeded"


def test_a_closed_connection_ends_the_generation(web) -> None:
    """A client that goes away mid-stream: the job is cancelled on the engine (it stops
    decoding), not left to run its 4,000 tokens."""
    body = envelope(json.dumps({**HI, "generation": {"maxNewTokens": 4000,
                                                     "ignoreEos": True}}).encode())
    port = web.app.http_port
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"POST /eagle.v1.ChatService/StreamChat HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/connect+json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    got = b""
    while got.count(b'"text"') < 3:  # some of the answer has arrived
        got += sock.recv(65536)
    assert b"200 OK" in got.split(b"\r\n")[0]
    cancelled = web.app.metrics.requests.labels("StreamChat", "CANCELLED", "default")
    before = cancelled._value.get()
    sock.close()
    closed = time.monotonic()
    deadline = closed + 10
    while web.app.servicer.active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert web.app.servicer.active == 0
    while web.app.engine.stats()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = web.app.engine.stats()
    assert stats["in_flight"] == stats["running"] == stats["waiting"] == 0
    # ended by the disconnect, not by running out its tokens: counted CANCELLED, not OK,
    # and well before 4,000 tokens (seconds here) could have been generated
    assert cancelled._value.get() == before + 1
    assert time.monotonic() - closed < 5


def test_sixty_four_concurrent_streams_all_finish(web) -> None:
    """Concurrent Connect streams are served on the event loop (no thread each)."""
    threads_before = threading.active_count()
    results: list[int] = []

    def one(i: int) -> None:
        req = {**HI, "generation": {"maxNewTokens": 6, "ignoreEos": True}}
        _, _, body = post(f"{web.url}/eagle.v1.ChatService/StreamChat",
                          envelope(json.dumps(req).encode()), "application/connect+json")
        last = [json.loads(p) for f, p in frames(body) if f == 0][-1]
        results.append(last["usage"]["completionTokens"])

    callers = [threading.Thread(target=one, args=(i,)) for i in range(64)]
    peak = [0]
    for t in callers:
        t.start()
    while any(t.is_alive() for t in callers):  # the server's threads while they stream
        peak[0] = max(peak[0], threading.active_count() - sum(t.is_alive() for t in callers))
        time.sleep(0.005)
    for t in callers:
        t.join(120)
    assert results == [6] * 64
    # 64 streams at once, and the server (in this process) grew by a few threads at most
    assert peak[0] <= threads_before + 4, (peak[0], threads_before)


@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("xxd") is None,
                    reason="curl or xxd is not installed")
def test_the_readme_curl_commands(web) -> None:
    """docs/http.md's commands, which the README shows too, run as written (the port
    substituted)."""
    from conftest import ROOT

    text = (ROOT / "docs" / "http.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```bash\n")[1:]]
    unary = next(b for b in blocks if "/Chat " in b or b.rstrip().endswith("/Chat"))
    stream = next(b for b in blocks if "StreamChat" in b)
    readme = (ROOT / "README.md").read_text()
    assert unary in readme and stream in readme  # the README shows the same two commands
    port = str(web.app.http_port)
    out = subprocess.run(["bash", "-c", unary.replace("8080", port)], capture_output=True,
                         timeout=60, check=True).stdout
    reply = json.loads(out)
    assert reply["finishReason"] and reply["usage"]["completionTokens"] > 0
    out = subprocess.run(["bash", "-c", stream.replace("8080", port)], capture_output=True,
                         timeout=60, check=True).stdout
    got = frames(out)
    assert got[-1][0] == 2 and json.loads(got[-2][1])["usage"]["completionTokens"] > 0


def test_cors_lets_only_the_named_origins_call_from_a_browser(tiny) -> None:
    """--http-cors-origins: a preflight from a named origin is answered with what Connect
    and this service send and expose; another origin gets no allowance; the flag refuses an
    origin with a path."""
    from service.settings import Settings

    engine = make_engine(tiny)
    srv = RunningServer(engine, http_port=free_port(),
                        http_cors_origins="https://app.example.com, http://localhost:3000")
    url = f"http://127.0.0.1:{srv.app.http_port}/eagle.v1.ChatService/Chat"
    try:
        pre = urllib.request.Request(url, method="OPTIONS", headers={
            "Origin": "https://app.example.com", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,connect-protocol-version,"
                                              "authorization,x-eagle-priority"})
        with urllib.request.urlopen(pre, timeout=10) as r:
            assert r.status == 200
            assert r.headers["access-control-allow-origin"] == "https://app.example.com"
            allowed = r.headers["access-control-allow-headers"].lower()
            assert {"connect-protocol-version", "authorization", "x-eagle-priority"} <= {
                h.strip() for h in allowed.split(",")}
        status, headers, body = post(url, json.dumps(HI).encode(),
                                     headers={"Origin": "http://localhost:3000"})
        assert status == 200 and headers["access-control-allow-origin"] == "http://localhost:3000"
        assert "x-request-id" in headers["access-control-expose-headers"].lower()
        status, headers, _ = post(url, json.dumps(HI).encode(),
                                  headers={"Origin": "https://evil.example.com"})
        assert "access-control-allow-origin" not in {k.lower() for k in headers}
    finally:
        srv.stop()
        engine.drain(0)
    with pytest.raises(ValueError, match="give an origin as scheme://host"):
        Settings(http_port=8080, http_cors_origins="https://app.example.com/path").check()


@pytest.mark.parametrize("protocol", ["CONNECT", "GRPC_WEB"])
def test_errors_auth_and_deadlines_over_binary_connect_and_grpc_web(tiny, protocol) -> None:
    """The official Connect client in binary over each protocol: the same codes, messages
    and field paths as the gRPC port for a bad field, a missing token and a deadline."""
    from connectrpc.code import Code
    from connectrpc.errors import ConnectError
    from connectrpc.protocol import ProtocolType
    from eagle.v1.chat_connect import ChatServiceClientSync

    engine = make_engine(tiny)
    srv = RunningServer(engine, http_port=free_port(), auth_token="web:s3cret")
    url = f"http://127.0.0.1:{srv.app.http_port}"
    kind = ProtocolType[protocol]

    def request(tokens: int, **gen) -> chat_pb2.ChatRequest:
        req = chat_pb2.ChatRequest(generation=chat_pb2.GenerationConfig(
            max_new_tokens=tokens, **gen))
        req.messages.add(role=chat_pb2.ROLE_USER).parts.add(text="Hi")
        return req

    auth = {"authorization": "Bearer s3cret"}
    try:
        with ChatServiceClientSync(url, protocol=kind) as c:
            with pytest.raises(ConnectError) as e:
                c.chat(request(10**6), headers=auth)
            assert e.value.code is Code.INVALID_ARGUMENT
            assert e.value.message.startswith("generation.max_new_tokens: ")
            [detail] = e.value.details
            assert detail.type_name == "google.rpc.BadRequest"
            bad = error_details_pb2.BadRequest.FromString(detail.message_bytes)
            assert bad.field_violations[0].field == "generation.max_new_tokens"
            with pytest.raises(ConnectError) as e:
                c.chat(request(1))
            assert e.value.code is Code.UNAUTHENTICATED
            assert e.value.message == ("missing authorization metadata: send "
                                       "'authorization: Bearer <token>'")
            with pytest.raises(ConnectError) as e:
                c.chat(request(4000, ignore_eos=True), headers=auth, timeout_ms=300)
            assert e.value.code is Code.DEADLINE_EXCEEDED
            assert c.chat(request(3), headers=auth).usage.completion_tokens == 3
    finally:
        srv.stop()
        engine.drain(0)


def test_a_body_over_the_limit_is_refused_with_the_limit(tiny) -> None:
    """--max-request-bytes on the HTTP port: a body beyond it (with JSON's base64 room) is
    refused before it is parsed, RESOURCE_EXHAUSTED naming the limit, and the port serves on."""
    engine = make_engine(tiny)
    srv = RunningServer(engine, http_port=free_port(), max_request_bytes=100_000)
    url = f"http://127.0.0.1:{srv.app.http_port}/eagle.v1.ChatService/Chat"
    limit = int(100_000 * 4 / 3) + 64 * 1024
    try:
        big = {"messages": [{"role": "ROLE_USER", "parts": [{"text": "x" * 300_000}]}]}
        status, _, body = post(url, json.dumps(big).encode())
        assert status == 429 and json.loads(body) == {
            "code": "resource_exhausted",
            "message": f"message is larger than configured max {limit}"}
        status, _, body = post(url, json.dumps(HI).encode())
        assert status == 200 and json.loads(body)["usage"]["completionTokens"] == 8
    finally:
        srv.stop()
        engine.drain(0)
