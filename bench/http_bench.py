"""What the HTTP port costs (`make bench` http section): one-token chats over loopback, one
client connection each way, gRPC against the Connect protocol (JSON and binary, as curl or
fetch send them) and gRPC-Web; gRPC with the HTTP port off and on; then 64 concurrent
streams each way, with the server's thread count while they run."""
from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path

import grpc
from eagle.v1 import chat_pb2, chat_pb2_grpc

from bench.common import free_port, pct, table, write_json
from service.engine.loader import load_model, resolve_model
from service.engine.scheduler import EngineSettings, NativeEngine
from service.server import BackgroundServer
from service.settings import Settings

CALLS, WARM, STREAMS, STREAM_TOKENS = 300, 30, 64, 32
TARGET_MS = 2.0


def _chat(tokens: int = 1) -> chat_pb2.ChatRequest:
    req = chat_pb2.ChatRequest(generation=chat_pb2.GenerationConfig(
        max_new_tokens=tokens, ignore_eos=True))
    req.messages.add(role=chat_pb2.ROLE_USER).parts.add(text="Hi")
    return req


def _pcts(values: list[float]) -> dict:
    return {"p50": pct(values, 0.5), "p90": pct(values, 0.9), "p99": pct(values, 0.99)}


def _timed(call, n: int = CALLS) -> list[float]:
    for _ in range(WARM):
        call()
    out = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        out.append((time.perf_counter() - start) * 1000)
    return out


def _grpc_call(target: str):
    stub = chat_pb2_grpc.ChatServiceStub(grpc.insecure_channel(target))
    req = _chat()
    return lambda: stub.Chat(req, timeout=30)


def _connect_call(port: int, binary: bool):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    req = _chat()
    body = req.SerializeToString() if binary else json.dumps(
        {"messages": [{"role": "ROLE_USER", "parts": [{"text": "Hi"}]}],
         "generation": {"maxNewTokens": 1, "ignoreEos": True}}).encode()
    kind = "application/proto" if binary else "application/json"

    def call():
        conn.request("POST", "/eagle.v1.ChatService/Chat", body, {"Content-Type": kind})
        r = conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {data[:200]!r}")
    return call


def _grpc_web_call(port: int):
    from connectrpc.protocol import ProtocolType
    from eagle.v1.chat_connect import ChatServiceClientSync

    client = ChatServiceClientSync(f"http://127.0.0.1:{port}", protocol=ProtocolType.GRPC_WEB)
    req = _chat()
    return lambda: client.chat(req)


def _streams(open_stream, n: int = STREAMS) -> dict:
    """`n` streams at once, each STREAM_TOKENS tokens: wall time, and the most threads the
    server's process had while they ran (the calls run in this process too: counted before)."""
    base = threading.active_count()
    peak = [0]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], threading.active_count())
            time.sleep(0.005)

    results: list[int] = []
    callers = [threading.Thread(target=lambda: results.append(open_stream()))
               for _ in range(n)]
    watcher = threading.Thread(target=watch)
    watcher.start()
    start = time.perf_counter()
    for t in callers:
        t.start()
    for t in callers:
        t.join(300)
    wall = time.perf_counter() - start
    done.set()
    watcher.join()
    return {"streams": n, "completed": sum(1 for r in results if r == STREAM_TOKENS),
            "wall_s": wall, "tokens_per_s": sum(results) / wall,
            # threads beyond the callers and the watcher: the server's own growth
            "server_threads_added": max(0, peak[0] - base - n - 1)}


def _grpc_stream(target: str):
    channel = grpc.insecure_channel(target)
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    req = chat_pb2.StreamChatRequest.FromString(_chat(STREAM_TOKENS).SerializeToString())

    def one() -> int:
        return list(stub.StreamChat(req, timeout=120))[-1].usage.completion_tokens
    return one


def _connect_stream(port: int):
    body = json.dumps({"messages": [{"role": "ROLE_USER", "parts": [{"text": "Hi"}]}],
                       "generation": {"maxNewTokens": STREAM_TOKENS,
                                      "ignoreEos": True}}).encode()
    framed = b"\0" + len(body).to_bytes(4, "big") + body

    def one() -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("POST", "/eagle.v1.ChatService/StreamChat", framed,
                     {"Content-Type": "application/connect+json"})
        data, at, last = conn.getresponse().read(), 0, None
        while at < len(data):
            size = int.from_bytes(data[at + 1:at + 5], "big")
            if data[at] == 0:
                last = json.loads(data[at + 5:at + 5 + size])
            at += 5 + size
        conn.close()
        return int(last["usage"]["completionTokens"]) if last else 0
    return one


class _Alternative:
    """The same HttpApp on another ASGI server, in the server's event loop, for the choice
    of server: hypercorn (pure Python, HTTP/2 too) and granian (Rust, embedded mode)."""

    def __init__(self, kind: str, app, port: int) -> None:
        self.kind, self.app, self.port = kind, app, port
        self.task = self.stop_event = self.server = None

    async def start(self) -> None:
        import asyncio

        if self.kind == "hypercorn":
            from hypercorn.asyncio import serve
            from hypercorn.config import Config

            cfg = Config()
            cfg.bind = [f"127.0.0.1:{self.port}"]
            cfg.accesslog = cfg.errorlog = None
            self.stop_event = asyncio.Event()
            self.task = asyncio.create_task(serve(self.app, cfg,
                                                  shutdown_trigger=self.stop_event.wait))
        else:
            from granian.constants import Interfaces
            from granian.server.embed import Server

            self.server = Server(self.app, address="127.0.0.1", port=self.port,
                                 interface=Interfaces.ASGI, log_enabled=False)
            self.task = asyncio.create_task(self.server.serve())
        for _ in range(500):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.01)
        raise OSError(f"{self.kind} did not open port {self.port}")

    async def stop(self) -> None:
        import asyncio

        if self.stop_event is not None:
            self.stop_event.set()
        if self.server is not None:
            self.server.stop()
        try:
            await asyncio.wait_for(self.task, 10)
        except Exception:  # noqa: BLE001 - a server that will not stop is cancelled
            self.task.cancel()


