"""Incremental detokenisation with stop strings: deltas never split a character or leak a stop."""
from __future__ import annotations


class TextAssembler:
    """Turns a growing list of token ids into text deltas.

    Decodes a short window of ids (from `prefix` on) and emits only what the window adds
    beyond its already-emitted part, holding back text that ends in an incomplete UTF-8
    sequence (U+FFFD) or that could still become a stop string. The deltas concatenate
    to exactly `text`.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tok = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self._prefix = 0  # window start (a few tokens back, so merges decode right)
        self._read = 0  # ids up to here are reflected in _decoded
        self._decoded = ""  # all text decoded so far (emitted + held back)
        self._emitted = 0  # characters of _decoded already handed out
        self.stopped = False
        self.stopped_by = ""  # the stop string found, once `stopped`
        self._cache_key: tuple[int, int] | None = None
        self._cache_text = ""

    @property
    def text(self) -> str:
        """What has been emitted so far."""
        return self._decoded[:self._emitted]

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append a token; return the new text that is safe to emit ('' if none yet)."""
        self.ids.append(token_id)
        window = self._decode(self.ids[self._prefix:])
        before = self._before()
        pending = len(self.ids) - self._read
        # A UTF-8 character spans at most 4 byte tokens: a tail that is still incomplete
        # after 4 is invalid for good and is let out as U+FFFD rather than held forever.
        if (window.endswith("\ufffd") and pending < 4) or len(window) <= len(before):
            return ""
        self._decoded += window[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def _before(self) -> str:
        """Decoded ids[prefix:read], cached while the window start does not move."""
        key = (self._prefix, self._read)
        if self._cache_key != key:
            self._cache_key = key
            self._cache_text = self._decode(self.ids[self._prefix:self._read])
        return self._cache_text

    def finish(self) -> str:
        """Flush everything still held back (an incomplete final character stays U+FFFD)."""
        if not self.stopped and self._read < len(self.ids):
            window = self._decode(self.ids[self._prefix:])
            self._decoded += window[len(self._before()):]
            self._read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        for s in self.stop:  # a stop string ends the reply before it
            at = self._decoded.find(s, max(0, self._emitted - len(s) + 1))
            if at >= 0:
                self._decoded = self._decoded[:at]
                self.stopped, self.stopped_by = True, s
                final = True
        end = len(self._decoded)
        if not final:
            end -= self._held_back()
        delta = self._decoded[self._emitted:end]
        self._emitted = max(self._emitted, end)
        return delta

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self._decoded) - self._emitted), 0, -1):
                if self._decoded.endswith(s[:k]):
                    longest = max(longest, k)
                    break
        return longest
