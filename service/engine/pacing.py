"""How much of a long prompt to prefill in one scheduler iteration, by measured cost.

While a long prompt is prefilled a chunk per iteration, every running stream waits for the
chunk before its next token: its inter-token gap is the decode step plus the chunk. A chunk's
cost is not in its token count: each chunk reads the keys and values of every position before
it and each of its tokens attends over them, so a chunk has a fixed part that grows as the
prompt goes on (at 20K positions in, a few tokens can cost several decode steps on a CPU)
and a part per token. ChunkSizer measures the decode step (the median of recent steps) and
each chunk, and fits the recent chunks, which lie close together in the prompt, as

    t(n) = F + n * p          a chunk of n tokens here: fixed part F, p per token.

With `s` the allowed slowdown (--max-itl-slowdown) and d the decode step:

- the streams' bound: t(n) <= (s - 1) * d, so their gap is at most s decode steps;
- the prompt's bound: each iteration costs the prompt t(n) + d for n tokens that one pass
  would do in n * p, so its time to first token stays within s times its time alone when
  (t(n) + d) / (n * p) <= s, that is n >= (F + d) / ((s - 1) * p).

The largest chunk within the streams' bound is taken when it keeps the prompt's bound too.
When no chunk keeps both the prompt's bound wins, with the smallest chunk that keeps it, so
the streams' gap is as short as that allows. The two meet exactly at a slowdown of 2 when a
chunk has no fixed part, and any fixed part parts them: the conflict is the rule there, and
the streams' gap comes to 2 * (d + F). With no stream running the chunk is the cap.
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
        self.decode_s = 0.0  # a decode step's time: the median of the recent ones
        self._decodes: deque[float] = deque(maxlen=9)
        self._recent: deque[tuple[int, int, float]] = deque(maxlen=window)  # (n, x, seconds)
        self.samples = 0

    def decode_took(self, seconds: float) -> None:
        """A decode step of the running batch took `seconds`."""
        self._decodes.append(seconds)
        self.decode_s = statistics.median(self._decodes)

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
        if not self._recent or self.decode_s == 0:
            return max(1, min(remaining, max(self.floor, self.start)))
        s, d = self.slowdown, self.decode_s
        last = self._recent[-1][0]
        fitted = self.fit()
        if fitted is None:  # probe another size so the fixed part shows
            return max(1, min(top, max(self.floor, 2 * last if last < top else last // 2)))
        fixed, per = fitted
        room = (s - 1) * d - fixed
        itl_n = room / per if room > 0 else 0.0  # the streams' bound
        ttft_n = (fixed + d) / ((s - 1) * per)  # the prompt's bound
        size = itl_n if itl_n >= ttft_n else math.ceil(ttft_n)
        # at most twice the last chunk: a fit from a few noisy chunks moves in steps
        size = min(size, 2 * last)
        return max(1, min(top, max(self.floor, int(size))))
