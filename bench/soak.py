"""`make soak`: a mixed load on 127.0.0.1 with client cancels, deadlines from 50 ms to 10 s,
poisoned media, oversized payloads and one SIGTERM-and-restart midway. A ledger on both sides
must agree: every accepted request ended with exactly one status, every OK stream ended with
a final chunk, and the server's in-flight count, threads and memory came back to baseline."""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
from eagle.v1 import chat_pb2 as P
from eagle.v1 import chat_pb2_grpc

from bench.common import free_port, table, tree_status, write_json
from tests import factory


class Server:
    """`python -m service` with a ledger file and a metrics port; restartable on one port."""

    def __init__(self, port: int, media: Path, ledger: Path) -> None:
        self.port, self.media, self.ledger = port, media, ledger
        self.target = f"127.0.0.1:{port}"
        self.metrics_port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), "protos"]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "--port", str(self.port), "--media-root",
             str(self.media), "--ledger-file", str(self.ledger), "--metrics-port",
             str(self.metrics_port), "--max-request-bytes", str(4 * 1024 * 1024),
             "--max-running", "16", "--max-queue", "48", "--video-workers", "1",
             "--grace-seconds", "5", "--log-level", "WARNING"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(self.target))
        end = time.monotonic() + 120
        while time.monotonic() < end:
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                time.sleep(0.2)
        raise RuntimeError("the server did not come up")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def gauge(self, name: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                      timeout=5).read().decode()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return math.nan


