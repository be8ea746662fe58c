"""Hostile response formats cost only their own request: static limits with precise
INVALID_ARGUMENT, compiles first in killable child processes (crash, runaway), several at
once, and the next request of every kind served within a second."""
from __future__ import annotations

import json
import threading
import time

import grpc
import pytest
from eagle.v1 import chat_pb2, chat_pb2_grpc

from client import EagleError
from service.engine.grammar_probe import CompileProbe, compile_format
from service.engine.job import InvalidRequest, ResponseFormat

WHERE = "generation.response_format"


def chained_lark(n: int) -> str:
    """start -> r0 -> r1 -> ... -> rn: each rule refers to the next (a chain n deep)."""
    return ("start: r0\n" + "".join(f'r{i}: r{i + 1} "a"\n' for i in range(n))
            + f'r{n}: "b"\n')


def nested_schema(levels: int) -> dict:
    schema: dict = {}
    for _ in range(levels):
        schema = {"properties": {"a": schema}}
    return schema


def _refused(server, mutate) -> grpc.RpcError:
    """The error of a Chat call whose generation settings `mutate` sets."""
    req = chat_pb2.ChatRequest()
    req.messages.add(role=chat_pb2.ROLE_USER).parts.add(text="hi")
    req.generation.max_new_tokens = 4
    mutate(req.generation)
    with grpc.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            chat_pb2_grpc.ChatServiceStub(channel).Chat(req, timeout=60)
    return info.value


def _call(server, mutate) -> EagleError:
    err = _refused(server, mutate)
    return EagleError.from_rpc(err, err.trailing_metadata())


@pytest.mark.parametrize("mutate,field,message", [
    (lambda g: setattr(g.grammar, "lark", chained_lark(3000)), f"{WHERE}.grammar.lark",
     "3,002 rules, over the limit of 1,000"),
    (lambda g: setattr(g.grammar, "gbnf", chained_lark(3000).replace(":", " ::=")
                       .replace("start", "root")), f"{WHERE}.grammar.gbnf",
     "3,002 rules, over the limit of 1,000"),
    (lambda g: setattr(g.grammar, "lark", "start: " + "(" * 80 + '"a"' + ")" * 80),
     f"{WHERE}.grammar.lark", "the grammar nests brackets 80 levels deep, over the limit of 64"),
    (lambda g: setattr(g.json_schema, "schema", json.dumps(nested_schema(300))),
     f"{WHERE}.json_schema.schema",
     "the schema nests objects and arrays 601 levels deep, over the limit of 64"),
    (lambda g: setattr(g.json_schema, "schema", "[" * 5000 + "]" * 5000),
     f"{WHERE}.json_schema.schema",
     "the schema nests objects and arrays 5000 levels deep, over the limit of 64"),
    (lambda g: setattr(g, "regex", "(" * 100 + "a" + ")" * 100), f"{WHERE}.regex",
     "the regex nests groups 100 levels deep, over the limit of 64"),
    (lambda g: setattr(g.json_schema, "schema", json.dumps(
        {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}})),
     f"{WHERE}.json_schema", "the format admits no reply at all: a $ref (or rule) that refers "
                             "only to itself, directly or through others, never reaches a value"),
])
def test_formats_past_the_limits_are_refused_naming_the_limit(server, mutate, field,
                                                              message) -> None:
    err = _call(server, mutate)
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT
    assert err.field == field
    assert err.details.startswith(f"{field}: {message}"), err.details


def test_brackets_inside_strings_and_classes_do_not_count(client) -> None:
    reply = client.chat("hi", max_new_tokens=8, regex=r"[(]{1,3}\(" + "a" * 3,
                        timeout=60)
    assert reply.text.endswith("aaa")


@pytest.fixture(scope="module")
def client(server):
    from client import EagleClient

    with EagleClient(server.target) as c:
        yield c


# the probe --------------------------------------------------------------------------------

def _fmt(kind: str, spec: str, field: str = "f") -> ResponseFormat:
    return ResponseFormat(kind, spec, field=field)


