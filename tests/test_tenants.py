"""One replica shared by tenants: named tokens, caches kept apart, a fair share of the queue
and the running batch by weight, per-tenant queues, quotas with a retry hint that gRPC's own
retry policy honours, priority within a tenant, and what GetModelInfo tells a tenant."""
from __future__ import annotations

import logging
import threading
import time

import factory
import grpc
import pytest
from conftest import make_engine
from eagle.v1 import chat_pb2, chat_pb2_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from harness import RunningServer

from client import EagleClient, EagleError
from service import tenants
from service.engine.fair import FairQueue
from service.engine.job import (
    BATCH,
    INTERACTIVE,
    ChatJob,
    ChatMessage,
    Delta,
    Finished,
    Overloaded,
    Role,
    SamplingParams,
    TextPart,
)
from service.engine.runs import Queued

TOKENS = "alpha:tok-alpha weight=1\nbeta:tok-beta max_in_flight=1\ngamma:tok-gamma " \
         "tokens_per_minute=50\nbare-token-xyz"


def _job(rid: str, tenant: str, tokens: int, priority: str = INTERACTIVE,
         text: str = "Tell me a story.") -> ChatJob:
    return ChatJob(rid, (ChatMessage(Role.USER, (TextPart(text),)),),
                   SamplingParams(max_new_tokens=tokens, ignore_eos=True), tenant=tenant,
                   priority=priority, cache_namespace=f"tenant:{tenant}")


def _first_token(stream) -> None:
    for event in stream:
        if isinstance(event, Delta | Finished):
            return
    raise AssertionError("the stream ended without a token")


def _wait(condition, seconds: float = 20.0) -> None:
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "timed out waiting for the engine"
        time.sleep(0.01)


# -- the token file ---------------------------------------------------------------------------

def test_the_token_file_names_tenants_with_their_policies() -> None:
    t = tenants.parse("# a comment\nsearch:tokA weight=2 max_queue=16  # trailing comment\n"
                      "search:tokA2\nbatch:tokB max_in_flight=4 tokens_per_minute=200000\n"
                      "partner-x: weight=0.5\nbare1,bare2\n")
    assert t.auth
    assert [name for _, name in t.tokens] == ["search", "search", "batch", tenants.bare_name(
        "bare1"), tenants.bare_name("bare2")]
    assert t.policy("search") == tenants.TenantPolicy("search", weight=2.0, max_queue=16)
    assert t.policy("batch").max_in_flight == 4 and t.policy("batch").tokens_per_minute == 200000
    assert t.policy("partner-x").weight == 0.5  # named by a client certificate
    assert tenants.bare_name("bare1").startswith("t-") and "bare1" not in tenants.bare_name("bare1")
    # identity by token (a rotated second token is the same tenant), else by certificate
    assert t.identify("Bearer tokA2").name == "search"
    assert t.identify("bearer bare2").name == tenants.bare_name("bare2")
    assert t.identify("", common_name="partner-x").weight == 0.5
    unknown = t.identify("", common_name="someone")
    assert (unknown.name, unknown.known, unknown.label, unknown.weight) == \
        ("someone", False, "other", 1.0)
    assert tenants.from_settings("", client_ca=False).identify("").name == "default"


@pytest.mark.parametrize("text,error", [
    ("a:SECRET1 speed=3", "the auth token, line 1: unknown tenant option 'speed=3'; use "
                          "weight=, max_queue=, max_in_flight=, tokens_per_minute="),
    ("a:SECRET1 weight=0", "the auth token, line 1: weight must be above 0"),
    ("a:SECRET1 max_queue=-1", "the auth token, line 1: max_queue must be 0 or more"),
    ("a:SECRET1 weight=lots", "the auth token, line 1: weight='lots' is not a number"),
    ("a:SECRET1\nb:SECRET1", "the auth token, line 2: a token appears twice"),
    ("a:SECRET1 weight=2\na:SECRET2 weight=3", "the auth token, line 2: tenant 'a' is given two "
                                              "different policies"),
    ("bad name!:SECRET1", "the auth token, line 1: options need a tenant name"),
    ("b@d:SECRET1", "the auth token, line 1: tenant name 'b@d' must be 1-64 letters, digits, "
                    "'.', '_' or '-', starting with a letter or digit"),
    ("SECRET1 weight=2", "the auth token, line 1: options need a tenant name: write name:token "
                         "key=value ..."),
])
def test_a_malformed_token_file_is_refused_naming_the_line(text: str, error: str) -> None:
    with pytest.raises(ValueError) as info:
        tenants.parse(text)
    assert str(info.value).startswith(error)
    assert "SECRET" not in str(info.value)  # the message never repeats a token


