"""gRPC lifecycle rules: message cap, RPC cap, keepalive, errors mid-stream, retries, deadlines,
and the loader's other inputs (sharded checkpoints, hub ids from the local cache)."""
from __future__ import annotations

import json
import threading
import time

import factory
import grpc
import numpy as np
import pytest
import torch
from conftest import make_engine
from eagle.v1 import chat_pb2, chat_pb2_grpc
from harness import RunningServer
from PIL import Image
from safetensors.torch import load_file, save_file

from client import EagleClient, EagleError
from service.engine.config import ModelLoadError
from service.engine.job import Delta, OutOfMemory, Unavailable
from service.engine.loader import load_model, resolve_model


def request(text: str = "hi", message=chat_pb2.ChatRequest, **gen) -> chat_pb2.ChatRequest:
    req = message(generation=chat_pb2.GenerationConfig(**gen))
    req.messages.add(role=chat_pb2.ROLE_USER).parts.add(text=text)
    return req


def _handled(srv) -> float:
    return sum(s.value for m in srv.app.metrics.requests.collect() for s in m.samples
               if s.name == "eagle_requests_total")


def test_message_cap_rejects_before_the_handler(tiny) -> None:
    cap = 300_000
    with RunningServer(make_engine(tiny), max_request_bytes=cap) as srv:
        stub = chat_pb2_grpc.ChatServiceStub(grpc.insecure_channel(srv.target))
        over = request()
        over.messages[0].parts.add(image=chat_pb2.Image(uri="x" * cap))
        with pytest.raises(grpc.RpcError) as info:
            stub.Chat(over, timeout=10)
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _handled(srv) == 0
        noise = np.random.default_rng(0).integers(0, 255, (300, 330, 3), dtype=np.uint8)
        under = request(max_new_tokens=1)
        under.messages[0].parts.add(image=chat_pb2.Image(
            data=factory.encode(Image.fromarray(noise), "PNG")))
        assert cap - 10_000 < under.ByteSize() < cap
        assert stub.Chat(under, timeout=60).usage.completion_tokens == 1


class _Scripted:
    """A stand-in job stream: yields the scripted items, raising exceptions among them."""

    def __init__(self, items) -> None:
        self.items = items
        self.done = threading.Event()

    def cancel(self) -> None:
        pass

    async def __aiter__(self):
        for item in self.items:
            if isinstance(item, Exception):
                self.done.set()
                raise item
            yield item
        self.done.set()


class _ScriptedEngine:
    """Fails or scripts the first submits, then hands over to the real engine."""

    def __init__(self, real, scripts) -> None:
        self.real, self.scripts, self.jobs = real, list(scripts), []

    def submit(self, job):
        self.jobs.append(job)
        if self.scripts:
            script = self.scripts.pop(0)
            if isinstance(script, Exception):
                raise script
            return _Scripted(script)
        return self.real.submit(job)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_an_error_after_three_chunks_arrives_with_its_exact_status(tiny) -> None:
    oom = OutOfMemory("the model ran out of memory for this request")
    engine = _ScriptedEngine(make_engine(tiny), [[Delta("a"), Delta("b"), Delta("c"), oom]])
    with RunningServer(engine, warmup=False) as srv:
        stub = chat_pb2_grpc.ChatServiceStub(grpc.insecure_channel(srv.target))
        got = []
        with pytest.raises(grpc.RpcError) as info:
            for chunk in stub.StreamChat(request(message=chat_pb2.StreamChatRequest), timeout=10):
                got.append(chunk.text)
        assert got == ["a", "b", "c"]
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.details() == "the model ran out of memory for this request"


def test_unavailable_is_retried_and_a_started_stream_is_not(tiny) -> None:
    busy = Unavailable("the server is warming up; retry shortly")
    engine = _ScriptedEngine(make_engine(tiny), [busy, busy])
    with RunningServer(engine, warmup=False) as srv, EagleClient(srv.target) as client:
        assert client.chat("hi", max_new_tokens=2).usage.completion_tokens == 2
        assert len(engine.jobs) == 3  # two refusals, then the real answer
        engine.scripts = [[Delta("first"), Unavailable("the engine went away")]]
        engine.jobs.clear()
        with pytest.raises(EagleError) as info:
            list(client.stream_chat("hi"))
        assert info.value.code is grpc.StatusCode.UNAVAILABLE and len(engine.jobs) == 1


