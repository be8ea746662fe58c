"""Response formats compiled first in killable child processes, so a schema or grammar that
crashes the grammar engine (a stack overflow on thousands of chained rules) or runs away (a
compile whose time grows with the square of its rules) costs only its own request.

A format the probe compiled cleanly is then compiled again in the engine process, where its
matcher must live (the work is the same and took under the time limit). A probe that crashes
or passes the limit is killed and replaced; its request gets INVALID_ARGUMENT naming why.
Workers start on the first format that is not cached, each building its own llguidance
tokenizer, and several run at once so one slow format never holds up another caller's.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import resource
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

from service.engine.job import InvalidRequest, ResponseFormat, Unavailable

log = logging.getLogger(__name__)


def build_tokenizer(tokenizer, vocab_limit: int, stop_ids: list[int]):
    import llguidance.hf

    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_limit, eos_token=stop_ids)


# Dates a reply may hold: the calendar's own (no year 0000, no 31 April, 29 February only in a
# leap year), so what the grammar allows is what jsonschema's format checker and pydantic's
# date parsing accept (llguidance's own `date` allows 0000-02-31).
_YEAR = "([0-9]{3}[1-9]|[0-9]{2}[1-9][0-9]|[0-9][1-9][0-9]{2}|[1-9][0-9]{3})"
_LEAP = "([0-9]{2}(0[48]|[2468][048]|[13579][26])|(0[48]|[2468][048]|[13579][26])00)"
_MONTH_DAY = ("((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)"
              "|02-(0[1-9]|1[0-9]|2[0-8]))")
_DATE = f"({_YEAR}-{_MONTH_DAY}|{_LEAP}-02-29)"
_TIME = "([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]{1,6})?"
_PATTERNS = {"date": f"^{_DATE}$",
             "date-time": f"^{_DATE}T{_TIME}(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$"}


def calendar_formats(schema: object) -> object:
    """The schema with each string `format` of date or date-time (and no pattern of its own)
    replaced by the calendar's pattern; walked without recursion (depth is capped earlier)."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            fmt = node.get("format")
            if fmt in _PATTERNS and "pattern" not in node:
                del node["format"]
                node["pattern"] = _PATTERNS[fmt]
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return schema


def grammar_text(fmt: ResponseFormat) -> str:
    """The llguidance grammar text for a format. Replies to JSON formats are compact: no
    whitespace between tokens (a model cannot loop on whitespace, and it costs no tokens)."""
    from llguidance import LLMatcher

    options = {"whitespace_flexible": False, "lenient": not fmt.strict}
    if fmt.kind == "json_schema":
        schema = calendar_formats(json.loads(fmt.spec))
        return LLMatcher.grammar_from_json_schema(schema, defaults=options)
    if fmt.kind == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=options)
    if fmt.kind == "regex":
        return LLMatcher.grammar_from_regex(fmt.spec)
    if fmt.kind == "choice":  # Lark string literals: JSON's escapes are valid in them
        literals = " | ".join(json.dumps(c, ensure_ascii=False) for c in json.loads(fmt.spec))
        return LLMatcher.grammar_from_lark(f"start: {literals}")
    if fmt.kind == "lark":
        return LLMatcher.grammar_from_lark(fmt.spec)
    if fmt.kind == "gbnf":
        from llguidance.gbnf_to_lark import gbnf_to_lark

        try:
            return LLMatcher.grammar_from_lark(gbnf_to_lark(fmt.spec))
        except Exception as exc:  # the converter's own parse errors
            raise InvalidRequest(f"{fmt.field}: {first_line(str(exc))}",
                                 field=fmt.field) from None
    raise InvalidRequest(f"{fmt.field}: unknown format {fmt.kind!r}", field=fmt.field)


# llguidance's bare error names, said in the caller's terms
_EXPLAINED = {
    "NoExtensionBias": "the format admits no reply at all: a $ref (or rule) that refers only "
                       "to itself, directly or through others, never reaches a value "
                       "(NoExtensionBias)",
}


def first_line(text: str, limit: int = 500) -> str:
    """The library's reason without the grammar dump that may follow it."""
    first = text.strip().split("\n<state>")[0].split("\n<grammar>")[0]
    return _EXPLAINED.get(first.strip(), first[:limit])


def compile_format(tokenizer, fmt: ResponseFormat, words: int) -> str:
    """Compile `fmt` as the engine does (grammar, matcher, first mask); '' or the reason."""
    import ctypes

    from llguidance import LLMatcher

    try:
        matcher = LLMatcher(tokenizer, grammar_text(fmt), log_level=0)
    except InvalidRequest as exc:
        return exc.message.removeprefix(f"{fmt.field}: ")
    if not matcher.is_error():
        mask = (ctypes.c_int32 * words)()
        matcher.unsafe_compute_mask_ptr(ctypes.addressof(mask), words * 4)
    return first_line(matcher.get_error()) if matcher.is_error() else ""


