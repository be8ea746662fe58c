"""The engine in its own process: same answers and errors as in process, and what happens
when the child is overloaded, cancelled, drained, fails to load or dies."""
from __future__ import annotations

import os
import signal
import time
from dataclasses import replace

import factory
import grpc
import pytest
from eagle.v1 import chat_pb2, chat_pb2_grpc
from test_process import _wait_serving, long_request, serve

from preprocess.errors import MediaError
from service.engine.job import (
    Cancelled,
    ChatJob,
    ChatMessage,
    Finished,
    ImagePart,
    ModelLoadError,
    Overloaded,
    Role,
    SamplingParams,
    TextPart,
    Unavailable,
)
from service.engine_process import EngineProcess
from service.settings import Settings


def _settings(tiny_dir, **kw) -> Settings:
    return Settings(cache_dir=str(tiny_dir.parent), video_workers=0, log_level="WARNING", **kw)


def _job(rid: str, text: str = "Describe the picture.", image: bytes | None = None,
         tokens: int = 12, ignore_eos: bool = False) -> ChatJob:
    parts = ((ImagePart(data=image),) if image else ()) + (TextPart(text),)
    return ChatJob(rid, (ChatMessage(Role.USER, parts),),
                   SamplingParams(max_new_tokens=tokens, ignore_eos=ignore_eos))


def _run(engine, job) -> tuple[str, object]:
    text, last = "", None
    try:
        for event in engine.submit(job):
            if isinstance(event, Finished):
                last = event
            else:
                text += event.text
    except Exception as exc:  # the error the stream ended with
        last = exc
    return text, last


@pytest.fixture(scope="module")
def child(tiny_dir):
    eng = EngineProcess(_settings(tiny_dir, max_running=1, max_queue=0))
    yield eng
    eng.drain(0)


def test_same_tokens_usage_and_errors_as_the_engine_in_process(child, engine) -> None:
    image = factory.encode(factory.photo(900, 600, seed=3), "JPEG")
    for job in (_job("a", image=image), _job("b", text="Write a haiku about rain.", tokens=20)):
        there_text, there = _run(child, job)
        here_text, here = _run(engine, job)
        assert there_text == here_text and there_text
        assert there.text == here.text and there.reason == here.reason
        # the same but for what each engine's prefix cache held (the in-process engine is
        # shared by other tests)
        assert replace(there.usage, cached_prompt_tokens=0) == \
            replace(here.usage, cached_prompt_tokens=0)
    again = _run(child, _job("b2", text="Write a haiku about rain.", tokens=20))[1]
    assert again.usage.cached_prompt_tokens >= 16  # the count crosses the pipe too
    # errors cross the pipe with their class, message and field path
    bad = _job("c", image=b"\x89PNG\r\n\x1a\nnot really")
    _, there = _run(child, bad)
    _, here = _run(engine, bad)
    assert type(there) is type(here)
    assert (str(there), there.field) == (str(here), here.field)
    assert "image" in str(there)


def test_a_job_has_left_the_count_when_its_caller_sees_it_end(child) -> None:
    """A caller that submits as soon as its last job ended (with an answer or an error) is
    admitted: the job stops counting in flight before its final event arrives, as in the
    engine itself (the child's end-of-stream marker may come in a later batch)."""
    bad = _job("bad", image=b"\x89PNG\r\n\x1a\nnot really")
    for i in range(30):
        _, last = _run(child, bad if i % 2 else _job(f"ok{i}", tokens=2))
        assert not isinstance(last, Overloaded), (i, str(last))
        assert isinstance(last, Finished if i % 2 == 0 else MediaError), (i, last)
    assert child.stats()["in_flight"] == 0


def test_over_capacity_is_refused_in_the_server_process_and_cancel_reaches_the_child(
        child) -> None:
    long = child.submit(_job("long", tokens=2000, ignore_eos=True))
    first = next(iter(long))
    assert first.text
    with pytest.raises(Overloaded) as refused:
        child.submit(_job("second"))
    assert str(refused.value) == "the server is at capacity (1 running, 0 queued); retry later"
    assert child.cancel("long") is True
    with pytest.raises(Cancelled, match="^cancelled by the client$"):
        for _ in long:
            pass
    stats = child.stats()
    assert stats["in_flight"] == 0 and stats["running"] == 0 and stats["steps"] > 0
    assert child.cancel("long") is False  # nothing by that id any more
    text, done = _run(child, _job("after", tokens=3, ignore_eos=True))
    assert isinstance(done, Finished) and done.usage.completion_tokens == 3


def test_drain_finishes_running_jobs_then_the_child_exits_0(tiny_dir) -> None:
    eng = EngineProcess(_settings(tiny_dir))
    stream = eng.submit(_job("d", tokens=40, ignore_eos=True))
    eng.drain(30)
    events = list(stream)
    assert isinstance(events[-1], Finished) and events[-1].usage.completion_tokens == 40
    assert eng.proc.exitcode == 0
    with pytest.raises(Unavailable, match="^the server is shutting down; retry on another"):
        eng.submit(_job("e"))


