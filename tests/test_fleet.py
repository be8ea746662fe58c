"""A fleet of replicas on 127.0.0.1: client-side round_robin with health checking, failover
on a killed replica, rolling restarts, connection age. gRPC's own machinery throughout."""
from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import make_engine
from grpc_health.v1 import health_pb2
from harness import RunningServer, free_port
from test_process import _env, _wait_serving

from client import EagleClient, EagleError
from service import logs


def ipv4(ports) -> str:
    return "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)


class Replica:
    """`python -m service` on a fixed port (so a restart comes back at the same address),
    the tiny model in process, a ledger of every call it took."""

    def __init__(self, tiny_dir: Path, folder: Path, name: str, *flags: str) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.tiny_dir, self.flags = tiny_dir, flags
        self.ledger = folder / f"{name}.jsonl"
        self.runs: list[subprocess.Popen] = []

    def start(self) -> Replica:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "--port", str(self.port), "--cache-dir",
             str(self.tiny_dir.parent), "--engine-process", "false", "--video-workers", "0",
             "--grace-seconds", "10", "--log-level", "WARNING", "--ledger-file",
             str(self.ledger), *self.flags],
            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.runs.append(self.proc)
        return self

    def wait(self) -> Replica:
        _wait_serving(self.target, self.proc)
        return self

    def accepted(self) -> dict[str, float]:
        """request id -> when this replica accepted it."""
        if not self.ledger.exists():
            return {}
        lines = [json.loads(x) for x in self.ledger.read_text().splitlines() if x.strip()]
        return {r["id"]: r["t"] for r in lines if r["event"] == "accepted"}

    def served_ok(self) -> set[str]:
        lines = [json.loads(x) for x in self.ledger.read_text().splitlines() if x.strip()]
        return {r["id"] for r in lines if r["event"] == "terminal" and r["code"] == "OK"}

    def stop(self) -> None:
        for proc in self.runs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)


@pytest.fixture()
def replicas(tiny_dir, tmp_path):
    made: list[Replica] = []

    def make(n: int, *flags: str) -> list[Replica]:
        new = [Replica(tiny_dir, tmp_path, f"r{i}", *flags).start() for i in range(n)]
        made.extend(new)
        return [r.wait() for r in new]

    yield make
    for r in made:
        r.stop()


def test_three_replicas_share_300_requests_evenly(tiny) -> None:
    servers = [RunningServer(make_engine(tiny)) for _ in range(3)]
    try:
        with EagleClient(ipv4(s.port for s in servers), timeout=60) as client:
            with ThreadPoolExecutor(6) as pool:
                list(pool.map(lambda i: client.chat("hi", max_new_tokens=1), range(300)))
        calls = [s.app.servicer.calls for s in servers]
        assert sum(calls) == 300
        assert all(75 <= c <= 125 for c in calls), calls  # +-25% of even
    finally:
        for s in servers:
            s.stop()
            s.app.engine.drain(0)


def test_a_replica_reporting_not_serving_gets_no_calls(tiny) -> None:
    servers = [RunningServer(make_engine(tiny)) for _ in range(2)]
    try:
        warming = servers[1]
        warming.call(warming.app._set_health(health_pb2.HealthCheckResponse.NOT_SERVING))
        with EagleClient(ipv4(s.port for s in servers), timeout=60) as client:
            for _ in range(40):
                client.chat("hi", max_new_tokens=1)
            assert [s.app.servicer.calls for s in servers] == [40, 0]
            # once it reports SERVING it takes its share again
            warming.call(warming.app._set_health(health_pb2.HealthCheckResponse.SERVING))
            time.sleep(0.5)
            for _ in range(40):
                client.chat("hi", max_new_tokens=1)
            assert warming.app.servicer.calls >= 15
    finally:
        for s in servers:
            s.stop()
            s.app.engine.drain(0)


def test_failover_a_killed_replica_loses_no_request(replicas) -> None:
    fleet = replicas(3)
    victim, survivors = fleet[0], fleet[1:]
    done, failures, started = [], [], {}
    killed_at = []

    def one(i: int) -> None:
        rid = f"fo-{i}"
        started[rid] = time.time()
        try:
            client.chat("tell me", max_new_tokens=96, ignore_eos=True, request_id=rid)
            done.append(rid)
        except EagleError as err:
            failures.append((rid, err.code.name, err.details))
        if len(done) == 40 and not killed_at:
            killed_at.append(time.time())
            victim.proc.send_signal(signal.SIGKILL)

    with EagleClient(ipv4(r.port for r in fleet), timeout=60) as client:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(200)))
    assert failures == [] and len(done) == 200
    assert killed_at and victim.proc.wait(10) == -signal.SIGKILL
    # every request started a moment after the kill was served by a survivor, and only one
    late = [rid for rid, t in started.items() if t > killed_at[0] + 0.5]
    assert len(late) > 20, (len(late), max(started.values()) - killed_at[0])
    served = [r.served_ok() for r in survivors]
    assert all(sum(rid in s for s in served) == 1 for rid in late)
    assert not set(late) & set(victim.accepted())