def test_a_grammar_that_crashes_the_compiler_costs_only_its_request(engine) -> None:
    """3,000 chained Lark rules overflow llguidance's stack: a segfault, in the probe."""
    grammars = engine.grammars
    before = set(grammars.probe.pids())
    with pytest.raises(InvalidRequest) as info:
        grammars.constraint(_fmt("lark", chained_lark(3000), f"{WHERE}.grammar.lark"))
    assert str(info.value) == (f"{WHERE}.grammar.lark: the format crashed the grammar "
                               f"compiler (signal 11); it is too deep or too large to compile")
    assert grammars.probe.replaced >= 1 and set(grammars.probe.pids()) != before
    assert engine.stats()["grammar_crashes"] >= 1  # eagle_grammar_compile_crashes_total
    start = time.monotonic()
    for fmt in (_fmt("regex", "[0-9]{4}"), _fmt("json_schema", '{"type": "integer"}'),
                _fmt("lark", 'start: "yes" | "no"')):
        grammars.constraint(fmt)  # a new worker builds its tokenizer: still well within 1 s
    assert time.monotonic() - start < 1.0


def _hang(tok, fmt: ResponseFormat, words: int) -> str:
    if fmt.spec == "hang":
        time.sleep(3600)
    return compile_format(tok, fmt, words)


@pytest.fixture()
def probe(tiny):
    p = CompileProbe(tiny.tokenizer, len(tiny.tokenizer), [0], workers=2, timeout_s=1.0,
                     compile_fn=_hang)
    yield p
    p.close()


def test_a_runaway_compile_is_killed_at_the_limit_and_never_blocks_another(probe) -> None:
    probe.check(_fmt("regex", "[a-z]+"))  # both workers up
    probe.check(_fmt("regex", "[a-c]+"))
    errors: list[str] = []

    def runaway() -> None:
        try:
            probe.check(_fmt("regex", "hang", "generation.response_format.regex"))
        except InvalidRequest as exc:
            errors.append(str(exc))

    slow = threading.Thread(target=runaway)
    slow.start()
    time.sleep(0.2)
    start = time.monotonic()
    probe.check(_fmt("regex", "[0-9]+"))  # the other worker, while the runaway holds one
    assert time.monotonic() - start < 0.5
    slow.join(5)
    assert errors == ["generation.response_format.regex: the format took over 1 s to "
                      "compile; simplify it"]
    assert probe.replaced == 1 and probe.timeouts == 1  # killed: its CPU is given back
    start = time.monotonic()
    probe.check(_fmt("regex", "[0-9]{2}"))
    probe.check(_fmt("regex", "[0-9]{3}"))
    assert time.monotonic() - start < 1.0


def test_the_largest_bad_formats_get_their_error_in_a_bounded_status(server) -> None:
    """A syntax error deep in a 250 KB grammar: the caller gets INVALID_ARGUMENT with a
    message cut to 1,000 bytes, status and details together far under a default client's
    16 KB of metadata (not RESOURCE_EXHAUSTED from its own limit)."""
    rules = "".join(f'r{i}: "{"x" * 200}"\n' for i in range(900))
    broken = "start: r0\n" + rules + 'r900: "unterminated \n' + "y" * 40_000
    for mutate in (lambda g: setattr(g.grammar, "lark", broken),
                   lambda g: setattr(g.grammar, "gbnf", broken.replace(":", " ::=")),
                   lambda g: setattr(g.json_schema, "schema", '{"type": "string", "pattern": "'
                                     + "(a" * 60 + "[" * 20_000 + '"}')):
        err = _refused(server, mutate)
        assert err.code() is grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert len(err.details().encode()) <= 1000
        trailers = sum(len(k) + len(v) for k, v in err.trailing_metadata())
        assert trailers < 6 * 1024, trailers


def test_every_status_message_is_cut_to_a_thousand_bytes_with_a_note() -> None:
    from service.errors import rich_status

    long = "é" * 30_000  # 60,000 bytes: the worst case for percent-encoding
    status = rich_status(grpc.StatusCode.INVALID_ARGUMENT, f"field: {long}", "field")
    assert len(status.details.encode()) <= 1000
    assert status.details.endswith("... (29,534 more characters cut)"), status.details[-60:]
    size = sum(len(k) + len(v) for k, v in status.trailing_metadata)
    assert size < 3000, size  # the details proto repeats the message: still bounded


def test_a_compiler_that_cannot_start_is_not_blamed_on_the_format() -> None:
    """A worker that dies before it is ready (here: no usable tokenizer) never saw the
    format: UNAVAILABLE for the server's fault, not INVALID_ARGUMENT for the caller's."""
    from service.engine.job import Unavailable

    probe = CompileProbe(object(), 100, [0], workers=1, timeout_s=5.0)
    try:
        with pytest.raises(Unavailable) as info:
            probe.check(_fmt("regex", "[0-9]+", "generation.response_format.regex"))
        assert str(info.value) == ("generation.response_format.regex: the grammar compiler "
                                   "could not start (exit code 1); retry")
        assert probe.crashes == 0
    finally:
        probe.close()
