"""How much of a long prompt to prefill in one scheduler iteration, by measured cost.

While a long prompt is prefilled a chunk per iteration, every running stream waits for the
chunk before its next token: its inter-token gap is the decode step plus the chunk. A chunk's
cost is not in its token count: each chunk reads the keys and values of every position before
it and each of its tokens attends over them, so a chunk has a fixed part that grows as the
prompt goes on (at 20K positions in, a few tokens can cost several decode steps on a CPU)
and a part per token. ChunkSizer measures each chunk and fits the recent ones, which lie
close together in the prompt, as

    t(n) = F + n * p          a chunk of n tokens here: fixed part F, p per token.

It also measures the engine's iterations: g, a stream's gap when no chunk runs, and b, what
an iteration with a chunk spends besides it (the decode step, the loop's own work). With `s`
the allowed slowdown (--max-itl-slowdown):

- the streams' bound: b + t(n) <= s * g, so their gap is at most s plain gaps;
- the prompt's bound: each iteration costs the prompt b + t(n) for n tokens that one pass
  would do in n * p, so its time to first token stays within s times its time alone when
  (b + t(n)) / (n * p) <= s, that is n >= (F + b) / ((s - 1) * p).

The largest chunk within the streams' bound is taken when it keeps the prompt's bound too.
When no chunk keeps both the prompt's bound wins, with the smallest chunk that keeps it, so
the streams' gap is as short as that allows. The two meet exactly at a slowdown of 2 when a
chunk has no fixed part (and b = g), and any fixed part parts them: the conflict is the
rule there, and the streams' gap comes to about 2 * (g + F). With no stream running the
chunk is the cap.
"""
from __future__ import annotations

import math
import statistics
from collections import deque


class ChunkSizer:
    """Sizes chunks from measured times (see the module's docstring). `start` is the first
    chunk's size, before anything is measured; chunks stay within [floor, cap]."""

    def __init__(self, slowdown: float, start: int, cap: int, floor: int = 16,
                 window: int = 12) -> None:
        if slowdown <= 1.0:
            raise ValueError(f"max_itl_slowdown {slowdown:g} must be above 1")
        self.slowdown, self.start, self.cap, self.floor = slowdown, start, cap, floor
        self._plain: deque[float] = deque(maxlen=9)  # iterations without a chunk
        self._besides: deque[float] = deque(maxlen=9)  # the rest of iterations with one
        self._recent: deque[tuple[int, int, float]] = deque(maxlen=window)  # (n, x, seconds)
        self.samples = 0

    @property
    def gap_s(self) -> float:
        """A stream's gap without a chunk: the median of recent plain iterations (0 until
        one is measured)."""
        return statistics.median(self._plain) if self._plain else 0.0

    @property
    def besides_s(self) -> float:
        """What an iteration with a chunk spends besides the chunk (the decode step and the
        loop's own work): the median of recent ones, else a plain iteration's."""
        return statistics.median(self._besides) if self._besides else self.gap_s

    def iteration_took(self, seconds: float, chunk_seconds: float = 0.0) -> None:
        """An engine iteration with streams decoding took `seconds`, `chunk_seconds` of them
        in a long prompt's chunk (0: none)."""
        if chunk_seconds > 0:
            self._besides.append(max(seconds - chunk_seconds, 0.0))
        else:
            self._plain.append(seconds)

    def chunk_took(self, tokens: int, offset: int, seconds: float) -> None:
        """A chunk of `tokens` positions starting at `offset` took `seconds`."""
        if tokens <= 0 or seconds <= 0:
            return
        if self._recent and offset < self._recent[-1][1]:
            self._recent.clear()  # a new prompt: the last one's costs are not this one's
        self._recent.append((tokens, offset, seconds))
        self.samples += 1

    def fit(self) -> tuple[float, float] | None:
        """(F, p) of the recent chunks: p the median of the slopes between pairs of chunks of
        different sizes, F the median of what is left (Theil-Sen: a few chunks slowed by
        something else on the machine do not move it); None while the sizes are too alike to
        tell the two parts apart."""
        chunks = list(self._recent)
        slopes = [(tb - ta) / (nb - na) for i, (na, _, ta) in enumerate(chunks)
                  for nb, _, tb in chunks[i + 1:] if abs(nb - na) >= 0.15 * max(na, nb)]
        if not slopes:
            return None
        per = statistics.median(slopes)
        if per <= 0:  # noise hid the size's effect: take it all as per token
            return 0.0, sum(t for _, _, t in chunks) / sum(n for n, _, _ in chunks)
        fixed = statistics.median(t - per * n for n, _, t in chunks)
        return max(fixed, 0.0), per

    def next(self, offset: int, rows: int, remaining: int) -> int:
        """The next chunk's size for a prompt `offset` positions in, with `rows` streams
        decoding and `remaining` positions left."""
        top = max(1, min(remaining, self.cap))
        if rows == 0:
            return top
        gap, besides = self.gap_s, self.besides_s
        if not self._recent or gap == 0:
            return max(1, min(remaining, max(self.floor, self.start)))
        s = self.slowdown
        last = self._recent[-1][0]
        fitted = self.fit()
        if fitted is None:  # probe another size so the fixed part shows
            return max(1, min(top, max(self.floor, 2 * last if last < top else last // 2)))
        fixed, per = fitted
        room = s * gap - besides - fixed
        itl_n = room / per if room > 0 else 0.0  # the streams' bound
        ttft_n = (fixed + besides) / ((s - 1) * per)  # the prompt's bound
        size = itl_n if itl_n >= ttft_n else math.ceil(ttft_n)
        # at most twice the last chunk: a fit from a few noisy chunks moves in steps
        size = min(size, 2 * last)
        return max(1, min(top, max(self.floor, int(size))))
