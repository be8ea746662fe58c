"""Structured output and logprobs. The tiny model's free text is noise, so a reply that has
the asked-for structure shows the constraint at work, not the model."""
from __future__ import annotations

import json
import math
import re

import grpc
import jsonschema
import pytest
import torch
from eagle.v1 import chat_pb2, chat_pb2_grpc

from client import EagleClient, EagleError
from service.engine.job import (
    ChatJob,
    ChatMessage,
    Delta,
    Finished,
    InvalidRequest,
    ResponseFormat,
    Role,
    SamplingParams,
    TextPart,
)

OBJ = {"type": "object", "additionalProperties": False}
POINT = {"type": "object", "properties": {"x": {"type": "integer", "minimum": -10, "maximum": 10},
                                          "y": {"type": "integer", "minimum": -10, "maximum": 10}},
         "required": ["x", "y"], "additionalProperties": False}


def obj(required: bool = True, **props) -> dict:
    return {**OBJ, "properties": props, **({"required": list(props)} if required else {})}


SCHEMAS = {
    "person": obj(name={"type": "string", "maxLength": 12},
                  age={"type": "integer", "minimum": 0, "maximum": 120}),
    "nested address": obj(address=obj(city={"type": "string", "maxLength": 10},
                                      zip={"type": "string", "pattern": "^[0-9]{5}$"})),
    "enum array": obj(tags={"type": "array", "items": {"enum": ["red", "green", "blue"]},
                            "minItems": 1, "maxItems": 3}),
    "bounded number": obj(score={"type": "number", "minimum": 0, "maximum": 1}),
    "boolean and null": obj(ok={"type": "boolean"}, note={"type": "null"}),
    "top-level enum": {"enum": ["approve", "reject", "escalate"]},
    "const": obj(version={"const": 2}),
    "array of objects": {"type": "array", "minItems": 1, "maxItems": 3, "items": obj(
        sku={"type": "string", "maxLength": 8}, qty={"type": "integer", "minimum": 1,
                                                      "maximum": 99})},
    "invoice": obj(invoice_number={"type": "string", "pattern": "^INV-[0-9]{4}$"},
                   total={"type": "number", "exclusiveMinimum": 0, "maximum": 10000},
                   currency={"enum": ["USD", "EUR"]}, paid={"type": "boolean"}),
    "anyOf": obj(value={"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                  {"enum": ["none"]}]}),
    "$ref": {"$defs": {"point": POINT}, **obj(start={"$ref": "#/$defs/point"},
                                              end={"$ref": "#/$defs/point"})},
    "bounded integer": {"type": "integer", "minimum": 100, "maximum": 999},
    "string lengths": obj(code={"type": "string", "minLength": 3, "maxLength": 6}),
    "optional fields": {**obj(a={"type": "integer", "minimum": 0, "maximum": 5},
                              b={"type": "boolean"}), "required": ["a"]},
    "tuple": {"type": "array", "prefixItems": [{"type": "integer", "minimum": 0, "maximum": 9},
                                               {"enum": ["x", "y"]}], "items": False,
              "minItems": 2},
    "date format": obj(due={"type": "string", "format": "date"}),
    "oneOf": obj(shape={"oneOf": [
        obj(kind={"const": "circle"}, r={"type": "integer", "minimum": 1, "maximum": 9}),
        obj(kind={"const": "square"}, side={"type": "integer", "minimum": 1, "maximum": 9})]}),
    "nested arrays": obj(matrix={"type": "array", "minItems": 2, "maxItems": 2, "items": {
        "type": "array", "minItems": 2, "maxItems": 2,
        "items": {"type": "integer", "minimum": 0, "maximum": 9}}}),
    "deep nesting": obj(a=obj(b=obj(c={"enum": [1, 2, 3]}))),
    "moderation": obj(label={"enum": ["safe", "unsafe", "unsure"]},
                      confidence={"type": "integer", "minimum": 0, "maximum": 100},
                      reasons={"type": "array", "maxItems": 2,
                               "items": {"type": "string", "maxLength": 20}}),
}
SAMPLING = {"greedy": {}, "sampled": {"temperature": 1.0, "seed": 7}}


def validate(schema: dict, text: str) -> None:
    validator = jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    validator.validate(json.loads(text))


@pytest.fixture(scope="module")
def client(server):
    with EagleClient(server.target, timeout=60) as c:
        yield c


@pytest.mark.parametrize("how", SAMPLING)
@pytest.mark.parametrize("name", SCHEMAS)
def test_replies_validate_against_the_schema_through_chat_and_stream(client, name, how) -> None:
    schema = SCHEMAS[name]
    args = dict(json_schema=schema, max_new_tokens=256, **SAMPLING[how])
    whole = client.chat("Reply in JSON.", **args)
    assert whole.finish_reason == "stop", (whole.finish_reason, whole.text)
    validate(schema, whole.text)
    stream = client.stream_chat("Reply in JSON.", **args)
    assert "".join(stream) == whole.text
    assert stream.result.finish_reason == "stop"


def test_choice_returns_exactly_one_of_the_choices(client) -> None:
    choices = ["yes", "no", "needs review", "ja, natürlich"]
    for seed in range(6):
        reply = client.chat("Is it safe?", choice=choices, temperature=1.5, seed=seed)
        assert reply.text in choices and reply.finish_reason == "stop"
    reply = client.chat("Is it safe?", choice=choices)
    assert reply.text in choices and reply.finish_reason == "stop"


@pytest.mark.parametrize("pattern", [r"[0-9]{3}-[a-z]{2,5}", r"(cat|dog)s? \d+",
                                     r"[A-Z][a-z]{1,8}, [A-Z]{2} [0-9]{5}"])
def test_regex_output_matches_in_full(client, pattern) -> None:
    for seed in range(3):
        reply = client.chat("Answer.", regex=pattern, temperature=1.0, seed=seed,
                            max_new_tokens=64)
        assert reply.finish_reason == "stop" and re.fullmatch(pattern, reply.text), reply.text


def test_json_object_and_grammars(client) -> None:
    reply = client.chat("JSON please.", json_object=True, max_new_tokens=512,
                        temperature=1.0, seed=1)
    if reply.finish_reason == "stop":  # the noise model may fill a string until the limit
        assert isinstance(json.loads(reply.text), dict)
    else:
        assert reply.finish_reason == "length" and reply.text.startswith("{")
    lark = 'start: "move " DIR " " N\nDIR: "north" | "south"\nN: /[1-9]/'
    reply = client.chat("Where?", lark=lark)
    assert re.fullmatch(r"move (north|south) [1-9]", reply.text), reply.text
    gbnf = 'root ::= "id-" [0-9] [0-9] [0-9]'
    reply = client.chat("Which?", gbnf=gbnf)
    assert re.fullmatch(r"id-[0-9]{3}", reply.text), reply.text


def test_a_reply_cut_by_max_new_tokens_says_length(client) -> None:
    reply = client.chat("JSON.", json_schema=SCHEMAS["moderation"], max_new_tokens=3)
    assert reply.finish_reason == "length" and reply.usage.completion_tokens == 3
    with pytest.raises(ValueError):
        json.loads(reply.text)


def test_stop_strings_seeds_and_penalties_work_with_a_format(client) -> None:
    schema = SCHEMAS["person"]
    a = client.chat("JSON.", json_schema=schema, temperature=1.2, top_p=0.9, top_k=50, seed=11,
                    repetition_penalty=1.3)
    b = client.chat("JSON.", json_schema=schema, temperature=1.2, top_p=0.9, top_k=50, seed=11,
                    repetition_penalty=1.3)
    assert a.text == b.text and a.finish_reason == "stop"
    validate(schema, a.text)
    cut = client.chat("JSON.", json_schema=schema, stop=['"age"'])
    assert cut.finish_reason == "stop_sequence" and cut.stop_sequence == '"age"'
    assert cut.text.startswith('{"name":') and '"age"' not in cut.text


def test_a_pydantic_model_is_the_schema_and_the_reply_comes_back_parsed(client) -> None:
    pydantic = pytest.importorskip("pydantic")

    class Verdict(pydantic.BaseModel):
        label: str = pydantic.Field(max_length=10)
        score: int = pydantic.Field(ge=0, le=10)

    reply = client.chat("Judge.", json_schema=Verdict, max_new_tokens=128)
    assert isinstance(reply.parsed, Verdict)
    assert reply.parsed == Verdict.model_validate_json(reply.text)
    stream = client.stream_chat("Judge.", json_schema=Verdict, max_new_tokens=128)
    list(stream)
    assert stream.result.parsed == reply.parsed


@pytest.mark.parametrize("mutate,field,message", [
    (lambda g: setattr(g.json_schema, "schema", '{"type": "foo"}'),
     "generation.response_format.json_schema", "Invalid type: foo"),
    (lambda g: setattr(g.json_schema, "schema", "[1, 2]"),
     "generation.response_format.json_schema.schema",
     "a JSON Schema must be a JSON object, got list"),
    (lambda g: setattr(g.json_schema, "schema", "{nope"),
     "generation.response_format.json_schema.schema", "not valid JSON: Expecting property name"),
    (lambda g: (setattr(g.json_schema, "schema", '{"type": "string", "format": "ipv9"}'),
                setattr(g.json_schema, "strict", True)),
     "generation.response_format.json_schema", "Unknown format: ipv9"),
    (lambda g: setattr(g, "regex", "[0-9"), "generation.response_format.regex",
     'invalid regex "[0-9"'),
    (lambda g: g.choice.SetInParent(), "generation.response_format.choice.choices",
     "give 1 to 1024 choices, got 0"),
    (lambda g: g.choice.choices.extend(["ok", ""]),
     "generation.response_format.choice.choices[1]", "must be 1 to 1024 characters, got 0"),
    (lambda g: setattr(g.grammar, "lark", "start: nothing_here"),
     "generation.response_format.grammar.lark", 'unknown name: "nothing_here"'),
    (lambda g: g.grammar.SetInParent(), "generation.response_format.grammar",
     "the grammar has neither lark nor gbnf"),
    (lambda g: setattr(g, "top_logprobs", 21), "generation.top_logprobs",
     "21 is over the limit of 20"),
])
def test_bad_formats_are_invalid_argument_naming_the_field(server, mutate, field,
                                                           message) -> None:
    req = chat_pb2.ChatRequest()
    req.messages.add(role=chat_pb2.ROLE_USER).parts.add(text="hi")
    mutate(req.generation)
    with grpc.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            chat_pb2_grpc.ChatServiceStub(channel).Chat(req, timeout=30)
    err = EagleError.from_rpc(info.value, info.value.trailing_metadata())
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT
    assert err.field == field
    assert err.details.startswith(f"{field}: ") and message in err.details, err.details


def test_an_unknown_format_from_a_newer_client_is_refused(server) -> None:
    """A response format this server does not know (a client built from a newer contract
    sends a oneof case we lack) arrives as an unknown field of GenerationConfig: refused,
    never served as free text."""
    req = chat_pb2.ChatRequest()
    req.messages.add(role=chat_pb2.ROLE_USER).parts.add(text="hi")
    newer = bytes([0xAA, 0x06, 0x00])  # field 101 (length-delimited, empty) in generation
    data = req.SerializeToString() + bytes([0x1A, len(newer)]) + newer
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_unary("/eagle.v1.ChatService/Chat",
                                   request_serializer=lambda b: b,
                                   response_deserializer=chat_pb2.ChatResponse.FromString)
        with pytest.raises(grpc.RpcError) as info:
            call(data, timeout=30)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == (
        "generation: field 101 is not known to this server (a client built from a newer "
        "contract?); refusing rather than ignoring a generation setting")


# logprobs -------------------------------------------------------------------------------------
def _job(rid: str, **sampling) -> ChatJob:
    return ChatJob(rid, (ChatMessage(Role.USER, (TextPart("Describe a lighthouse."),)),),
                   SamplingParams(**sampling))


def _run(engine, job) -> tuple[list[Delta], Finished]:
    events = list(engine.submit(job))
    assert isinstance(events[-1], Finished)
    return [e for e in events if isinstance(e, Delta)], events[-1]


def _recomputed(engine, tiny, job, tokens: list[int]) -> torch.Tensor:
    """The model's logits before each generated token, from one full forward pass."""
    prompt = engine.prepare(job).ids
    ids = torch.tensor([prompt + tokens[:-1]])
    with torch.inference_mode():
        logits = tiny.model.language_model(input_ids=ids).logits[0].float()
    return logits[len(prompt) - 1:, : engine.vocab_limit]


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_equal_the_log_softmax_of_the_models_logits(engine, tiny, temperature) -> None:
    job = _job("lp", max_new_tokens=12, ignore_eos=True, temperature=temperature, seed=5,
               top_logprobs=5, logprobs=True)
    deltas, done = _run(engine, job)
    lps = [t for d in deltas for t in d.logprobs]
    assert len(lps) == done.usage.completion_tokens == 12
    tokens = [t.token_id for t in lps]
    expected = torch.log_softmax(_recomputed(engine, tiny, job, tokens) / (temperature or 1.0),
                                 -1)
    for step, t in enumerate(lps):
        assert math.isclose(t.logprob, float(expected[step, t.token_id]), abs_tol=2e-3)
        assert len(t.top) == 5
        top_values = [v for _, _, v in t.top]
        assert top_values == sorted(top_values, reverse=True)
        best = torch.topk(expected[step], 5)
        assert [i for i, _, _ in t.top] == best.indices.tolist()
        if t.logprob >= top_values[-1]:  # the chosen token ranks among the top: it is listed
            assert t.token_id in [i for i, _, _ in t.top]
        assert t.token_bytes == engine.grammars.token_bytes(t.token_id)
    if temperature == 0.0:  # greedy: the chosen token is the most likely one
        assert all(t.token_id == t.top[0][0] for t in lps)
    assert b"".join(t.token_bytes for t in lps).decode("utf-8", "replace") == done.text


def test_logprobs_under_a_format_come_from_the_masked_distribution(engine, tiny) -> None:
    fmt = ResponseFormat("choice", json.dumps(["alpha", "beta", "gamma delta"]),
                         field="generation.response_format.choice")
    job = _job("lpc", max_new_tokens=16, response_format=fmt, logprobs=True, top_logprobs=20)
    deltas, done = _run(engine, job)
    lps = [t for d in deltas for t in d.logprobs]
    assert done.text in ("alpha", "beta", "gamma delta") and len(lps) == len(lps) > 0
    logits = _recomputed(engine, tiny, job, [t.token_id for t in lps])
    replay = engine.grammars.constraint(fmt)
    for step, t in enumerate(lps):
        bitmask = engine.grammars.new_bitmask(1)
        engine.grammars.fill([replay], bitmask)
        allowed = engine.grammars.allowed(bitmask[0])
        expected = torch.log_softmax(logits[step].masked_fill(~allowed, float("-inf")), -1)
        assert math.isclose(t.logprob, float(expected[t.token_id]), abs_tol=2e-3)
        assert {i for i, _, _ in t.top} <= set(allowed.nonzero().view(-1).tolist())
        assert math.isclose(sum(math.exp(v) for _, _, v in t.top), 1.0, abs_tol=1e-3)
        replay.accept(t.token_id)


def test_logprobs_over_grpc_match_the_tokens_in_chat_and_stream(client) -> None:
    whole = client.chat("Hi", max_new_tokens=6, ignore_eos=True, top_logprobs=2)
    assert len(whole.logprobs) == whole.usage.completion_tokens == 6
    assert all(len(t.top_logprobs) == 2 for t in whole.logprobs)
    assert b"".join(t.token_bytes for t in whole.logprobs).decode("utf-8", "replace") == \
        whole.text
    stream = client.stream_chat("Hi", max_new_tokens=6, ignore_eos=True, top_logprobs=2)
    assert "".join(stream) == whole.text
    assert [(t.token_id, t.logprob) for t in stream.result.logprobs] == \
        [(t.token_id, t.logprob) for t in whole.logprobs]
    plain = client.chat("Hi", max_new_tokens=6, ignore_eos=True)
    assert plain.logprobs == [] and plain.text == whole.text


def test_sixteen_jobs_half_constrained_give_the_same_tokens_batched_as_alone(engine) -> None:
    """Constrained rows (each with its own schema, some sampled) and free rows share decode
    steps: a format's mask touches its own row only, so every job's tokens are the same."""
    names = list(SCHEMAS)
    jobs = []
    for i in range(16):
        sampling = dict(max_new_tokens=64 + i, temperature=0.8 if i % 3 == 0 else 0.0, seed=i,
                        logprobs=i % 4 == 1)
        if i % 2 == 0:
            schema = SCHEMAS[names[i]]
            sampling["response_format"] = ResponseFormat(
                "json_schema", json.dumps(schema), True, "generation.response_format.json_schema")
        jobs.append(ChatJob(f"mixed{i}", (ChatMessage(Role.USER, (
            TextPart(" ".join(f"w{j}" for j in range(2 + 5 * i))),)),), SamplingParams(**sampling)))
    alone = {j.request_id: _run(engine, j) for j in jobs}
    streams = {j.request_id: engine.submit(j) for j in jobs}
    completed = 0
    for job in jobs:
        events = list(streams[job.request_id])
        deltas, done = [e for e in events if isinstance(e, Delta)], events[-1]
        first_deltas, first = alone[job.request_id]
        assert done.text == first.text and done.reason is first.reason, job.request_id
        assert [(t.token_id, t.logprob) for d in deltas for t in d.logprobs] == \
            [(t.token_id, t.logprob) for d in first_deltas for t in d.logprobs]
        if job.sampling.response_format is not None and done.reason.value == "stop":
            validate(json.loads(job.sampling.response_format.spec), done.text)
            completed += 1
    assert completed == 8  # every constrained job finished its structure within its tokens


def test_a_format_that_compiles_too_long_is_invalid_argument_and_the_cache_is_bounded(
        tiny) -> None:
    from conftest import make_engine

    from service.engine.grammar import GrammarSettings

    engine = make_engine(tiny, grammar=GrammarSettings(cache_size=2, compile_timeout_s=0.001))
    try:
        heavy = {"type": "object", "properties": {"a": {"anyOf": [obj(**{
            f"k{i}": {"type": "array", "items": {"anyOf": [
                {"type": "integer"}, {"type": "string", "pattern": "[a-z]{1,30}"}]}}
            for i in range(50)}) for _ in range(30)]}}}
        fmt = ResponseFormat("json_schema", json.dumps(heavy), False,
                             "generation.response_format.json_schema")
        with pytest.raises(InvalidRequest) as info:
            engine.grammars.constraint(fmt)
        assert info.value.field == "generation.response_format.json_schema"
        assert str(info.value) == ("generation.response_format.json_schema: the format took "
                                   "over 0.001 s to compile; simplify it")
    finally:
        engine.drain(0)
    engine = make_engine(tiny, grammar=GrammarSettings(cache_size=2))
    try:
        formats = [ResponseFormat("regex", f"[0-9]{{{n}}}", field="r") for n in (1, 2, 3)]
        for fmt in formats:
            assert not engine.grammars.cached(fmt)
            engine.grammars.constraint(fmt)
            assert engine.grammars.cached(fmt)
        assert [engine.grammars.cached(f) for f in formats] == [False, True, True]  # LRU
    finally:
        engine.drain(0)


def test_every_token_has_its_exact_bytes_even_the_raw_0xff_byte(engine, tiny) -> None:
    """llguidance marks special tokens with byte 0xFF, so it decodes the token that is that
    one byte to nothing; the contract promises the token's bytes."""
    raw = tiny.tokenizer.convert_tokens_to_ids("ÿ")  # byte-level BPE's stand-in for 0xFF
    assert engine.grammars.token_bytes(raw) == b"\xff"
    assert engine.grammars.token_bytes(tiny.tokenizer.convert_tokens_to_ids("¡")) == b"\xa1"
    assert engine.grammars.token_bytes(
        tiny.tokenizer.convert_tokens_to_ids("<|im_end|>")) == b"<|im_end|>"
    assert [i for i in range(engine.vocab_limit) if not engine.grammars.token_bytes(i)] == []


@pytest.mark.parametrize("value,ok", [("2024-02-29", True), ("2000-02-29", True),
                                      ("0004-02-29", True), ("1999-12-31", True),
                                      ("0000-07-25", False), ("2023-02-29", False),
                                      ("1900-02-29", False), ("2024-04-31", False),
                                      ("2024-13-01", False)])
def test_the_dates_a_format_allows_are_the_calendars(engine, tiny, value, ok) -> None:
    """What jsonschema's format checker and pydantic accept: no year 0000, no 31 April,
    29 February only in leap years."""
    for schema, text in (({"type": "string", "format": "date"}, value),
                         ({"type": "string", "format": "date-time"}, f"{value}T10:20:30Z")):
        constraint = engine.grammars.constraint(ResponseFormat(
            "json_schema", json.dumps(schema), False, "f"))
        ids = tiny.tokenizer(json.dumps(text), add_special_tokens=False)["input_ids"]
        try:
            for token in ids:
                constraint.accept(token)
            accepted = constraint.matcher.is_accepting()
        except InvalidRequest:
            accepted = False
        assert accepted == ok, (schema["format"], text)


def test_sampled_dates_pass_jsonschema_and_pydantic(client) -> None:
    import datetime as dt

    import pydantic

    class Event(pydantic.BaseModel):
        day: dt.date
        at: dt.datetime

    checker = jsonschema.Draft202012Validator(Event.model_json_schema(),
                                              format_checker=jsonschema.FormatChecker())
    for seed in range(12):
        reply = client.chat("When?", json_schema=Event, temperature=1.0, seed=seed,
                            max_new_tokens=80, timeout=60)
        checker.validate(json.loads(reply.text))
        assert isinstance(reply.parsed, Event)
