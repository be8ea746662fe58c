"""Serving over real gRPC on 127.0.0.1: latency and throughput by concurrency, sequential
baseline in the same run, the cost of gRPC itself, and the server's memory under load."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from eagle.v1 import chat_pb2, chat_pb2_grpc

from bench.common import free_port, pct, table, tree_status
from client._common import build_request, channel_options
from tests import factory

TOKENS = 32


class ServerProcess:
    def __init__(self, max_running: int = 64) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), "protos"]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "--port", str(self.port), "--max-running",
             str(max_running), "--max-queue", "256", "--log-level", "WARNING"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(self.target))
        end = time.monotonic() + 180
        while time.monotonic() < end:
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                time.sleep(0.3)
        raise RuntimeError("the server did not start")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


async def _one(stub, request) -> dict:
    start = time.perf_counter()
    stamps = []
    tokens = 0
    async for chunk in stub.StreamChat(request, timeout=600):
        if chunk.text:
            stamps.append(time.perf_counter())
        if chunk.finish_reason:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"ttft": stamps[0] - start if stamps else end - start, "e2e": end - start,
            "itl": sum(gaps) / len(gaps) if gaps else 0.0, "tokens": tokens}


async def _level(target: str, request, concurrency: int, total: int) -> dict:
    """`request` is one ChatRequest, or a function of the request number returning one."""
    make = request if callable(request) else (lambda i: request)
    async with grpc.aio.insecure_channel(target, options=channel_options()) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        await _one(stub, make(-1))  # warm the path
        queue = list(range(total))
        results: list[dict] = []

        async def worker() -> None:
            while queue:
                results.append(await _one(stub, make(queue.pop())))

        start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.perf_counter() - start
    ms = lambda key, q: pct([r[key] for r in results], q) * 1000  # noqa: E731
    return {"concurrency": concurrency, "requests": total, "wall_s": wall,
            "tokens_per_s": sum(r["tokens"] for r in results) / wall,
            **{f"{k}_p{int(q * 100)}_ms": ms(k, q) for k in ("ttft", "itl", "e2e")
               for q in (0.5, 0.9, 0.99)}}


def _grpc_cost(target: str, engine_factory) -> dict:
    """The same 1 MB image request in process and over 127.0.0.1, median of 10."""
    image = factory.encode(factory.photo(1400, 1050, seed=5), "JPEG", quality=97)
    request = build_request("What is in this picture?", images=[image], max_new_tokens=1,
                            max_tiles_per_image=1)
    from service.converters import Limits, to_job
    from service.settings import Settings

    engine = engine_factory()
    limits = Limits.from_settings(Settings(), engine.info())
    local = []
    for _ in range(11):
        start = time.perf_counter()
        list(engine.submit(to_job(request, limits, "bench")))
        local.append(time.perf_counter() - start)
    engine.drain(0)
    remote = []
    with grpc.insecure_channel(target, options=channel_options()) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        for _ in range(11):
            start = time.perf_counter()
            stub.Chat(request, timeout=60)
            remote.append(time.perf_counter() - start)
    inproc, over = pct(local[1:], 0.5) * 1000, pct(remote[1:], 0.5) * 1000
    return {"image_bytes": len(image), "in_process_ms": inproc, "grpc_ms": over,
            "grpc_cost_ms": over - inproc}


def run(out: Path, engine_factory, levels=(1, 4, 16, 64)) -> tuple[str, dict]:
    images = [factory.encode(factory.photo(1024, 768, seed=i), "JPEG") for i in range(160)]
    counter = iter(range(10**9))

    def one_image(_: int):  # a different image every time: no help from the vision cache
        return build_request("What is in this picture?", images=[images[next(counter) % 160]],
                             max_new_tokens=TOKENS, max_tiles_per_image=6,
                             message=chat_pb2.StreamChatRequest)

    # (request, requests at concurrency c): text runs long enough (8 per client, at least
    # 64) for a level to last a second or more; an image request costs ~50x more
    workloads = {
        "text": (build_request("Write a short story about a lighthouse.",
                               max_new_tokens=TOKENS, message=chat_pb2.StreamChatRequest),
                 lambda c: max(64, 8 * c)),
        "1 image (7 tiles)": (one_image, lambda c: max(16, 2 * c)),
    }
    server = ServerProcess()
    rows, record = [], {"serving": [], "memory": {}}
    try:
        # idle = after one request of each workload: first-use costs (codec libraries mapped,
        # lazy imports) are part of a serving process's idle size, not of the load
        for request, _ in workloads.values():
            asyncio.run(_level(server.target, request, 1, 1))
        time.sleep(3)
        idle = tree_status(server.proc.pid, "VmRSS")
        for name, (request, count) in workloads.items():
            seq = asyncio.run(_level(server.target, request, 1, count(1)))
            base = seq["tokens_per_s"]
            for c in levels:
                r = seq if c == 1 else asyncio.run(_level(server.target, request, c, count(c)))
                r["workload"] = name
                r["speedup_vs_sequential"] = r["tokens_per_s"] / base
                record["serving"].append(r)
                rows.append([name, c, r["requests"], f"{r['tokens_per_s']:.0f}",
                             f"{r['speedup_vs_sequential']:.1f}x",
                             f"{r['ttft_p50_ms']:.0f} / {r['ttft_p90_ms']:.0f} / "
                             f"{r['ttft_p99_ms']:.0f}",
                             f"{r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f}",
                             f"{r['e2e_p50_ms']:.0f} / {r['e2e_p99_ms']:.0f}"])
        peak = tree_status(server.proc.pid, "VmHWM")
        time.sleep(3)
        after = tree_status(server.proc.pid, "VmRSS")
        record["memory"] = {"idle_rss_mb": idle / 1024, "peak_rss_mb": peak / 1024,
                            "after_rss_mb": after / 1024,
                            "after_vs_idle": after / idle if idle else float("nan")}
        cost = _grpc_cost(server.target, engine_factory)
        record["grpc_cost"] = cost
    finally:
        server.stop()
    text = table(f"Serving over gRPC on 127.0.0.1, tiny model, {TOKENS} tokens per reply "
                 f"(concurrency 1 = the sequential baseline)",
                 ["workload", "concurrency", "requests", "output tok/s", "vs sequential",
                  "TTFT p50/p90/p99 ms", "ITL p50/p99 ms", "e2e p50/p99 ms"], rows)
    m = record["memory"]
    text += (f"\nServer RSS: idle {m['idle_rss_mb']:.0f} MB, peak {m['peak_rss_mb']:.0f} MB, "
             f"after the load {m['after_rss_mb']:.0f} MB ({m['after_vs_idle']:.2f}x idle).\n"
             f"gRPC cost for a {cost['image_bytes'] / 1e6:.2f} MB image, 1 tile, 1 token: "
             f"in process {cost['in_process_ms']:.1f} ms, over 127.0.0.1 "
             f"{cost['grpc_ms']:.1f} ms (+{cost['grpc_cost_ms']:.1f} ms).\n")
    return text, record
