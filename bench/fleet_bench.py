"""Fleet: aggregate tokens/s of one replica vs two behind the client library's round_robin,
on this machine, for the text workload of the serving benchmark."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

from eagle.v1 import chat_pb2

from bench.common import table
from bench.serving_bench import TOKENS, ServerProcess, _level
from client._common import build_request

CONCURRENCY = 16


def run(out: Path) -> tuple[str, dict]:
    request = build_request("Write a short story about a lighthouse.", max_new_tokens=TOKENS,
                            message=chat_pb2.StreamChatRequest)
    servers: list[ServerProcess] = []
    rows = []
    try:
        for n in (1, 2):
            while len(servers) < n:
                servers.append(ServerProcess())
            target = "ipv4:" + ",".join(f"127.0.0.1:{s.port}" for s in servers)
            asyncio.run(_level(target, request, CONCURRENCY, 2 * CONCURRENCY))  # warm both
            r = asyncio.run(_level(target, request, CONCURRENCY, 16 * CONCURRENCY))
            rows.append({"replicas": n, **r})
    finally:
        for s in servers:
            s.stop()
    ratio = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    text = table(f"Fleet: text workload ({TOKENS} tokens), concurrency {CONCURRENCY}, "
                 f"round_robin over 127.0.0.1 replicas, {os.cpu_count()} cores",
                 ["replicas", "requests", "output tok/s", "TTFT p50 ms", "e2e p50 ms"],
                 [[r["replicas"], r["requests"], f"{r['tokens_per_s']:.0f}",
                   f"{r['ttft_p50_ms']:.0f}", f"{r['e2e_p50_ms']:.0f}"] for r in rows])
    text += f"\n2 replicas give {ratio:.2f}x the tokens/s of 1 on {os.cpu_count()} cores.\n"
    return text, {"fleet": rows, "two_vs_one": ratio, "cores": os.cpu_count()}