def test_policies_without_tokens_need_mutual_tls() -> None:
    with pytest.raises(ValueError, match="names tenants' policies but no token"):
        tenants.from_settings("partner: weight=2", client_ca=False)
    assert tenants.from_settings("partner: weight=2", client_ca=True).policy("partner").weight == 2


# -- fair order -------------------------------------------------------------------------------

class _Stream:
    def __init__(self, job: ChatJob) -> None:
        self.job = job


def _q(rid: str, tenant: str, priority: str = INTERACTIVE) -> Queued:
    return Queued(_Stream(_job(rid, tenant, 1, priority)), None, 0.0)


def test_the_fair_queue_serves_tenants_by_weight_whatever_the_arrival_order() -> None:
    """Tenant a (weight 3) and b (weight 1) both keep 40 jobs waiting, a's all first; each
    job computes 10 tokens. Over the first 40 admissions a gets 3 of every 4."""
    fair = FairQueue({"a": 3.0, "b": 1.0})
    for i in range(40):
        fair.push(_q(f"a{i}", "a"))
    for i in range(40):
        fair.push(_q(f"b{i}", "b"))
    order = []
    for _ in range(40):
        q = fair.peek()
        fair.remove(q)
        order.append(q.stream.job.tenant)
        fair.charge(q.stream.job.tenant, 10)
    assert order.count("a") == 30 and order.count("b") == 10
    # b is never more than one admission behind its share at any point
    for n in range(4, 41, 4):
        assert order[:n].count("b") >= n // 4 - 1


def test_a_returning_tenant_starts_level_with_the_active_ones() -> None:
    """b was served long ago (its counter is far below a's): on its return it is lifted to
    the least active counter, so it shares from then on instead of taking every slot."""
    fair = FairQueue()
    fair.push(_q("b0", "b"))
    fair.remove(fair.peek())
    fair.charge("b", 5)
    for i in range(20):
        fair.push(_q(f"a{i}", "a"))
    fair.started("a")
    fair.charge("a", 10_000)
    for i in range(10):
        fair.push(_q(f"b{i + 1}", "b"))
    assert fair.counters["b"] == fair.counters["a"] == 10_000
    picks = []
    for _ in range(6):
        q = fair.peek()
        fair.remove(q)
        picks.append(q.stream.job.tenant)
        fair.charge(q.stream.job.tenant, 100)
    assert sorted(picks) == ["a", "a", "a", "b", "b", "b"]


def test_within_a_tenant_interactive_jobs_go_first_and_preempted_ones_come_back_first() -> None:
    fair = FairQueue()
    fair.push(_q("b1", "a", BATCH))
    fair.push(_q("i1", "a"))
    fair.push(_q("b2", "a", BATCH))
    fair.push(_q("i2", "a"))
    fair.push(_q("back", "a", BATCH), front=True)  # a preempted batch job
    order = []
    while fair:
        q = fair.peek()
        fair.remove(q)
        order.append(q.stream.job.request_id)
    assert order == ["i1", "i2", "back", "b1", "b2"]


# -- the engine -------------------------------------------------------------------------------