def _plan(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    plans = []
    for i in range(n):
        roll = rng.random()
        kind = ("oversize" if roll < 0.01 else "poison" if roll < 0.06 else
                rng.choice(["text", "text", "image", "video"]))
        plans.append({"id": f"soak-{seed}-{i}", "kind": kind, "stream": rng.random() < 0.6,
                      "deadline": math.exp(rng.uniform(math.log(0.05), math.log(10))),
                      "cancel_after": rng.randint(1, 5) if rng.random() < 0.1 else 0,
                      "tokens": rng.randint(1, 48)})
    return plans


def _request(plan: dict, media: dict) -> P.ChatRequest | P.StreamChatRequest:
    r = (P.StreamChatRequest if plan["stream"] else P.ChatRequest)(request_id=plan["id"],
                      generation=P.GenerationConfig(max_new_tokens=plan["tokens"]),
                      vision=P.VisionConfig(max_tiles_per_image=4))
    m = r.messages.add(role=P.ROLE_USER)
    kind = plan["kind"]
    if kind == "image":
        m.parts.add(image=P.Image(data=media["image"]))
    elif kind == "video":
        m.parts.add(video=P.Video(uri="clip.mp4", num_frames=4))
    elif kind == "poison":
        m.parts.add(image=P.Image(data=media["poison"])) if random.random() < 0.5 else \
            m.parts.add(video=P.Video(data=media["poison_video"], num_frames=4))
    elif kind == "oversize":
        m.parts.add(image=P.Image(data=media["oversize"]))
    m.parts.add(text=f"request {plan['id']}: describe")
    return r


async def _one(stub, plan: dict, media: dict, ledger: dict) -> None:
    req = _request(plan, media)
    entry = {"code": None, "chunks": 0, "final": False}
    try:
        if plan["stream"]:
            call = stub.StreamChat(req, timeout=plan["deadline"])
            async for chunk in call:
                entry["chunks"] += 1
                if chunk.finish_reason:
                    entry["final"] = True
                if plan["cancel_after"] and entry["chunks"] >= plan["cancel_after"] \
                        and not entry["final"]:
                    call.cancel()
                    break
            entry["code"] = "CANCELLED" if call.cancelled() and not entry["final"] else "OK"
        else:
            await stub.Chat(req, timeout=plan["deadline"])
            entry["code"], entry["final"] = "OK", True
    except grpc.RpcError as err:
        entry["code"] = err.code().name
    except asyncio.CancelledError:
        entry["code"] = "CANCELLED"
    if plan["id"] in ledger:
        raise AssertionError(f"{plan['id']} ended twice on the client")
    ledger[plan["id"]] = entry


async def _drive(target: str, plans: list[dict], media: dict, concurrency: int, ledger: dict,
                 midway) -> None:
    async with grpc.aio.insecure_channel(target, options=[
            ("grpc.max_send_message_length", 16 * 1024 * 1024),
            ("grpc.enable_retries", 0)]) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        queue = list(reversed(plans))
        fired = False
        gate = asyncio.Event()  # closed while the server restarts: no request is sent then
        gate.set()

        async def worker() -> None:
            nonlocal fired
            while queue:
                await gate.wait()
                plan = queue.pop()
                await _one(stub, plan, media, ledger)
                if not fired and len(ledger) >= len(plans) // 2:
                    fired = True
                    gate.clear()
                    await asyncio.to_thread(midway)
                    gate.set()

        await asyncio.gather(*[worker() for _ in range(concurrency)])


def run(requests: int, concurrency: int, out: Path | None, seed: int = 7) -> dict:
    work = Path(tempfile.mkdtemp(prefix="eagle-soak-"))
    media_dir = work / "media"
    media_dir.mkdir()
    factory.video(media_dir / "clip.mp4", seconds=3, fps=10)
    image = factory.encode(factory.photo(640, 480), "JPEG")
    media = {"image": image, "poison": image[: len(image) // 3],
             "poison_video": b"\x1aE\xdf\xa3" + os.urandom(4000),
             "oversize": os.urandom(5 * 1024 * 1024)}
    ledger_file = work / "ledger.jsonl"
    server = Server(free_port(), media_dir, ledger_file)
    server.start()
    time.sleep(1)
    baseline = {"threads": tree_status(server.proc.pid, "Threads"),
                "rss_mb": tree_status(server.proc.pid, "VmRSS") / 1024}
    exits: list[int] = []

    def midway() -> None:  # SIGTERM under load, then a fresh process on the same port
        exits.append(server.stop())
        server.start()
        time.sleep(1)
        baseline.update(threads=tree_status(server.proc.pid, "Threads"),
                        rss_mb=tree_status(server.proc.pid, "VmRSS") / 1024)

    plans = _plan(requests, seed)
    client: dict[str, dict] = {}
    start = time.monotonic()
    asyncio.run(_drive(server.target, plans, media, concurrency, client, midway))
    duration = time.monotonic() - start
    time.sleep(1.5)
    after = {"threads": tree_status(server.proc.pid, "Threads"),
             "rss_mb": tree_status(server.proc.pid, "VmRSS") / 1024,
             "in_flight": server.gauge("eagle_jobs_in_flight"),
             "rpcs_active": server.gauge("eagle_rpcs_active")}
    exits.append(server.stop())
    records = [json.loads(line) for line in ledger_file.read_text().splitlines()]
    accepted = Counter(r["id"] for r in records if r["event"] == "accepted")
    terminal = Counter(r["id"] for r in records if r["event"] == "terminal")
    codes = Counter(e["code"] for e in client.values())
    checks = {
        "every request has exactly one client status": len(client) == requests
        and all(e["code"] for e in client.values()),
        "accepted == terminal on the server": accepted == terminal,
        "no request accepted or ended twice": max(accepted.values(), default=1) == 1
        and max(terminal.values(), default=1) == 1,
        "every OK stream got its final chunk": all(e["final"] for e in client.values()
                                                   if e["code"] == "OK"),
        "never UNKNOWN or INTERNAL": not ({"UNKNOWN", "INTERNAL"} & set(codes)),
        "in-flight back to 0": after["in_flight"] == 0 and after["rpcs_active"] == 0,
        "threads back at baseline": after["threads"] <= baseline["threads"] + 2,
        "RSS within 25% of baseline": after["rss_mb"] <= baseline["rss_mb"] * 1.25,
        "both server runs exited 0": exits == [0, 0],
    }
    faults = Counter(p["kind"] for p in plans if p["kind"] in ("poison", "oversize"))
    result = {"requests": requests, "concurrency": concurrency, "duration_s": duration,
              "codes": dict(codes), "server_accepted": len(accepted),
              "cancels_planned": sum(1 for p in plans if p["cancel_after"]),
              "poisoned": faults["poison"], "oversized": faults["oversize"],
              "restarts": 1, "baseline": baseline, "after": after, "checks": checks}
    rows = [[k, "yes" if v else "NO"] for k, v in checks.items()]
    text = table(f"Soak: {requests} requests at concurrency {concurrency} in {duration:.0f} s; "
                 f"codes {dict(codes)}; {faults['poison']} poisoned, {faults['oversize']} "
                 f"oversized, {result['cancels_planned']} client cancels, 1 SIGTERM+restart",
                 ["ledger check", "holds"], rows)
    print(text)
    if out is not None:
        print(f"(JSON: {write_json(out, 'soak', result)})")
    return result


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.soak")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    result = run(args.requests, args.concurrency, Path(args.out))
    sys.exit(0 if all(result["checks"].values()) else 1)


if __name__ == "__main__":
    main()