def test_calls_without_a_deadline_get_the_server_default(tiny) -> None:
    engine = _ScriptedEngine(make_engine(tiny), [])
    with RunningServer(engine, warmup=False, default_deadline_s=42.0) as srv:
        stub = chat_pb2_grpc.ChatServiceStub(grpc.insecure_channel(srv.target))
        stub.Chat(request(max_new_tokens=1))
        stub.Chat(request(max_new_tokens=1), timeout=5)
    no_deadline, with_deadline = engine.jobs
    assert 41 < no_deadline.deadline - no_deadline.created <= 42
    assert 4 < with_deadline.deadline - with_deadline.created <= 5.1  # the caller's 5 s


def test_concurrent_rpc_cap_sheds_load_at_once(tiny) -> None:
    with RunningServer(make_engine(tiny), max_concurrent_rpcs=2) as srv:
        stub = chat_pb2_grpc.ChatServiceStub(grpc.insecure_channel(srv.target))
        held = [stub.StreamChat(request(message=chat_pb2.StreamChatRequest, max_new_tokens=4000, ignore_eos=True), timeout=60)
                for _ in range(2)]
        for call in held:
            next(call)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            stub.Chat(request(max_new_tokens=1), timeout=10)
        assert time.monotonic() - start < 1.5
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "Concurrent RPC limit exceeded" in info.value.details()
        for call in held:
            call.cancel()


def test_keepalive_pings_too_often_get_goaway_agreed_ones_survive(tiny) -> None:
    engine = make_engine(tiny, max_running=1, max_queue=4)
    # measured: the GOAWAY comes ~2 s in, whatever ping interval the client asks for; the
    # busy stream must outlast that (4000 tokens took ~2.2 s here: a race that failed often)
    with RunningServer(engine, min_ping_interval_ms=1000, max_ping_strikes=1,
                       keepalive_time_ms=300, keepalive_timeout_ms=5000,
                       max_new_tokens=16000) as srv:
        good = chat_pb2_grpc.ChatServiceStub(grpc.insecure_channel(srv.target))
        busy = good.StreamChat(request(message=chat_pb2.StreamChatRequest,
                                       max_new_tokens=16000, ignore_eos=True), timeout=60)
        next(busy)  # the engine is busy: the next call waits in the queue, no data flowing
        rude = grpc.insecure_channel(srv.target, options=[
            ("grpc.keepalive_time_ms", 50), ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0)])
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            chat_pb2_grpc.ChatServiceStub(rude).Chat(request(max_new_tokens=1), timeout=20)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert info.value.details() == "Too many pings"  # GOAWAY ENHANCE_YOUR_CALM
        assert time.monotonic() - start < 10
        busy.cancel()
        with EagleClient(srv.target) as client:  # the library's settings agree with the server's
            stream = client.stream_chat("hi", max_new_tokens=4000, ignore_eos=True)
            start = time.monotonic()
            for _ in stream:
                if time.monotonic() - start > 1.0:  # > 2x the server's 300 ms keepalive
                    stream.cancel()
                    break
        assert time.monotonic() - start > 1.0
    engine.drain(0)


def test_sharded_checkpoints_load_to_the_same_model(tiny, tiny_dir, tmp_path) -> None:
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_dir / name).read_bytes())
    sd = load_file(str(tiny_dir / "model.safetensors"))
    keys = sorted(sd)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half],
              "model-00002-of-00002.safetensors": keys[half:]}
    for file, names in shards.items():
        save_file({k: sd[k] for k in names}, str(tmp_path / file))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, names in shards.items() for k in names}}))
    sharded = load_model(tmp_path, device="cpu")
    ids = torch.tensor([[1, 20, 30, 40]])
    with torch.inference_mode():
        a = sharded.model.language_model(input_ids=ids).logits
        b = tiny.model.language_model(input_ids=ids).logits
    assert torch.equal(a, b)


def test_hub_ids_resolve_from_the_local_cache_only(tiny_dir, tmp_path, monkeypatch) -> None:
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--nvidia--Eagle2-tiny"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    for file in tiny_dir.iterdir():
        (snap / file.name).write_bytes(file.read_bytes())
    assert resolve_model("nvidia/Eagle2-tiny") == snap
    with pytest.raises(ModelLoadError, match="'nvidia/Eagle2-1B' is not in the local Hugging "
                                             "Face cache and this server never downloads"):
        resolve_model("nvidia/Eagle2-1B")
    with pytest.raises(ModelLoadError, match="neither 'tiny', a folder, nor a hub id"):
        resolve_model("/no/such/folder/x")