def test_rolling_restart_loses_no_unary_call_and_cuts_no_stream(replicas) -> None:
    fleet = replicas(2)
    stop = threading.Event()
    unary_failures, stream_outcomes = [], []

    def unary_load(client) -> None:
        while not stop.is_set():
            try:
                client.chat("hi", max_new_tokens=8, ignore_eos=True)
            except EagleError as err:
                unary_failures.append((err.code.name, err.details))

    def stream_load(client) -> None:
        while not stop.is_set():
            chunks = 0
            stream = client.stream_chat("hi", max_new_tokens=32, ignore_eos=True)
            try:
                for _ in stream:
                    chunks += 1
                stream_outcomes.append(("completed", chunks, stream.result.finish_reason))
            except EagleError as err:
                stream_outcomes.append((err.code.name, chunks, err.details))

    with EagleClient(ipv4(r.port for r in fleet), timeout=60) as client:
        workers = [threading.Thread(target=unary_load, args=(client,)) for _ in range(3)]
        workers += [threading.Thread(target=stream_load, args=(client,)) for _ in range(2)]
        for w in workers:
            w.start()
        try:
            time.sleep(1.0)
            for replica in fleet:  # one at a time: SIGTERM, drain, exit 0, start, SERVING
                replica.proc.send_signal(signal.SIGTERM)
                assert replica.proc.wait(60) == 0, replica.proc.stderr.read()[-2000:]
                replica.start().wait()
                time.sleep(1.0)
        finally:
            stop.set()
            for w in workers:
                w.join(60)
    assert unary_failures == []
    assert len(stream_outcomes) > 20
    for outcome in stream_outcomes:  # completed, or refused before any text was sent
        assert outcome[0] == "completed" and outcome[2] == "length" or \
            (outcome[0] == "UNAVAILABLE" and outcome[1] == 0), outcome


def test_connections_are_replaced_after_max_connection_age_and_streams_finish(tiny) -> None:
    """With a 1 s connection age, a 2-3 s stream finishes on its old connection (the grace),
    and the next call arrives on a new one (another client port)."""
    seen: list[dict] = []

    class Peers(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage() == "rpc done":
                seen.append({"id": logs.request_id.get(),
                             "peer": record.peer, "code": record.code})

    handler, logger = Peers(), logging.getLogger("service.servicer")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    engine = make_engine(tiny)
    try:
        with RunningServer(engine, max_connection_age_s=1.0,
                           max_connection_age_grace_s=30.0) as srv, \
                EagleClient(srv.target, timeout=60) as client:
            client.chat("first", max_new_tokens=1, request_id="age-1")
            stream = client.stream_chat("long", max_new_tokens=3000, ignore_eos=True,
                                        request_id="age-2")
            start = time.monotonic()
            text = "".join(stream)
            assert time.monotonic() - start > 1.5  # it outlived the connection's age
            assert stream.result.finish_reason == "length" and text
            assert stream.result.usage.completion_tokens == 3000
            client.chat("after", max_new_tokens=1, request_id="age-3")
        peers = {s["id"]: s["peer"] for s in seen}
        assert peers["age-1"] == peers["age-2"]  # the stream began on the first connection
        assert peers["age-3"] != peers["age-2"]  # ... and a new one carried the next call
        assert {s["code"] for s in seen} == {"OK"}
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        engine.drain(0)


def test_the_library_keeps_one_connection_with_pick_first(tiny) -> None:
    servers = [RunningServer(make_engine(tiny)) for _ in range(2)]
    try:
        with EagleClient(ipv4(s.port for s in servers), load_balancing="pick_first") as client:
            for _ in range(20):
                client.chat("hi", max_new_tokens=1)
        assert sorted(s.app.servicer.calls for s in servers) == [0, 20]
        with pytest.raises(ValueError, match="load_balancing must be one of round_robin, "
                                             "pick_first, ring_hash, not 'random'"):
            EagleClient(servers[0].target, load_balancing="random")
    finally:
        for s in servers:
            s.stop()
            s.app.engine.drain(0)


def test_the_service_config_retries_unavailable_and_pushed_back_refusals() -> None:
    from client._common import service_config

    config = json.loads(service_config())
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": "eagle.v1.ChatService"}
    [method] = config["methodConfig"]
    # RESOURCE_EXHAUSTED is retried after the server's grpc-retry-pushback-ms (never when
    # it says -1): tests/test_tenants.py shows both
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]
    assert "hedgingPolicy" not in method
    ring = json.loads(service_config("ring_hash"))  # what other languages' clients can read
    assert ring["loadBalancingConfig"] == [
        {"ring_hash_experimental": {"requestHashHeader": "x-eagle-affinity"}}]
    assert ring["healthCheckConfig"] == config["healthCheckConfig"]


