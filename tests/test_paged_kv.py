"""The paged KV cache: the block pool and its accounting, the prefix index (hash chains over
tokens and media, namespaces, eviction), preemption by recompute, and the same greedy tokens
with and without cache hits."""
from __future__ import annotations

import threading
import time

import factory
import pytest
import torch
from conftest import make_engine

from service.engine.job import (
    ChatJob,
    ChatMessage,
    EngineError,
    Finished,
    ImagePart,
    OutOfMemory,
    Role,
    SamplingParams,
    TextPart,
    VisionParams,
)
from service.engine.kv import BlockPool, blocks_for, namespace_root, prompt_hashes

SYSTEM = " ".join(f"rule{i} applies." for i in range(120))  # ~600 tokens


def _final(stream) -> Finished:
    events = list(stream)
    assert isinstance(events[-1], Finished)
    return events[-1]


def _chat(rid: str, text: str, tokens: int = 8, system: str = "", image: bytes | None = None,
          namespace: str = "", ignore_eos: bool = False) -> ChatJob:
    messages = ((ChatMessage(Role.SYSTEM, (TextPart(system),)),) if system else ())
    parts = ((ImagePart(data=image),) if image else ()) + (TextPart(text),)
    return ChatJob(rid, messages + (ChatMessage(Role.USER, parts),),
                   SamplingParams(max_new_tokens=tokens, ignore_eos=ignore_eos),
                   VisionParams(max_tiles_per_image=2), cache_namespace=namespace)


def _pool(blocks: int = 8, size: int = 4) -> BlockPool:
    return BlockPool(1, blocks, size, 1, 2, torch.float32, torch.device("cpu"))


def _expected_hit(engine, before: ChatJob, after: ChatJob) -> int:
    """Cached tokens `after` should get once `before` ran: the full blocks of their common
    prefix, leaving at least one position to compute."""
    a, b = engine.prepare(before).ids, engine.prepare(after).ids
    common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    size = engine.pool.block_size
    return min(common, len(b) - 1) // size * size


def _settle(engine, key: str = "kv_blocks_used", want: int = 0) -> int:
    deadline = time.monotonic() + 10
    while engine.stats()[key] != want and time.monotonic() < deadline:
        time.sleep(0.01)
    return engine.stats()[key]


# the pool and the index, alone ------------------------------------------------------------
def test_blocks_are_handed_out_low_first_and_a_full_pool_gives_none() -> None:
    pool = _pool(blocks=4)
    a = pool.allocate(3)
    assert a == [1, 2, 3]  # block 0 is the null block, never handed out
    assert pool.allocate(2) is None and pool.available() == 1  # nothing taken on a refusal
    pool.release(a)
    assert pool.counts().free == 4 and pool.counts().used == 0


def test_released_hashed_blocks_stay_cached_and_are_evicted_oldest_first() -> None:
    pool = _pool(blocks=4)
    first, second = pool.allocate(2), pool.allocate(2)
    for block, h in zip(first + second, (b"a", b"b", b"c", b"d")):
        pool.register(block, h)
    pool.release(first)  # released tail first: b then a
    pool.release(second)
    assert pool.counts().cached == 4 and pool.cached([b"a", b"b"]) == 2
    took = pool.allocate(1)  # evicts the least recently released: "b" (first's tail)
    assert took == [first[1]] and pool.counts().evicted == 1
    assert pool.cached([b"a", b"b"]) == 1  # the chain stops at the first miss
    assert pool.acquire([b"a", b"b"]) == [first[0]] and pool.counts().used == 2


def test_a_second_block_with_the_same_content_stays_private() -> None:
    pool = _pool(blocks=4)
    a, b = pool.allocate(1), pool.allocate(1)
    pool.register(a[0], b"same")
    pool.register(b[0], b"same")
    pool.release(b)
    assert pool.counts().free == 3  # not cached: the index keeps one block per content


