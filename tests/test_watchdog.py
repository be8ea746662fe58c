"""A wedged model step: running calls get UNAVAILABLE, health flips, the server asks to exit."""
from __future__ import annotations

import time

import grpc
import pytest
from conftest import make_engine
from eagle.v1 import chat_pb2, chat_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import RunningServer


def test_a_step_over_its_limit_fails_calls_with_unavailable_and_flips_health(tiny) -> None:
    engine = make_engine(tiny, step_timeout_s=0.5)

    def hang(stage: str, what) -> None:
        if stage == "step":
            time.sleep(3)  # a kernel that never returns, as far as the watchdog knows

    with RunningServer(engine) as srv:
        engine.fault_hook = hang
        channel = grpc.insecure_channel(srv.target)
        req = chat_pb2.ChatRequest(generation=chat_pb2.GenerationConfig(max_new_tokens=5))
        req.messages.add(role=chat_pb2.ROLE_USER).parts.add(text="hi")
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            chat_pb2_grpc.ChatServiceStub(channel).Chat(req, timeout=30)
        assert time.monotonic() - start < 2.8  # before the 3 s hang ends
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "stuck for over 0.5 s; this replica is restarting" in info.value.details()
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            time.sleep(0.05)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert srv.app.failed.is_set()  # serve() turns this into exit code 3
        engine.fault_hook = None
    # the stuck step ends (3 s) and the stopped loop returns: no engine thread is left inside
    # torch when the interpreter exits (one there aborts the process: exit 134, not 0)
    engine.drain(0)
    engine._thread.join(10)
    assert not engine._thread.is_alive()


def test_an_engine_thread_that_dies_fails_held_calls_and_refuses_new_ones(tiny) -> None:
    """An error outside a step's own handling (here in admission) ends the engine thread: the
    call it held fails at once with UNAVAILABLE and the engine is wedged (the supervisor
    restarts it), instead of the call waiting on a thread that is gone."""
    from service.engine.job import (
        ChatJob,
        ChatMessage,
        Role,
        SamplingParams,
        TextPart,
        Unavailable,
    )

    engine = make_engine(tiny)

    def broken():
        raise RuntimeError("admission broke")

    engine._admit = broken
    job = ChatJob("dies", (ChatMessage(Role.USER, (TextPart("hi"),)),),
                  SamplingParams(max_new_tokens=4))
    start = time.monotonic()
    with pytest.raises(Unavailable, match="^the engine stopped after an internal error; this "
                                          "replica is restarting, retry on another$"):
        list(engine.submit(job))
    assert time.monotonic() - start < 5
    assert engine.wedged
    with pytest.raises(Unavailable):
        engine.submit(job)