def test_a_restarted_replica_takes_calls_within_seconds_of_serving(replicas) -> None:
    """After a replica has been down a while, gRPC's default reconnect backoff (up to 120 s)
    would leave it idle long after it is back; the library caps it at 2 s."""
    fleet = replicas(2)
    down, up = fleet
    stop = threading.Event()
    failures: list[str] = []

    def load(client) -> None:
        while not stop.is_set():
            try:
                client.chat("hi", max_new_tokens=1)
            except EagleError as err:
                failures.append(err.code.name)
            time.sleep(0.02)

    with EagleClient(ipv4(r.port for r in fleet), timeout=60) as client:
        worker = threading.Thread(target=load, args=(client,))
        worker.start()
        try:
            time.sleep(1.0)
            down.proc.send_signal(signal.SIGKILL)
            down.proc.wait(10)
            time.sleep(12.0)  # long enough for the default backoff to reach ~10 s
            before = set(down.accepted())
            down.start().wait()
            serving_at = time.time()
            end = time.monotonic() + 10
            while time.monotonic() < end and not set(down.accepted()) - before:
                time.sleep(0.05)
        finally:
            stop.set()
            worker.join(30)
    fresh = [t for rid, t in down.accepted().items() if rid not in before]
    assert fresh, "the restarted replica took no call within 10 s of SERVING"
    assert min(fresh) - serving_at < 5.0, min(fresh) - serving_at
    assert failures == []


def test_an_affinity_key_keeps_a_conversation_on_one_replica_and_fails_over(tiny) -> None:
    """Calls with the same affinity key meet the same replica (its vision cache answers the
    image from turn 2 on); keyless calls stay round_robin; a replica that stops serving hands
    its keys to another, and only those move."""
    import factory

    servers = [RunningServer(make_engine(tiny)) for _ in range(3)]
    image = factory.encode(factory.photo(900, 500, seed=4), "PNG")

    def served_by(call) -> tuple[int, object]:
        before = [s.app.servicer.calls for s in servers]
        result = call()
        moved = [i for i, s in enumerate(servers) if s.app.servicer.calls != before[i]]
        assert len(moved) == 1
        return moved[0], result

    try:
        with EagleClient(ipv4(s.port for s in servers), timeout=60) as client:
            homes: dict[str, int] = {}
            for k in range(10):
                key = f"conversation-{k}"
                turns = [served_by(lambda k=key: client.chat("What is this?", images=[image],
                                                              max_new_tokens=1,
                                                              affinity_key=k))
                         for _ in range(4)]
                assert len({home for home, _ in turns}) == 1, turns
                homes[key] = turns[0][0]
                assert [r.usage.cached_tiles for _, r in turns[1:]] == \
                    [turns[0][1].usage.image_tiles] * 3  # the same replica's vision cache
            assert len(set(homes.values())) >= 2  # the keys spread over the replicas
            keyless = [served_by(lambda: client.chat("hi", max_new_tokens=1))[0]
                       for _ in range(30)]
            assert all(8 <= keyless.count(i) <= 12 for i in range(3)), keyless  # round_robin
            # the home of conversation-0 stops serving: its keys move, the others stay
            gone = homes["conversation-0"]
            servers[gone].call(servers[gone].app._set_health(
                health_pb2.HealthCheckResponse.NOT_SERVING))
            time.sleep(0.5)
            for key, home in homes.items():
                now = {served_by(lambda k=key: client.chat("again", max_new_tokens=1,
                                                           affinity_key=k))[0]
                       for _ in range(2)}
                assert len(now) == 1 and gone not in now
                if home != gone:
                    assert now == {home}
    finally:
        for s in servers:
            s.stop()
            s.app.engine.drain(0)
