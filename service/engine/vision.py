"""Vision embeddings for admitted jobs: a bounded LRU keyed by media content, so re-sent images
skip the tower, and the encoder that fills it."""
from __future__ import annotations

import threading
from collections import OrderedDict, deque

import torch

from service.engine.loader import LoadedModel
from service.engine.prepare import Prepared


class VisionCache:
    """Embeddings (tiles, 256, hidden) by content key; capacity counted in tiles."""

    def __init__(self, max_tiles: int) -> None:
        self.max_tiles = max_tiles
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._tiles = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            found = self._items.get(key)
            if found is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return found

    def put(self, key: str, feats: torch.Tensor) -> None:
        n = feats.shape[0]
        if n > self.max_tiles:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = feats
            self._tiles += n
            while self._tiles > self.max_tiles:
                _, old = self._items.popitem(last=False)
                self._tiles -= old.shape[0]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._tiles = 0

    def __len__(self) -> int:
        return len(self._items)


def cache_key(prep: Prepared, group) -> str:
    """A group's key in the vision cache: its content within the job's cache namespace (its
    tenant and cache_salt), so another tenant's same image is neither served from nor counted
    as cached for this one."""
    return f"{prep.job.cache_namespace}\0{group.key}"


class VisionEncoder:
    """Runs the vision tower (SigLIP, pixel shuffle, mlp1) for the jobs of one admission."""

    def __init__(self, lm: LoadedModel, cache: VisionCache | None, norm: str, batch: int,
                 invariant: bool) -> None:
        self.lm, self.cache, self.norm, self.batch = lm, cache, norm, batch
        self.invariant = invariant

    @torch.inference_mode()
    def encode(self, preps: list[Prepared]) -> list[tuple[torch.Tensor | None, int]]:
        """Features per job, (tiles_j, 256, hidden), and how many of its tiles were cached.
        Misses go through the tower together (or one image at a time, batch-invariant)."""
        dev, dtype = self.lm.device, self.lm.dtype
        found: dict[str, torch.Tensor] = {}
        todo = []  # (cache key, group)
        for prep in preps:
            for group in prep.groups:
                key = cache_key(prep, group)
                if key in found:
                    continue
                hit = self.cache.get(key) if self.cache is not None else None
                found[key] = hit
                if hit is None:
                    todo.append((key, group))
        # Batch-invariant mode encodes each image (or video) on its own, so its features do
        # not depend on what else was admitted with it; otherwise all misses go together.
        batches = [[t] for t in todo] if self.invariant else ([todo] if todo else [])
        for batch in batches:
            pixels = torch.cat([g.pixel_values(self.norm, dev, dtype) for _, g in batch])
            feats = torch.cat([self.lm.model.encode_tiles(pixels[i:i + self.batch])
                               for i in range(0, pixels.shape[0], self.batch)])
            at = 0
            for key, g in batch:
                n = g.tiles.shape[0]
                found[key] = feats[at:at + n]
                at += n
                if self.cache is not None:
                    self.cache.put(key, found[key])
        fresh = {key for key, _ in todo}
        out: list[tuple[torch.Tensor | None, int]] = []
        for prep in preps:
            if not prep.groups:
                out.append((None, 0))
                continue
            cached = sum(g.tiles.shape[0] for g in prep.groups
                         if cache_key(prep, g) not in fresh)
            out.append((torch.cat([found[cache_key(prep, g)] for g in prep.groups]), cached))
        return out


class VisionSteps:
    """One job's vision features a slice at a time (at most the encoder's batch of tiles per
    `step`), so the frames of a long video are encoded between decode steps instead of in one
    stall. Slices follow the same boundaries as VisionEncoder.encode's, so a job encoded on
    its own gets the same features either way."""

    def __init__(self, encoder: VisionEncoder, prep: Prepared) -> None:
        self.enc, self.prep = encoder, prep
        self.done: dict[str, torch.Tensor] = {}
        self.cached = 0
        self._parts: dict[str, list[torch.Tensor]] = {}
        self._todo: deque = deque()
        cache = encoder.cache
        for group in prep.groups:
            if group.key in self.done or group.key in self._parts:
                continue
            hit = cache.get(cache_key(prep, group)) if cache is not None else None
            if hit is not None:
                self.done[group.key] = hit
                self.cached += group.tiles.shape[0]
                continue
            self._parts[group.key] = []
            n = group.tiles.shape[0]
            self._todo += [(group, a, min(a + encoder.batch, n)) for a in range(0, n, encoder.batch)]

    @torch.inference_mode()
    def step(self) -> bool:
        """Encode the next slice; True once every group is done."""
        if self._todo:
            group, a, b = self._todo.popleft()
            lm = self.enc.lm
            pixels = group.pixel_values(self.enc.norm, lm.device, lm.dtype, a, b)
            self._parts[group.key].append(lm.model.encode_tiles(pixels))
            if b == group.tiles.shape[0]:
                feats = torch.cat(self._parts.pop(group.key))
                self.done[group.key] = feats
                if self.enc.cache is not None:
                    self.enc.cache.put(cache_key(self.prep, group), feats)
        return not self._todo

    def result(self) -> torch.Tensor | None:
        """(tiles, 256, hidden) in prompt order, once `step` returned True."""
        if not self.prep.groups:
            return None
        return torch.cat([self.done[g.key] for g in self.prep.groups])