def _servers(on: BackgroundServer) -> dict:
    """Connect JSON unary p50 and 64 streams on each ASGI server, serving the same app."""
    out = {}
    app = on.app.http.config.app
    for kind in ("hypercorn", "granian"):
        try:
            __import__(kind)
        except ImportError:
            out[kind] = {"error": f"{kind} is not installed"}
            continue
        port = free_port()
        alt = _Alternative(kind, app, port)
        try:
            on.call(alt.start())
            out[kind] = {"connect_json_ms": _pcts(_timed(_connect_call(port, binary=False))),
                         "streams": _streams(_connect_stream(port))}
        except Exception as exc:  # noqa: BLE001 - recorded: the table says why
            out[kind] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        finally:
            on.call(alt.stop())
    return out


def _server(lm, http_port: int) -> BackgroundServer:
    settings = Settings(port=0, http_port=http_port, max_running=STREAMS, max_queue=STREAMS,
                        log_format="text", log_level="WARNING", grace_seconds=1,
                        warmup=False)
    engine = NativeEngine(lm, EngineSettings(max_running=STREAMS, max_queue=STREAMS))
    return BackgroundServer(settings, engine)


def run(out: Path) -> tuple[str, dict]:
    lm = load_model(resolve_model("tiny"))
    data: dict = {"calls": CALLS, "target_ms": TARGET_MS}
    off = _server(lm, 0)
    try:
        data["grpc_port_alone_ms"] = _pcts(_timed(_grpc_call(off.target)))
    finally:
        off.stop()
        off.app.engine.drain(0)
    port = free_port()
    on = _server(lm, port)
    try:
        data["grpc_ms"] = _pcts(_timed(_grpc_call(on.target)))
        data["connect_json_ms"] = _pcts(_timed(_connect_call(port, binary=False)))
        data["connect_binary_ms"] = _pcts(_timed(_connect_call(port, binary=True)))
        data["grpc_web_ms"] = _pcts(_timed(_grpc_web_call(port)))
        data["grpc_streams"] = _streams(_grpc_stream(on.target))
        data["connect_streams"] = _streams(_connect_stream(port))
        data["servers"] = _servers(on)
    finally:
        on.stop()
        on.app.engine.drain(0)
    base = data["grpc_ms"]["p50"]
    rows = []
    for name, key in (("gRPC, HTTP port off", "grpc_port_alone_ms"),
                      ("gRPC, HTTP port on", "grpc_ms"),
                      ("Connect JSON (curl, fetch)", "connect_json_ms"),
                      ("Connect binary", "connect_binary_ms"),
                      ("gRPC-Web (Connect's Python client)", "grpc_web_ms")):
        d = data[key]
        rows.append([name, f"{d['p50']:.2f}", f"{d['p90']:.2f}", f"{d['p99']:.2f}",
                     f"{d['p50'] - base:+.2f}"])
    text = table(f"One-token Chat over loopback, {CALLS} calls each, one connection (ms)",
                 ["transport", "p50", "p90", "p99", "p50 vs gRPC"], rows)
    srows = []
    for name, key in (("gRPC", "grpc_streams"), ("Connect JSON", "connect_streams")):
        d = data[key]
        srows.append([name, f"{d['completed']}/{d['streams']}", f"{d['wall_s']:.2f}",
                      f"{d['tokens_per_s']:.0f}", str(d["server_threads_added"])])
    text += "\n" + table(f"{STREAMS} concurrent streams of {STREAM_TOKENS} tokens",
                         ["transport", "completed", "wall s", "tokens/s",
                          "server threads added"], srows)
    arows = [["uvicorn (the one served)", f"{data['connect_json_ms']['p50']:.2f}",
              f"{data['connect_streams']['wall_s']:.2f}",
              str(data["connect_streams"]["server_threads_added"])]]
    for kind, d in data["servers"].items():
        arows.append([kind, f"{d['connect_json_ms']['p50']:.2f}",
                      f"{d['streams']['wall_s']:.2f}", str(d["streams"]["server_threads_added"])]
                     if "error" not in d else [kind, d["error"], "-", "-"])
    text += "\n" + table("The same app on each ASGI server, in the gRPC server's event loop",
                         ["server", "Connect JSON p50 ms", f"{STREAMS} streams wall s",
                          "threads added"], arows)
    worst = max(data[k]["p50"] for k in ("connect_json_ms", "connect_binary_ms")) - base
    data["connect_overhead_p50_ms"] = worst
    data["port_off_cost_p50_ms"] = base - data["grpc_port_alone_ms"]["p50"]
    verdict = "met" if worst <= TARGET_MS else "MISSED"
    text += (f"\nConnect unary within {TARGET_MS:g} ms of gRPC (p50): {worst:+.2f} ms, "
             f"{verdict}; gRPC with the HTTP port on vs off: "
             f"{data['port_off_cost_p50_ms']:+.2f} ms\n")
    write_json(out, "http", data)
    return text, data


if __name__ == "__main__":
    print(run(Path("bench/results"))[0])