def test_hash_chains_name_the_media_inside_each_block() -> None:
    root, m = namespace_root(""), 9
    ids = [1, 2, 3, 4] + [m] * 8 + [5, 6, 7, 8, 1]  # 17 tokens, the image in blocks 1 and 2
    one, tail_one = prompt_hashes(root, ids, 4, m, [("image-A", 8)])
    two, tail_two = prompt_hashes(root, ids, 4, m, [("image-B", 8)])
    assert len(one) == 4 and tail_one == tail_two == []
    assert one[0] == two[0]  # text before the image: shared
    assert one[1] != two[1] and one[3] != two[3]  # the image and everything after: not
    other_ns, _ = prompt_hashes(namespace_root("tenant-2"), ids, 4, m, [("image-A", 8)])
    assert not set(other_ns) & set(one)
    _, tail = prompt_hashes(root, [1, 2, 3, 4, m, m], 4, m, [("image-A", 2)])
    assert tail == ["image-A"]  # a partial last block remembers its media for later


# the engine -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cached(tiny):
    eng = make_engine(tiny)
    yield eng
    eng.drain(0)


@pytest.fixture(scope="module")
def uncached(tiny):
    eng = make_engine(tiny, prefix_cache=False)
    yield eng
    eng.drain(0)


def test_a_shared_system_prompt_is_computed_once_and_changes_no_token(cached, uncached):
    one, two = _chat("s1", "What is rule 3?", system=SYSTEM), _chat("s2", "And rule 7?",
                                                                     system=SYSTEM)
    first, second = _final(cached.submit(one)), _final(cached.submit(two))
    assert first.usage.cached_prompt_tokens == 0
    # the full blocks before the question: the system prompt's ~600 tokens and more
    assert second.usage.cached_prompt_tokens == _expected_hit(cached, one, two) > 560
    assert cached.stats()["prefix_hit_tokens"] >= second.usage.cached_prompt_tokens
    plain = _final(uncached.submit(_chat("s3", "And rule 7?", system=SYSTEM)))
    assert plain.usage.cached_prompt_tokens == 0
    assert second.text == plain.text  # greedy tokens identical with and without the hit


def test_a_multi_turn_history_reuses_the_first_turns_reply(cached, uncached):
    turn1 = _final(cached.submit(_chat("t1", "Say something long about rules.", 40,
                                       system=SYSTEM, ignore_eos=True)))
    history = (ChatMessage(Role.SYSTEM, (TextPart(SYSTEM),)),
               ChatMessage(Role.USER, (TextPart("Say something long about rules."),)),
               ChatMessage(Role.ASSISTANT, (TextPart(turn1.text),)),
               ChatMessage(Role.USER, (TextPart("Shorter, please."),)))
    turn2 = _final(cached.submit(ChatJob("t2", history, SamplingParams(max_new_tokens=8))))
    again = _final(uncached.submit(ChatJob("t2u", history, SamplingParams(max_new_tokens=8))))
    # the first turn's prompt at least (its reply too, where it tokenises the same)
    assert turn2.usage.cached_prompt_tokens >= turn1.usage.prompt_tokens - 16
    assert turn2.text == again.text


def test_a_long_prompt_after_a_hit_needs_no_quadratic_mask_and_changes_no_token(tiny,
                                                                               monkeypatch):
    """Past _MASK_LIMIT a part prefilled after cached positions is attended in two pieces
    (the cached keys, then causally its own) merged by log-sum-exp, instead of under an
    (n, offset + n) mask: 4,700 new tokens after the system prompt's blocks here, in one
    pass; and every chunk so, the limit at zero. Same greedy tokens as without the cache."""
    from service.engine import llm

    question = " ".join(f"clause{i} holds." for i in range(1000))  # ~4,700 tokens
    plain = make_engine(tiny, prefix_cache=False, chunk_above=0)
    hit = make_engine(tiny, chunk_above=0)
    try:
        want = _final(plain.submit(_chat("p", question, 12, system=SYSTEM)))
        _final(hit.submit(_chat("warm", "What is rule 3?", system=SYSTEM)))
        built = []
        real = llm.Decoder._attend_after
        monkeypatch.setattr(llm.Decoder, "_attend_after",
                            lambda self, *a: built.append(a[3].n) or real(self, *a))
        got = _final(hit.submit(_chat("h", question, 12, system=SYSTEM)))
        assert got.usage.cached_prompt_tokens > 560
        assert built and built[0] == got.usage.prompt_tokens - got.usage.cached_prompt_tokens
        assert got.text == want.text
        monkeypatch.setattr(llm, "_MASK_LIMIT", 0)  # the short parts too
        built.clear()
        short = _final(hit.submit(_chat("s", "And rule 7?", system=SYSTEM)))
        assert built and short.usage.cached_prompt_tokens > 560
        assert short.text == _final(plain.submit(_chat("ps", "And rule 7?", system=SYSTEM))).text
    finally:
        plain.drain(0)
        hit.drain(0)