def _child(conn: Connection, tokenizer, vocab_limit: int, stop_ids: list[int],
           memory_mb: int, compile_fn: Callable) -> None:
    """A probe worker: builds its tokenizer, then compiles formats until the pipe closes.
    Each compile runs on a thread, as the engine's own compiles do (the same stack size)."""
    if memory_mb:
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    tok = build_tokenizer(tokenizer, vocab_limit, stop_ids)
    words = (vocab_limit + 31) // 32
    conn.send(("ready", ""))
    while True:
        try:
            fmt = conn.recv()
        except (EOFError, OSError):
            return
        out: list[tuple[str, str]] = []
        worker = threading.Thread(target=_compile_into, args=(out, compile_fn, tok, fmt, words,
                                                              memory_mb))
        worker.start()
        worker.join()
        conn.send(out[0])


def _compile_into(out: list, compile_fn: Callable, tok, fmt: ResponseFormat, words: int,
                  memory_mb: int) -> None:
    try:
        out.append(("ok", compile_fn(tok, fmt, words)))
    except MemoryError:
        out.append(("ok", f"compiling it needed more than {memory_mb} MB"))
    except Exception as exc:  # the library's own failures are the format's
        out.append(("ok", f"{type(exc).__name__}: {str(exc)[:300]}"))


class _Worker:
    def __init__(self, ctx, args: tuple) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_child, args=(child, *args), daemon=True,
                                name="grammar-probe")
        self.proc.start()
        child.close()
        self.ready = False

    def poll_ready(self, wait: float = 0.0) -> bool:
        """Whether its tokenizer is built (the worker says so once); raises when it died."""
        if not self.ready and self.conn.poll(wait):
            self.conn.recv()
            self.ready = True
        return self.ready

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class CompileProbe:
    """`check(fmt)`: raises InvalidRequest when `fmt` fails, crashes or runs past the time
    limit in a child process; returns when it compiles there."""

    def __init__(self, tokenizer, vocab_limit: int, stop_ids: list[int], workers: int = 2,
                 timeout_s: float = 10.0, memory_mb: int = 2048,
                 compile_fn: Callable = compile_format) -> None:
        self.timeout_s = timeout_s
        self.workers = workers
        self._args = (tokenizer, vocab_limit, stop_ids, memory_mb, compile_fn)
        self._ctx = multiprocessing.get_context("forkserver")
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._all: list[_Worker] = []
        self.replaced = 0
        self.crashes = 0  # formats that crashed a worker
        self.timeouts = 0  # formats killed at the time limit

    def _spawn(self) -> None:
        worker = _Worker(self._ctx, self._args)
        with self._cond:
            self._all.append(worker)
            self._idle.append(worker)
            self._cond.notify()

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        with self._cond:
            if worker in self._all:
                self._all.remove(worker)
            self.replaced += 1
        self._spawn()  # it builds its tokenizer while the others serve

    def _take(self, deadline: float) -> _Worker | None:
        """An idle worker, a ready one first; None when none frees up by `deadline`."""
        with self._cond:
            if not self._all:
                for _ in range(self.workers):
                    worker = _Worker(self._ctx, self._args)
                    self._all.append(worker)
                    self._idle.append(worker)
            while True:
                try:
                    ready = [w for w in self._idle if w.poll_ready()]
                except (EOFError, OSError):  # died while starting: replaced below
                    ready = []
                chosen = (ready or self._idle or [None])[0]
                if chosen is not None:
                    self._idle.remove(chosen)
                    return chosen
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def _give_back(self, worker: _Worker) -> None:
        with self._cond:
            self._idle.append(worker)
            self._cond.notify()

    def check(self, fmt: ResponseFormat) -> None:
        worker = self._take(time.monotonic() + self.timeout_s)
        if worker is None:  # every worker busy with slow formats for a whole time limit
            raise InvalidRequest(f"{fmt.field}: every grammar compiler stayed busy for "
                                 f"{self.timeout_s:g} s; retry", field=fmt.field)
        sent = False
        try:
            if not worker.poll_ready(120.0):  # a new worker's start is not counted
                raise OSError("the grammar compiler did not start")
            worker.conn.send(fmt)
            sent = True
            if not worker.conn.poll(self.timeout_s):
                self._replace(worker)
                worker = None
                self.timeouts += 1
                raise InvalidRequest(f"{fmt.field}: the format took over {self.timeout_s:g} s "
                                     f"to compile; simplify it", field=fmt.field)
            _, reason = worker.conn.recv()
        except (EOFError, OSError):
            worker.proc.join(timeout=2)
            code = worker.proc.exitcode
            self._replace(worker)
            worker = None
            how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            if not sent:  # the process never got the format: not the caller's fault
                log.error("a grammar compiler process failed to start (%s)", how)
                raise Unavailable(f"{fmt.field}: the grammar compiler could not start ({how}); "
                                  f"retry", field=fmt.field) from None
            self.crashes += 1
            log.warning("a response format crashed the grammar compiler (%s)", how)
            raise InvalidRequest(f"{fmt.field}: the format crashed the grammar compiler "
                                 f"({how}); it is too deep or too large to compile",
                                 field=fmt.field) from None
        finally:
            if worker is not None:
                self._give_back(worker)
        if reason:
            raise InvalidRequest(f"{fmt.field}: {reason}", field=fmt.field)

    def close(self) -> None:
        with self._cond:
            workers, self._all, self._idle = list(self._all), [], []
        for worker in workers:
            worker.kill()

    def pids(self) -> list[int]:
        with self._cond:
            return [w.proc.pid for w in self._all]


__all__ = ["CompileProbe", "build_tokenizer", "compile_format", "first_line", "grammar_text"]
