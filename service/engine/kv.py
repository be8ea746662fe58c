"""The KV cache: keys and values in fixed-size blocks from one pool per device, a block table
per job, and the prefix index through which jobs share full blocks.

Memory follows the tokens a job holds, not the longest job: a job's table lists the blocks
holding its positions in order (position p lives in block table[p // size] at p % size).
A full block is named by a hash chain over the token ids before and in it, the content keys
of the images and video frames whose embeddings fill it, and the caller's cache namespace;
another job whose prompt starts the same way, with the same media, in the same namespace,
takes the block instead of computing it again. A block nobody holds stays cached until
its space is needed (least recently used first). Block 0 is never handed out: padding rows
and the slack of a gather read it, and their results are masked.

Only the engine thread changes the pool; `counts()` may be read from any thread.
"""
from __future__ import annotations

import hashlib
import heapq
import threading
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

NULL_BLOCK = 0


def blocks_for(tokens: int, size: int) -> int:
    """Blocks that hold `tokens` positions."""
    return -(-tokens // size)


def namespace_root(namespace: str) -> bytes:
    """The hash a namespace's chains start from: the same tokens in two namespaces never
    share a block, so no caller learns another's prompts by timing."""
    return hashlib.blake2b(b"eagle-kv\0" + namespace.encode(), digest_size=16).digest()


def chain(parent: bytes, tokens: Sequence[int], media: Sequence[str] = ()) -> bytes:
    """The hash of a full block: its parent's hash, its token ids and the content keys of the
    media whose embeddings fill it (placeholder tokens alone say nothing of the image). A
    128-bit keyed-free cryptographic hash: a collision would hand one prompt's keys to
    another, so a fast non-cryptographic hash an attacker could collide is not used."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", tokens).tobytes())
    for key in media:
        h.update(b"\0media:" + key.encode())
    return h.digest()


def prompt_hashes(root: bytes, ids: Sequence[int], size: int, media_token: int,
                  media: Sequence[tuple[str, int]]) -> tuple[list[bytes], list[str]]:
    """Hashes of the prompt's full blocks, and the media keys of its last, partial block
    (hashed once the reply fills it). `media` is (content key, positions) per image or video
    in prompt order: they fill the `media_token` positions one after another."""
    spans: list[tuple[int, int, str]] = []  # (first, last + 1) in media-token order, key
    at = 0
    for key, n in media:
        spans.append((at, at + n, key))
        at += n
    hashes: list[bytes] = []
    parent, seen, g = root, 0, 0  # seen: media-token positions before this block
    for start in range(0, len(ids), size):
        block = ids[start:start + size]
        here = sum(1 for t in block if t == media_token)
        while g < len(spans) and spans[g][1] <= seen:  # spans wholly before this block
            g += 1
        keys, k = [], g
        while k < len(spans) and spans[k][0] < seen + here:
            keys.append(spans[k][2])
            k += 1
        seen += here
        if len(block) < size:
            return hashes, keys
        parent = chain(parent, block, keys)
        hashes.append(parent)
    return hashes, []


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros, not garbage: padding is read under a mask, and NaN * 0 is NaN. On the CPU from
    calloc (numpy's zeros), whose pages stay unresident until a block is first written, so
    a large pool costs memory only as it is used; torch.zeros would touch every page."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    size = torch.empty((), dtype=dtype).element_size()
    count = 1
    for n in shape:
        count *= n
    raw = torch.from_numpy(np.zeros(count * size, dtype=np.uint8))
    return raw.view(dtype).view(shape)


@dataclass(frozen=True)
class PoolCounts:
    """A snapshot of the pool for metrics and GetModelInfo."""

    block_size: int
    blocks: int
    used: int  # held by at least one job
    cached: int  # held by none, kept for prefix hits
    free: int  # neither
    evicted: int  # cached blocks whose space was taken, since start
    prompt_tokens: int  # prompt tokens looked up in the index, since start
    hit_tokens: int  # of those, found


class BlockPool:
    """Keys and values per layer: (kv_heads, blocks + 1, block_size, head_dim), block 0 the
    null block (heads first: a job's blocks gathered by index_select along dim 1 come out as
    each head's positions in order, one copy). Hands out blocks, counts references, and
    keeps the prefix index."""

    def __init__(self, layers: int, blocks: int, block_size: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        if blocks < 1 or block_size < 1:
            raise ValueError(f"a KV pool needs blocks and a block size, got {blocks} blocks "
                             f"of {block_size}")
        self.block_size = block_size
        self.blocks = blocks
        shape = (kv_heads, blocks + 1, block_size, head_dim)
        self.k = [_zeros(shape, dtype, device) for _ in range(layers)]
        self.v = [_zeros(shape, dtype, device) for _ in range(layers)]
        self.bytes_per_token = 2 * layers * kv_heads * head_dim * self.k[0].element_size()
        self._free = list(range(1, blocks + 1))  # a heap: low blocks first, so touched pages
        self._refs = [0] * (blocks + 1)          # stay few when the load is light
        self._hash_of: dict[int, bytes] = {}
        self._index: dict[bytes, int] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached, unheld: oldest first
        self.evicted = 0
        self.prompt_tokens = 0
        self.hit_tokens = 0
        # the engine thread changes the pool; a job ended from another thread (a drain, a
        # failure in the media stage) gives its blocks back from there
        self._lock = threading.Lock()

    # what there is ------------------------------------------------------------------------
    def available(self) -> int:
        """Blocks a job could get now: free ones and cached ones nobody holds."""
        return len(self._free) + len(self._lru)

    def counts(self) -> PoolCounts:
        with self._lock:
            free, cached = len(self._free), len(self._lru)
        return PoolCounts(self.block_size, self.blocks, self.blocks - free - cached, cached,
                          free, self.evicted, self.prompt_tokens, self.hit_tokens)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    # handing out and taking back ----------------------------------------------------------
    def allocate(self, n: int) -> list[int] | None:
        """`n` blocks for one job, or None when there are not that many (nothing taken)."""
        with self._lock:
            return self._allocate(n)

    def _allocate(self, n: int) -> list[int] | None:
        if n > self.available():
            return None
        out = []
        for _ in range(n):
            if self._free:
                block = heapq.heappop(self._free)
            else:  # the least recently used cached block gives its space
                block, _ = self._lru.popitem(last=False)
                del self._index[self._hash_of.pop(block)]
                self.evicted += 1
            self._refs[block] = 1
            out.append(block)
        return out

    def release(self, table: Sequence[int]) -> None:
        """A job lets go of its blocks. Hashed ones stay cached; the table's tail is released
        first, so under pressure a prefix's last blocks go before its first."""
        with self._lock:
            self._release(table)

    def _release(self, table: Sequence[int]) -> None:
        for block in reversed(table):
            self._refs[block] -= 1
            if self._refs[block]:
                continue
            if block in self._hash_of:
                self._lru[block] = None
            else:
                heapq.heappush(self._free, block)

    # the prefix index ---------------------------------------------------------------------
    def cached(self, hashes: Sequence[bytes]) -> int:
        """How many of the leading blocks are in the index (nothing taken)."""
        n = 0
        for h in hashes:
            if h not in self._index:
                break
            n += 1
        return n

    def acquire(self, hashes: Sequence[bytes]) -> list[int]:
        """Take the indexed blocks that start a chain, in order, up to the first miss."""
        with self._lock:
            return self._acquire(hashes)

    def _acquire(self, hashes: Sequence[bytes]) -> list[int]:
        out = []
        for h in hashes:
            block = self._index.get(h)
            if block is None:
                break
            if not self._refs[block]:
                del self._lru[block]
            self._refs[block] += 1
            out.append(block)
        return out

    def count_lookup(self, prompt_tokens: int, hit_tokens: int) -> None:
        """A prompt was looked up: for the hit rate."""
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.hit_tokens += hit_tokens

    def register(self, block: int, h: bytes) -> None:
        """A job's block is full: name it in the index so later jobs can share it. When
        another block already holds that content, this one stays private."""
        with self._lock:
            if block in self._hash_of or h in self._index:
                return
            self._index[h] = block
            self._hash_of[block] = h

    def clear_index(self) -> None:
        """Forget every cached block (their contents are stale, e.g. after a failed pass
        wrote part of them): unheld ones become free."""
        with self._lock:
            for block in self._lru:
                heapq.heappush(self._free, block)
            self._lru.clear()
            self._index.clear()
            self._hash_of.clear()