def test_the_same_placeholders_with_another_image_do_not_hit(cached):
    a = factory.encode(factory.photo(640, 480, seed=31), "PNG")
    b = factory.encode(factory.photo(640, 480, seed=32), "PNG")  # same size: same tokens
    first = _final(cached.submit(_chat("i1", "Describe.", image=a)))
    other = _final(cached.submit(_chat("i2", "Describe.", image=b)))
    same = _final(cached.submit(_chat("i3", "Describe.", image=a)))
    assert first.usage.prompt_tokens == other.usage.prompt_tokens == same.usage.prompt_tokens
    image_tokens = first.usage.vision_tokens
    # before the image only (the system prompt and the turn's opening), never into it
    assert other.usage.cached_prompt_tokens < first.usage.prompt_tokens - image_tokens
    assert same.usage.cached_prompt_tokens > image_tokens
    assert same.text == first.text


def test_namespaces_share_nothing(cached):
    prompt = " ".join(f"secret{i}" for i in range(80))
    _final(cached.submit(_chat("n1", prompt, namespace="tenant-a")))
    b = _final(cached.submit(_chat("n2", prompt, namespace="tenant-b")))
    a = _final(cached.submit(_chat("n3", prompt, namespace="tenant-a")))
    assert b.usage.cached_prompt_tokens == 0
    assert a.usage.cached_prompt_tokens >= 64


def test_blocks_in_use_return_to_zero_after_cancels_deadlines_and_errors(tiny):
    engine = make_engine(tiny)
    long = _chat("long", "count", 400, ignore_eos=True)
    streams = [engine.submit(long), engine.submit(_chat("short", "hi", 3))]
    expired = _chat("late", "hello there", 3000, ignore_eos=True)  # seconds of decode
    expired.deadline = time.monotonic() + 0.3
    streams.append(engine.submit(expired))
    time.sleep(0.2)
    engine.cancel("long")
    failing = {"n": 0}

    def hook(stage: str, what) -> None:
        if stage == "prefill" and getattr(what, "job", None) and what.job.request_id == "boom":
            failing["n"] += 1
            raise RuntimeError("injected")

    engine.fault_hook = hook
    streams.append(engine.submit(_chat("boom", "x", 4)))
    outcomes = []
    for s in streams:
        try:
            outcomes.append(type(list(s)[-1]).__name__)
        except EngineError as exc:
            outcomes.append(type(exc).__name__)
    assert outcomes == ["Cancelled", "Finished", "DeadlineExceeded", "EngineError"]
    assert failing["n"] == 1
    assert _settle(engine) == 0
    engine.fault_hook = None
    running = engine.submit(_chat("drained", "more", 500, ignore_eos=True))
    next(iter(running))
    engine.drain(0)
    assert engine.stats()["kv_blocks_used"] == 0


def test_preempted_jobs_are_computed_again_and_give_the_tokens_they_give_alone(tiny):
    # a pool of 64 blocks x 16 tokens: four jobs of ~300 prompt + 200 reply tokens cannot
    # all hold their blocks at once
    tight = make_engine(tiny, kv_cache_mb=1, kv_block_size=16)
    per_token = tight.pool.bytes_per_token
    assert tight.pool.blocks == (1 << 20) // (per_token * 16)
    jobs = [_chat(f"p{i}", " ".join(f"w{i}x{j}" for j in range(90)), 200, ignore_eos=True)
            for i in range(4)]
    alone = [_final(tight.submit(j)).text for j in jobs]
    assert tight.stats()["kv_preemptions"] == 0
    streams = [tight.submit(j) for j in jobs]
    together = [_final(s) for s in streams]
    assert tight.stats()["kv_preemptions"] > 0
    assert [f.text for f in together] == alone
    assert all(f.usage.completion_tokens == 200 for f in together)
    assert _settle(tight) == 0
    tight.drain(0)


