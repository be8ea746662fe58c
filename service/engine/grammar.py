"""Constrained decoding with llguidance: response formats compiled to matchers (cached by
format), token masks for the constrained rows of a batch step, and token bytes for logprobs.

Why llguidance (measured on the bench machine with Qwen2's 151,643-token vocabulary, see
docs/performance.md): its masks take microseconds per row, far below a decode step; a grammar compiles in
milliseconds because its lexer is built lazily; parser limits bound the work a hostile schema
can cause; it takes JSON Schema, regex and Lark (GBNF through its converter); and it is one
small wheel with no Python dependencies.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import torch

from service.engine.grammar_probe import CompileProbe, build_tokenizer, first_line, grammar_text
from service.engine.job import InvalidRequest, ResponseFormat

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GrammarSettings:
    cache_size: int = 256  # compiled formats kept (LRU)
    compile_timeout_s: float = 10.0  # a format that compiles longer is INVALID_ARGUMENT
    threads: int = 2  # mask computation across a batch's constrained rows
    # new formats compile first in killable child processes (grammar_probe), this many at once
    compile_workers: int = 2
    compile_memory_mb: int = 2048  # each compile process's data limit


class Constraint:
    """One job's position in its format: the tokens it may take next, and where it ends."""

    def __init__(self, matcher, fmt: ResponseFormat) -> None:
        self.matcher = matcher
        self.format = fmt

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise InvalidRequest(f"{self.format.field}: the reply left the format: "
                                 f"{self.matcher.get_error()}", field=self.format.field)

    @property
    def complete(self) -> bool:
        """Nothing more can follow (the format is satisfied and admits no extension)."""
        return self.matcher.is_stopped()

    def check(self) -> None:
        """After a mask computation: a matcher that hit a limit cannot go on."""
        if self.matcher.is_error():
            raise InvalidRequest(f"{self.format.field}: the format could not be followed: "
                                 f"{self.matcher.get_error()}", field=self.format.field)