def test_a_tenant_below_its_share_takes_a_slot_from_one_flooding_the_batch(tiny) -> None:
    """a fills every running slot and the queue with long generations first; b's short jobs
    arrive later and are admitted at once, each taking a slot from a (preempted, to come
    back), and finish while every one of a's is still running."""
    engine = make_engine(tiny, max_running=4, max_queue=8,
                         tenants=(("a", 1.0, 0), ("b", 1.0, 0)))
    try:
        flood = [engine.submit(_job(f"a{i}", "a", 3000)) for i in range(8)]
        _wait(lambda: engine.stats()["running"] == 4)
        done_order: list[str] = []

        def follow(stream, name: str) -> None:
            for event in stream:
                if isinstance(event, Finished):
                    done_order.append(name)

        shorts = [engine.submit(_job(f"b{i}", "b", 4)) for i in range(2)]
        threads = [threading.Thread(target=follow, args=(s, f"b{i}"))
                   for i, s in enumerate(shorts)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(done_order) == ["b0", "b1"]  # both done, none of a's yet
        assert not any(s.done.is_set() for s in flood)
        assert engine.preemptions == 2
        assert engine._waiting.running("a") == 4  # a got its slots back
    finally:
        for s in flood:
            s.cancel()
        engine.drain(0)


def test_a_tenant_that_fills_its_queue_is_refused_while_others_are_admitted(tiny) -> None:
    engine = make_engine(tiny, max_running=1, max_queue=3, tenants=(("a", 1.0, 1),))
    try:
        held = [engine.submit(_job(f"a{i}", "a", 2000)) for i in range(2)]  # 1 running + 1
        with pytest.raises(Overloaded) as info:
            engine.submit(_job("a-extra", "a", 2))
        assert str(info.value) == ("tenant 'a' is at its limit of 2 requests in flight "
                                   "(1 running + 1 queued); retry later")
        others = [engine.submit(_job(f"b{i}", "b", 2)) for i in range(4)]  # b: 1 + 3
        with pytest.raises(Overloaded, match=r"^tenant 'b' is at its limit of 4 requests"):
            engine.submit(_job("b-extra", "b", 2))
        assert engine.capacity.by_tenant == {"a": 2, "b": 4}
    finally:
        for s in held + others:
            s.cancel()
        engine.drain(0)


def test_one_tenant_alone_keeps_the_servers_capacity_message(tiny) -> None:
    engine = make_engine(tiny, max_running=1, max_queue=0)
    try:
        held = engine.submit(_job("x", "default", 2000))
        with pytest.raises(Overloaded) as info:
            engine.submit(_job("y", "default", 2))
        assert str(info.value) == "the server is at capacity (1 running, 0 queued); retry later"
        held.cancel()
    finally:
        engine.drain(0)


def _finish_order(streams: dict[str, object]) -> list[str]:
    """The names of `streams` in the order their jobs finished."""
    order: list[str] = []
    lock = threading.Lock()

    def follow(name: str, stream) -> None:
        for event in stream:
            if isinstance(event, Finished):
                with lock:
                    order.append(name)

    threads = [threading.Thread(target=follow, args=item) for item in streams.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return order


def test_an_interactive_job_takes_the_slot_of_its_tenants_batch_job(tiny) -> None:
    engine = make_engine(tiny, max_running=1, max_queue=4)
    try:
        batch = engine.submit(_job("batch", "default", 3000, BATCH))
        _first_token(batch)
        events = list(engine.submit(_job("quick", "default", 3)))
        assert isinstance(events[-1], Finished) and events[-1].usage.completion_tokens == 3
        assert not batch.done.is_set() and engine.preemptions == 1
        batch.cancel()
    finally:
        engine.drain(0)


def test_within_a_tenant_queued_interactive_jobs_are_admitted_before_batch_ones(tiny) -> None:
    engine = make_engine(tiny, max_running=1, max_queue=4)
    try:
        running = engine.submit(_job("running", "default", 3000))  # interactive: kept
        _first_token(running)
        waiting = {"batch": engine.submit(_job("batch", "default", 2, BATCH))}
        _wait(lambda: engine.stats()["waiting"] == 1)
        waiting["interactive"] = engine.submit(_job("interactive", "default", 2))
        _wait(lambda: engine.stats()["waiting"] == 2)
        assert engine.preemptions == 0
        running.cancel()
        assert _finish_order(waiting) == ["interactive", "batch"]
    finally:
        engine.drain(0)


# -- over gRPC ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared(tiny):
    engine = make_engine(tiny, max_running=4, max_queue=8,
                         tenants=(("alpha", 1.0, 0), ("beta", 1.0, 0), ("gamma", 1.0, 0)))
    srv = RunningServer(engine, auth_token=TOKENS, max_running=4, max_queue=8)
    yield srv
    srv.stop()
    engine.drain(0)


def _client(srv, token: str, **kw) -> EagleClient:
    return EagleClient(srv.target, token=token, timeout=30, **kw)


def test_no_cache_crosses_tenants_by_usage(shared) -> None:
    image = factory.encode(factory.photo(1600, 1200, seed=11), "JPEG")
    system = "You are a careful assistant. " * 40  # a prefix worth caching
    with _client(shared, "tok-alpha") as a, _client(shared, "tok-beta") as b:
        first = a.chat("What is here?", images=[image], system=system, max_new_tokens=1)
        assert first.usage.cached_tiles == 0
        other = b.chat("What is here?", images=[image], system=system, max_new_tokens=1)
        assert (other.usage.cached_tiles, other.usage.cached_prompt_tokens) == (0, 0)
        again = a.chat("What is here?", images=[image], system=system, max_new_tokens=1)
        assert again.usage.cached_tiles == first.usage.image_tiles > 0
        assert again.usage.cached_prompt_tokens > 0
        salted = a.chat("What is here?", images=[image], system=system, max_new_tokens=1,
                        cache_salt="end-user-7")
        assert (salted.usage.cached_tiles, salted.usage.cached_prompt_tokens) == (0, 0)


def test_tokenizer_and_grammar_caches_are_per_namespace(shared) -> None:
    from service.engine import prompt
    from service.engine.job import ResponseFormat

    engine = shared.app.engine
    fmt = ResponseFormat("regex", "[a-f]{3}[0-9]")
    engine.grammars.constraint(fmt, "tenant:alpha")
    assert engine.grammars.cached(fmt, "tenant:alpha")
    assert not engine.grammars.cached(fmt, "tenant:beta")
    prompt._encoded.cache_clear()
    long = "a long shared system prompt " * 20
    tokens = engine.prepare.tokens
    tokens.encode([prompt.Content(long)], [], 256, "tenant:alpha")
    hits = prompt._encoded.cache_info().hits
    tokens.encode([prompt.Content(long)], [], 256, "tenant:beta")
    assert prompt._encoded.cache_info().hits == hits  # not served from alpha's entry
    tokens.encode([prompt.Content(long)], [], 256, "tenant:alpha")
    assert prompt._encoded.cache_info().hits == hits + 1


def _pushback(err: grpc.RpcError) -> tuple[str, int]:
    trailers = dict(err.trailing_metadata() or ())
    status = rpc_status.from_call(err)
    delay = 0
    for detail in status.details if status else ():
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            delay = info.retry_delay.ToMilliseconds()
    return trailers.get("grpc-retry-pushback-ms", ""), delay


def _request(text: str = "hi", tokens: int = 2) -> chat_pb2.ChatRequest:
    req = chat_pb2.ChatRequest(generation=chat_pb2.GenerationConfig(max_new_tokens=tokens,
                                                                   ignore_eos=True))
    req.messages.add(role=chat_pb2.ROLE_USER).parts.add(text=text)
    return req


def test_quotas_refuse_naming_the_limit_with_a_retry_hint(shared) -> None:
    channel = grpc.insecure_channel(shared.target)
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    beta = (("authorization", "Bearer tok-beta"),)
    held = stub.StreamChat(chat_pb2.StreamChatRequest(
        messages=_request().messages, generation=chat_pb2.GenerationConfig(
            max_new_tokens=3000, ignore_eos=True)), metadata=beta, timeout=60)
    next(held)
    with pytest.raises(grpc.RpcError) as info:
        stub.Chat(_request(), metadata=beta, timeout=10)
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details() == ("tenant 'beta' has 1 requests in flight, its quota of 1 "
                                    "(max_in_flight); retry when one has finished")
    assert _pushback(info.value) == ("1000", 1000)
    held.cancel()
    gamma = (("authorization", "Bearer tok-gamma"),)
    used = stub.Chat(_request(tokens=40), metadata=gamma, timeout=30).usage
    assert used.prompt_tokens + used.completion_tokens >= 50
    with pytest.raises(grpc.RpcError) as info:
        stub.Chat(_request(), metadata=gamma, timeout=10)
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details().startswith(
        f"tenant 'gamma' used {used.prompt_tokens + used.completion_tokens} tokens in the last "
        f"minute, its quota of 50 (tokens_per_minute); retry in ")
    hint, delay = _pushback(info.value)
    assert 50_000 < int(hint) <= 60_001 and delay == int(hint)
    refused = {s.labels["limit"]: s.value for m in shared.app.metrics.refusals.collect()
               for s in m.samples if s.name == "eagle_refusals_total"}
    assert refused["max_in_flight"] >= 1 and refused["tokens_per_minute"] >= 1
    channel.close()


def test_the_python_client_waits_out_the_pushback_and_then_succeeds(shared) -> None:
    """beta's quota is one call in flight: its second call is refused with a 1 s pushback;
    gRPC's retry policy waits that long, the first call has ended by then, and the retry
    passes. Without the pushback the policy's backoff (0.2 s first) would have retried sooner."""
    servicer = shared.app.servicer
    with _client(shared, "tok-beta") as client:
        held = client.stream_chat("count", max_new_tokens=3000, ignore_eos=True)
        next(iter(held))
        calls = servicer.calls
        result: dict[str, object] = {}

        def second() -> None:
            start = time.monotonic()
            result["reply"] = client.chat("hi", max_new_tokens=2)
            result["s"] = time.monotonic() - start

        thread = threading.Thread(target=second)
        thread.start()
        _wait(lambda: servicer.calls >= calls + 1)  # the refused first attempt
        time.sleep(0.3)
        held.cancel()
        thread.join(30)
    assert result["reply"].usage.completion_tokens == 2
    assert result["s"] >= 0.95  # the pushback, not the policy's 0.2 s backoff
    assert servicer.calls == calls + 2  # one refusal, one retry that passed


def test_a_refusal_that_cannot_pass_is_not_retried(tiny) -> None:
    engine = make_engine(tiny, kv_cache_mb=1)
    pool_tokens = engine.pool.blocks * engine.pool.block_size
    try:
        with RunningServer(engine) as srv, EagleClient(srv.target, timeout=30) as client:
            with pytest.raises(EagleError) as info:
                client.chat("hi", max_new_tokens=pool_tokens + 64)
            assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "tokens of KV cache; this server's pool holds 2,048" in info.value.details
            assert info.value.retry_after_ms == -1
            assert srv.app.servicer.calls == 1  # gRPC did not try again
    finally:
        engine.drain(0)


def test_get_model_info_tells_a_tenant_its_share_limits_and_use(shared) -> None:
    with _client(shared, "tok-gamma") as gamma, _client(shared, "bare-token-xyz") as bare:
        info = gamma.model_info().tenant
        assert (info.name, info.weight, info.max_queue, info.max_in_flight,
                info.tokens_per_minute, info.in_flight) == ("gamma", 1.0, 8, 0, 50, 0)
        assert info.tokens_last_minute >= 50  # the call of the quota test
        anonymous = bare.model_info().tenant
        assert anonymous.name == tenants.bare_name("bare-token-xyz")
        assert anonymous.tokens_per_minute == 0 and anonymous.max_in_flight == 0


def test_logs_and_metrics_name_the_tenant_never_the_token(shared, caplog) -> None:
    caplog.set_level(logging.INFO, logger="service.servicer")
    with _client(shared, "tok-alpha") as a:
        a.chat("hello", max_new_tokens=1, priority="batch")
    [record] = [r for r in caplog.records if r.getMessage() == "rpc done"
                and getattr(r, "tenant", "") == "alpha"]
    assert record.code == "OK"
    assert all("tok-alpha" not in str(r.__dict__) for r in caplog.records)
    labels = {s.labels["tenant"] for m in shared.app.metrics.requests.collect()
              for s in m.samples if s.name == "eagle_requests_total"}
    assert "alpha" in labels and "tok-alpha" not in labels
    assert labels <= {"alpha", "beta", "gamma", tenants.bare_name("bare-token-xyz"), "other"}


def test_priority_from_the_metadata_and_a_bad_one_refused(shared) -> None:
    channel = grpc.insecure_channel(shared.target)
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    alpha = ("authorization", "Bearer tok-alpha")
    reply = stub.Chat(_request(), metadata=(alpha, ("x-eagle-priority", "batch")), timeout=30)
    assert reply.usage.completion_tokens == 2
    with pytest.raises(grpc.RpcError) as info:
        stub.Chat(_request(), metadata=(alpha, ("x-eagle-priority", "urgent")), timeout=30)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == ("x-eagle-priority: 'urgent' is not a priority: use "
                                    "interactive or batch")
    req = _request()
    req.priority = 7
    with pytest.raises(grpc.RpcError) as info:
        stub.Chat(req, metadata=(alpha,), timeout=30)
    assert info.value.details() == ("priority: unknown value 7: use PRIORITY_INTERACTIVE or "
                                    "PRIORITY_BATCH")
    channel.close()