def test_a_model_that_cannot_load_is_reported_by_the_server_process(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="not an Eagle2 checkpoint folder") as err:
        EngineProcess(Settings(model=str(tmp_path), video_workers=0, log_level="ERROR"))
    assert str(tmp_path) in str(err.value)


def _engine_child(server_pid: int) -> int:
    """The server's engine process (not multiprocessing's resource tracker)."""
    children = [int(p) for t in os.listdir(f"/proc/{server_pid}/task")
                for p in open(f"/proc/{server_pid}/task/{t}/children").read().split()]
    children = [p for p in children if b"spawn_main" in open(f"/proc/{p}/cmdline", "rb").read()
                and b"resource_tracker" not in open(f"/proc/{p}/cmdline", "rb").read()]
    assert len(children) == 1, children
    return children[0]


def _killed_mid_stream(target: str, server_pid: int) -> grpc.RpcError:
    """Start the long stream, SIGKILL the engine process once tokens flow; the stream's error."""
    stream = chat_pb2_grpc.ChatServiceStub(grpc.insecure_channel(target)).StreamChat(
        long_request(3000), timeout=60)
    assert next(stream).text
    os.kill(_engine_child(server_pid), signal.SIGKILL)
    with pytest.raises(grpc.RpcError) as err:
        for _ in stream:
            pass
    return err.value


def test_a_dead_engine_fails_only_its_calls_is_restarted_and_a_crash_loop_exits_3(
        tiny_dir) -> None:
    from harness import free_port

    metrics = free_port()
    proc, target = serve(tiny_dir, "--video-workers", "0", "--engine-restarts", "2",
                         "--metrics-port", str(metrics))
    try:
        _wait_serving(target, proc)
        first = _engine_child(proc.pid)
        # the server process itself never loads torch: a light front end (warm-up, events,
        # errors and model info have all crossed the pipe by now)
        assert "libtorch" not in open(f"/proc/{proc.pid}/maps").read()
        assert "libtorch" in open(f"/proc/{first}/maps").read()
        err = _killed_mid_stream(target, proc.pid)
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert err.details() == ("the model process exited unexpectedly (signal 9); it is "
                                 "restarting, retry on another replica")
        _wait_health(target, 2)  # NOT_SERVING while the new engine loads the model
        _wait_serving(target, proc, limit=60)  # then back
        assert _engine_child(proc.pid) != first
        import urllib.request

        scraped = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10)
        assert "eagle_engine_restarts_total 1.0" in scraped.read().decode()
        stub = chat_pb2_grpc.ChatServiceStub(grpc.insecure_channel(target))
        other = chat_pb2.ChatRequest(generation=chat_pb2.GenerationConfig(max_new_tokens=3))
        other.messages.add(role=chat_pb2.ROLE_USER).parts.add(text="hello")
        assert stub.Chat(other, timeout=30).usage.completion_tokens >= 1
        # the same request running at a second death: refused from then on, others served
        assert _killed_mid_stream(target, proc.pid).code() == grpc.StatusCode.UNAVAILABLE
        _wait_health(target, 2)
        _wait_serving(target, proc, limit=60)
        with pytest.raises(grpc.RpcError) as refused:
            next(stub.StreamChat(long_request(3000), timeout=30))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details() == (
            "this request was running both times the model process crashed; it is refused "
            "so it cannot take the replica down again")
        assert stub.Chat(other, timeout=30).usage.completion_tokens >= 1
        # a third death within the window: a crash loop, the server exits 3
        stream = stub.StreamChat(other, timeout=60)
        os.kill(_engine_child(proc.pid), signal.SIGKILL)
        list(_ignore_errors(stream))
        assert proc.wait(60) == 3
        log = proc.stderr.read()
        assert "the engine process died 3 times within 300 s: a crash loop" in log
        assert log.count("the engine process was restarted") == 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait_health(target: str, status: int, limit: float = 10.0) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
    end = time.monotonic() + limit
    while stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status != status:
        assert time.monotonic() < end, f"health never became {status}"
        time.sleep(0.05)


def _ignore_errors(stream):
    try:
        yield from stream
    except grpc.RpcError:
        return


def test_the_child_ignores_sigint_and_sigterm_sent_to_the_process_group(tiny_dir) -> None:
    eng = EngineProcess(_settings(tiny_dir))
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            os.kill(eng.pid, sig)
        time.sleep(0.3)
        assert eng.proc.is_alive()
        text, done = _run(eng, _job("f", tokens=4, ignore_eos=True))
        assert isinstance(done, Finished) and done.usage.completion_tokens == 4
    finally:
        eng.drain(0)
    assert eng.proc.exitcode == 0

