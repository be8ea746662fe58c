"""Sharing a replica (`make bench` tenants section): tenant A keeps 40 long generations in
flight on a server with --max-running 8 --max-queue 32 while tenant B sends short chats one
after another; B's refusals and time to first token, against B alone on the idle server and
against both sending with one token (one tenant: the queue and its limit shared, as before
tenants). Then both tenants flood the replica with weights 3 and 1: each one's share of the
tokens generated."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
from eagle.v1 import chat_pb2, chat_pb2_grpc

from bench.common import pct, table, write_json
from service.engine.loader import load_model, resolve_model
from service.engine.scheduler import EngineSettings, NativeEngine
from service.server import BackgroundServer
from service.settings import Settings
from service.tenants import engine_shares, from_settings

RUNNING, QUEUE, FLOOD, SHORTS = 8, 32, 40, 20


def _request(tokens: int, text: str = "Tell me about the sea.", logprobs: bool = False):
    req = chat_pb2.StreamChatRequest(generation=chat_pb2.GenerationConfig(
        max_new_tokens=tokens, ignore_eos=True, logprobs=logprobs))
    req.messages.add(role=chat_pb2.ROLE_USER).parts.add(text=text)
    return req


def _server(lm, tokens: str) -> BackgroundServer:
    settings = Settings(port=0, max_running=RUNNING, max_queue=QUEUE, auth_token=tokens,
                        log_format="text", log_level="WARNING", grace_seconds=1)
    shares = engine_shares(from_settings(tokens, False))
    engine = NativeEngine(lm, EngineSettings(max_running=RUNNING, max_queue=QUEUE,
                                             tenants=shares))
    return BackgroundServer(settings, engine)


class _Flood:
    """`n` streams of `token`'s tenant kept in flight: each ended one is replaced; counts
    the tokens each tenant received (one logprob per token)."""

    def __init__(self, target: str, token: str, n: int, tokens: dict[str, int],
                 name: str) -> None:
        self.stop = threading.Event()
        self.channel = grpc.insecure_channel(target)
        self.stub = chat_pb2_grpc.ChatServiceStub(self.channel)
        self.meta = (("authorization", f"Bearer {token}"),)
        self.tokens, self.name = tokens, name
        self.calls: list = []
        self.threads = [threading.Thread(target=self._keep, daemon=True) for _ in range(n)]
        for t in self.threads:
            t.start()

    def _keep(self) -> None:
        while not self.stop.is_set():
            call = self.stub.StreamChat(_request(3000, logprobs=True), metadata=self.meta,
                                        timeout=120)
            self.calls.append(call)
            try:
                for chunk in call:
                    self.tokens[self.name] = self.tokens.get(self.name, 0) + len(chunk.logprobs)
                    if self.stop.is_set():
                        call.cancel()
                        break
            except grpc.RpcError:
                time.sleep(0.05)  # refused (its queue is full) or cancelled at the end

    def close(self) -> None:
        self.stop.set()
        for call in self.calls:
            call.cancel()
        for t in self.threads:
            t.join(10)
        self.channel.close()


def _shorts(target: str, token: str, n: int = SHORTS) -> dict:
    """B's short chats one after another: refusals and time to first token."""
    channel = grpc.insecure_channel(target)
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    meta = (("authorization", f"Bearer {token}"),)
    ttft, refused = [], 0
    for _ in range(n):
        start = time.perf_counter()
        try:
            for _chunk in stub.StreamChat(_request(8), metadata=meta, timeout=60):
                ttft.append(time.perf_counter() - start)
                break
        except grpc.RpcError as err:
            if err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                refused += 1
            else:
                raise
    channel.close()
    return {"requests": n, "refused": refused,
            "ttft_p50_ms": pct(ttft, 0.5) * 1000, "ttft_p90_ms": pct(ttft, 0.9) * 1000}


def share_of_b(lm) -> list[dict]:
    rows = []
    with _server(lm, "a:tokA\nb:tokB") as srv:
        rows.append({"case": "B alone, idle replica", **_shorts(srv.target, "tokB")})
        flood = _Flood(srv.target, "tokA", FLOOD, {}, "a")
        time.sleep(2.0)  # A's 40 in flight: 8 running, 32 queued
        try:
            rows.append({"case": "B beside A's 40, two tenants", **_shorts(srv.target, "tokB")})
            rows.append({"case": "the same, one shared token (no tenants)",
                         **_shorts(srv.target, "tokA")})
        finally:
            flood.close()
        srv.app.engine.drain(0)
    return rows


def weighted_share(lm, seconds: float = 8.0) -> dict:
    tokens: dict[str, int] = {}
    with _server(lm, "a:tokA weight=3\nb:tokB weight=1") as srv:
        floods = [_Flood(srv.target, "tokA", 24, tokens, "a"),
                  _Flood(srv.target, "tokB", 24, tokens, "b")]
        time.sleep(2.0)
        before = dict(tokens)
        time.sleep(seconds)
        after = dict(tokens)
        for f in floods:
            f.close()
        srv.app.engine.drain(0)
    got = {k: after.get(k, 0) - before.get(k, 0) for k in ("a", "b")}
    total = sum(got.values()) or 1
    return {"seconds": seconds, "tokens_a": got["a"], "tokens_b": got["b"],
            "share_a": got["a"] / total, "share_b": got["b"] / total}


def run(out: Path) -> tuple[str, dict]:
    lm = load_model(resolve_model("tiny"), "cpu")
    rows = share_of_b(lm)
    weighted = weighted_share(lm)
    idle = rows[0]["ttft_p50_ms"]
    text = table(
        f"Tenant B's short chats ({SHORTS}, one at a time) while tenant A keeps {FLOOD} long "
        f"generations in flight (--max-running {RUNNING} --max-queue {QUEUE}; tiny model, "
        f"CPU)",
        ["case", "B refused", "B TTFT p50 ms", "p90 ms", "p50 vs idle"],
        [[r["case"], f"{r['refused']} of {r['requests']}", f"{r['ttft_p50_ms']:.1f}",
          f"{r['ttft_p90_ms']:.1f}",
          f"{r['ttft_p50_ms'] / idle:.1f}x" if r["ttft_p50_ms"] == r["ttft_p50_ms"] else "-"]
         for r in rows])
    text += (f"\nWeights 3 and 1, both tenants keeping 24 long generations in flight for "
             f"{weighted['seconds']:.0f} s: A got {weighted['share_a']:.1%} of the "
             f"{weighted['tokens_a'] + weighted['tokens_b']:,} tokens generated, B "
             f"{weighted['share_b']:.1%} (by weight: 75% and 25%)\n")
    return text, {"b_beside_a": rows, "weighted": weighted}


if __name__ == "__main__":
    text, data = run(Path("bench/results"))
    print(text)
    print(write_json(Path("bench/results"), "tenants", data))