def test_a_job_that_can_never_fit_the_pool_is_refused_with_the_sizes(tiny):
    tight = make_engine(tiny, kv_cache_mb=1)
    tokens = tight.pool.blocks * tight.pool.block_size
    with pytest.raises(OutOfMemory, match=rf"this server's pool holds {tokens:,} \("
                                          rf"{tight.pool.blocks:,} blocks of 16\)"):
        list(tight.submit(_chat("huge", "x", tokens + 10)))
    assert _final(tight.submit(_chat("ok", "x", 4))).usage.completion_tokens >= 1
    tight.drain(0)


def test_many_different_prefixes_under_a_small_pool_evict_and_keep_serving(tiny):
    engine = make_engine(tiny, kv_cache_mb=1, max_queue=100)
    blocks = engine.pool.blocks
    seen = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            s = engine.stats()
            seen.append(s["kv_blocks_used"] + s["kv_blocks_cached"] + s["kv_blocks_free"])
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    prompts = [" ".join(f"p{i}q{j}" for j in range(60)) for i in range(100)]
    streams = [engine.submit(_chat(f"e{i}", p, 2)) for i, p in enumerate(prompts)]
    finals = [_final(s) for s in streams]
    stop.set()
    watcher.join()
    assert len(finals) == 100 and all(f.usage.completion_tokens >= 1 for f in finals)
    assert set(seen) == {blocks}  # the pool never grew, nothing leaked
    stats = engine.stats()
    assert stats["kv_blocks_evicted"] > 0 and _settle(engine) == 0
    # every prompt's blocks were counted; their prompts were all different
    assert stats["prefix_prompt_tokens"] == sum(f.usage.prompt_tokens for f in finals)
    engine.drain(0)


def test_model_info_reports_the_pool(cached):
    info = cached.info()
    assert info.kv_block_size == 16 and info.kv_blocks == cached.pool.blocks
    assert cached.pool.nbytes() == (info.kv_blocks + 1) * 16 * cached.pool.bytes_per_token
    assert blocks_for(17, 16) == 2


# over gRPC: the salt, a namespace per bearer token, the usage and model info ----------------
@pytest.fixture(scope="module")
def tenants(tiny):
    from harness import RunningServer

    engine = make_engine(tiny)
    srv = RunningServer(engine, auth_token="tenant-one-token,tenant-two-token")
    yield srv
    srv.stop()
    engine.drain(0)


def test_each_bearer_token_and_each_salt_is_its_own_prefix_cache(tenants) -> None:
    from client import EagleClient

    prompt = " ".join(f"private{i}" for i in range(80))
    one = EagleClient(tenants.target, token="tenant-one-token")
    two = EagleClient(tenants.target, token="tenant-two-token")
    with one, two:
        first = one.chat(prompt, max_new_tokens=2)
        other = two.chat(prompt, max_new_tokens=2)
        salted = one.chat(prompt, max_new_tokens=2, cache_salt="session-9")
        again = one.chat(prompt, max_new_tokens=2)
        info = one.model_info()
    assert first.usage.cached_prompt_tokens == 0
    assert other.usage.cached_prompt_tokens == 0  # the same prompt under another token
    assert salted.usage.cached_prompt_tokens == 0  # the same token, another salt
    assert again.usage.cached_prompt_tokens == (first.usage.prompt_tokens - 1) // 16 * 16
    assert info.kv_block_size == 16 and info.kv_cache_blocks > 0


def test_a_cache_salt_over_the_limit_is_refused_with_its_field(tenants) -> None:
    from client import EagleClient, EagleError

    with EagleClient(tenants.target, token="tenant-one-token") as client:
        with pytest.raises(EagleError) as err:
            client.chat("hi", max_new_tokens=2, cache_salt="s" * 257)
    assert err.value.code.name == "INVALID_ARGUMENT"
    assert "cache_salt: 257 bytes, over the limit of 256" in err.value.details