class Grammars:
    """Compiles response formats for one tokenizer; computes and applies token masks.

    The llguidance tokenizer (a walk over the whole vocabulary: ~1 s for Qwen2's) is built on
    a background thread when the engine starts, so the first constrained request rarely waits.
    """

    def __init__(self, tokenizer, vocab_limit: int, stop_ids: set[int],
                 settings: GrammarSettings = GrammarSettings()) -> None:
        self.settings = settings
        self.vocab_limit = vocab_limit
        self.words = (vocab_limit + 31) // 32  # int32 words of one row's bitmask
        self._hf = tokenizer
        self._compiler = ThreadPoolExecutor(max(1, settings.compile_workers),
                                            thread_name_prefix="grammar")
        self._tokenizer = self._compiler.submit(build_tokenizer, tokenizer, vocab_limit,
                                                sorted(stop_ids))
        # started on the first new format, never for an engine that sees none
        self.probe = CompileProbe(tokenizer, vocab_limit, sorted(stop_ids),
                                  settings.compile_workers, settings.compile_timeout_s,
                                  settings.compile_memory_mb)
        self._cache: OrderedDict[tuple[str, str, str, bool], object] = OrderedDict()
        self._lock = threading.Lock()
        self._executor = None
        self._shifts: dict[torch.device, torch.Tensor] = {}
        self._bytes: dict[int, bytes] = {}

    # compiling (media threads) ----------------------------------------------------------
    def constraint(self, fmt: ResponseFormat, namespace: str = "") -> Constraint:
        """A fresh matcher for `fmt` (from the cache when the same format was seen in the same
        cache `namespace`, the job's tenant and cache_salt: a compile's time must not tell a
        tenant which schemas another sends). Raises InvalidRequest naming fmt.field with the
        library's reason."""
        key = (namespace, fmt.kind, fmt.spec, fmt.strict)
        with self._lock:
            template = self._cache.get(key)
            if template is not None:
                self._cache.move_to_end(key)
        if template is None:
            self.probe.check(fmt)  # a crash or a runaway ends in a child process, not here
            job = self._compiler.submit(self._compile, fmt)
            try:
                template = job.result(timeout=self.settings.compile_timeout_s)
            except FutureTimeout:
                raise InvalidRequest(f"{fmt.field}: the format took over "
                                     f"{self.settings.compile_timeout_s:g} s to compile; "
                                     f"simplify it", field=fmt.field) from None
            with self._lock:
                self._cache[key] = template
                while len(self._cache) > self.settings.cache_size:
                    self._cache.popitem(last=False)
        return Constraint(template.deep_copy(), fmt)

    def close(self) -> None:
        self.probe.close()

    def cached(self, fmt: ResponseFormat, namespace: str = "") -> bool:
        with self._lock:
            return (namespace, fmt.kind, fmt.spec, fmt.strict) in self._cache

    def _compile(self, fmt: ResponseFormat):
        from llguidance import LLMatcher

        grammar = grammar_text(fmt)
        matcher = LLMatcher(self._tokenizer.result(), grammar, log_level=0)
        if not matcher.is_error():  # the first mask builds most of the lexer: do it here,
            scratch = torch.empty(self.words, dtype=torch.int32)  # under the time limit
            matcher.unsafe_compute_mask_ptr(scratch.data_ptr(), scratch.numel() * 4)
        if matcher.is_error():
            raise InvalidRequest(f"{fmt.field}: {first_line(matcher.get_error())}",
                                 field=fmt.field)
        return matcher

    # masks (engine thread) --------------------------------------------------------------
    def new_bitmask(self, rows: int) -> torch.Tensor:
        return torch.empty((rows, self.words), dtype=torch.int32)

    def fill(self, constraints: list[Constraint], bitmask: torch.Tensor) -> None:
        """Row i of `bitmask` gets the tokens constraints[i] may take next (in parallel)."""
        from llguidance import LLExecutor  # not llguidance.torch: it compiles on import

        if self._executor is None:
            self._executor = LLExecutor(self.settings.threads)
        if not (bitmask.is_contiguous() and bitmask.dtype == torch.int32 and bitmask.is_cpu
                and bitmask.shape == (len(constraints), self.words)):
            raise ValueError(f"the bitmask must be a contiguous ({len(constraints)}, "
                             f"{self.words}) int32 CPU tensor")
        self._executor.unsafe_compute_mask_ptr(
            [(c.matcher, i) for i, c in enumerate(constraints)], bitmask.data_ptr(),
            self.words * 4, len(constraints))

    def allowed(self, bitmask_row: torch.Tensor) -> torch.Tensor:
        """(words,) int32 bits -> (vocab_limit,) bool, on the row's device."""
        shifts = self._shifts.get(bitmask_row.device)
        if shifts is None:
            shifts = self._shifts[bitmask_row.device] = torch.arange(
                32, dtype=torch.int32, device=bitmask_row.device)
        bits = (bitmask_row.unsqueeze(-1) >> shifts) & 1
        return bits.view(-1)[: self.vocab_limit].bool()

    # logprobs ---------------------------------------------------------------------------
    def token_bytes(self, token_id: int) -> bytes:
        """A token's exact bytes (special tokens: their name). llguidance keeps byte 0xFF to
        mark special tokens, so the token that is that one raw byte decodes to nothing there:
        such tokens are read from the byte-level vocabulary instead."""
        found = self._bytes.get(token_id)
        if found is None:
            found = self._tokenizer.result().decode_bytes([token_id])
            if not found:
                found = _byte_level(self._hf.convert_ids_to_tokens(token_id) or "")
            self._bytes[token_id] = found
        return found


def _byte_table() -> dict[str, int]:
    """GPT-2 byte-level BPE's printable stand-in for each byte (Qwen2's vocabulary uses it)."""
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    moved = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + k): b for k, b in enumerate(moved)}}


_BYTE_OF = _byte_table()


def _byte_level(token: str) -> bytes:
    """A byte-level vocabulary entry's bytes; any other text as UTF-8."""
    if token and all(c in _BYTE_OF for c in token):
        return bytes(_BYTE_OF[c] for c in token)
    return token.encode()


__all__ = ["Constraint", "GrammarSettings", "Grammars"]