def test_metrics_report_the_pool_and_the_hit_rate(tiny) -> None:
    from prometheus_client import generate_latest

    from service.metrics import Metrics

    engine = make_engine(tiny, kv_cache_mb=1)
    metrics = Metrics()
    metrics.bind_engine(engine)
    job = _chat("m1", " ".join(f"metric{i}" for i in range(40)))
    _final(engine.submit(job))
    hit = _final(engine.submit(_chat("m2", job.messages[-1].parts[0].text))).usage
    _settle(engine)
    text = generate_latest(metrics.registry).decode()
    blocks = engine.pool.blocks
    cached = engine.stats()["kv_blocks_cached"]
    assert cached > 0
    assert "eagle_kv_blocks_used 0.0" in text
    assert f"eagle_kv_blocks_cached {cached:.1f}" in text
    assert f"eagle_kv_blocks_free {blocks - cached:.1f}" in text
    assert f"eagle_prefix_cache_hit_tokens_total {hit.cached_prompt_tokens:.1f}" in text
    assert f"eagle_prefix_cache_queried_tokens_total {2 * hit.prompt_tokens:.1f}" in text
    assert "eagle_kv_preemptions_total 0.0" in text
    engine.drain(0)


@pytest.mark.parametrize("static", [False, True])
def test_flex_attention_over_block_tables_decodes_as_gathered_attention(tiny, static) -> None:
    """`--attention flex`: FlexAttention over the pool with each row's table as its block
    mask gives the gathered-SDPA decoder's greedy tokens and, in float32, its logits within
    1e-4; rows of 300, 40 and 17 positions, the last two sharing their first block (a prefix
    hit), the static (CUDA-graph) step too. Flex is refused in batch-invariant mode."""
    from service.engine.graphs import DecodeGraphs
    from service.engine.llm import Decoder

    lm = tiny.model.language_model
    with pytest.raises(ValueError, match="--attention flex is not batch-invariant"):
        Decoder(lm, 4, batch_invariant=True, attention="flex")
    with pytest.raises(ValueError, match="--attention 'paged': use gather or flex"):
        Decoder(lm, 4, attention="paged")
    ids = torch.randint(0, 600, (300,), generator=torch.Generator().manual_seed(5))
    runs = {}
    for attention in ("gather", "flex"):
        dec = Decoder(lm, 4, blocks=64, attention=attention)
        if static:
            dec.graphs = DecodeGraphs(dec, 4, capture=False, max_keys=1024)
        embed = lm.model.embed_tokens
        long = dec.reserve(300 + 12)
        shared = dec.reserve(16)
        tables = [long, shared + dec.reserve(24 + 12), shared + dec.reserve(1 + 12)]
        with torch.inference_mode():
            dec.prefill(embed(ids), long)
            dec.prefill(embed(ids[:16]), shared)
            for table, n in ((tables[1], 40), (tables[2], 17)):
                dec.prefill_chunk(embed(ids[16:n]), table, 16)
            tokens, positions = ids[[299, 39, 16]], torch.tensor([300, 40, 17])
            steps = []
            for _ in range(12):
                logits = dec.decode_step(tokens, positions, tables, int(positions.max()))
                steps.append(logits.float())
                tokens, positions = logits.argmax(-1), positions + 1
        runs[attention] = torch.stack(steps)
    assert torch.equal(runs["flex"].argmax(-1), runs["gather"].argmax(-1))
    assert (runs["flex"] - runs["gather"]).abs().max().item() < 1e-4


def test_an_engine_with_flex_attention_serves_the_replies_of_gathered_attention(tiny):
    """`attention="flex"` through the engine (the invariant mode's default turns off with
    it): three concurrent chats, one with the shared system prompt twice (a prefix hit),
    reply with the gathered-attention engine's text; blocks in use return to zero."""
    engines = {a: make_engine(tiny, attention=a, kv_cache_mb=1,  # unfused: a small pool
                              batch_invariant=None if a == "flex" else False)
               for a in ("gather", "flex")}
    try:
        assert not engines["flex"].decoder.invariant
        replies = {}
        for name, engine in engines.items():
            _final(engine.submit(_chat("warm", "What is rule 3?", system=SYSTEM)))
            streams = [engine.submit(_chat(f"{name}{i}", q, 10, system=SYSTEM if i else "",
                                           ignore_eos=True))
                       for i, q in enumerate(("Say hi.", "What is rule 5?", "And rule 9?"))]
            finals = [_final(s) for s in streams]
            assert finals[1].usage.cached_prompt_tokens > 560
            replies[name] = [f.text for f in finals]
            assert engine.pool.counts().used == 0
        assert replies["flex"] == replies["gather"]
    finally:
        for engine in engines.values():
            engine.drain(0)
