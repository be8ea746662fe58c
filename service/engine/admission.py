"""Admission by KV blocks on the engine thread: which waiting jobs join the batch, the blocks
each gets (shared from the prefix index where its prompt was seen before), growth as jobs
decode, and preemption when the pool runs out."""
from __future__ import annotations

import logging
import os

import torch

from service.engine.job import BATCH
from service.engine.kv import BlockPool, blocks_for, chain, namespace_root, prompt_hashes
from service.engine.prepare import Prepared
from service.engine.runs import Queued, Running

log = logging.getLogger("service.engine.scheduler")

# Without a --kv-cache-mb, the pool takes this share of the memory left on the device after
# the weights, within [one full context, every row at full context].
_CPU_SHARE = 0.25  # of MemAvailable: the media threads, vision and the OS need the rest
_CUDA_SHARE = 0.85  # of the free memory after weights, less the reserve below
_CUDA_RESERVE = 2 << 30  # activations of a prefill pass, the vision tower, CUDA graphs


def pool_blocks(settings, bytes_per_token: int, context: int, device: torch.device) -> int:
    """The KV pool's size in blocks: `settings.kv_cache_mb` when set, else the device's
    default (see _CPU_SHARE, _CUDA_SHARE)."""
    size = settings.kv_block_size
    if settings.kv_cache_mb:
        return max(1, (settings.kv_cache_mb << 20) // (bytes_per_token * size))
    least = bytes_per_token * context
    most = least * settings.max_running
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        room = int(max(0, free - _CUDA_RESERVE) * _CUDA_SHARE)
    else:
        room = int(_available_ram() * _CPU_SHARE)
    return max(1, min(most, max(least, room)) // (bytes_per_token * size))


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def hash_prompt(prep: Prepared, namespace: str, block_size: int, media_token: int,
                per_tile: int) -> None:
    """The prompt's full-block hashes and the media keys of its last, partial block."""
    media = [(g.key, int(g.tiles.shape[0]) * per_tile) for g in prep.groups]
    prep.hashes, prep.tail_media = prompt_hashes(namespace_root(namespace), prep.ids,
                                                 block_size, media_token, media)


class Admitting:
    """NativeEngine's admission and block accounting (a part of the engine, split off for
    size). Every block a job holds is in `self._held[id(stream)]`, released in `_end`."""

    pool: BlockPool

    def _admit(self) -> list[Queued]:
        """Take waiting jobs, in fair order (fair.py: the tenant furthest below its share
        first; within a tenant interactive before batch, each first come first served), that
        fit the batch-size cap, the token budget and the free blocks (lock held); a long
        prompt waits while another is prefilled in chunks. Each leaves with its blocks: the
        leading ones its prompt shares with the prefix index, then new ones for the rest."""
        out: list[Queued] = []
        holding = [c.run for c in (self._chunking,) if c is not None]
        self._make_room(holding)
        budget = sum(r.prep.job.sampling.max_new_tokens + len(r.prep.ids)
                     for r in self._running + holding)
        while (self._waiting and len(self._running) + len(holding) + len(out)
               < self.settings.max_running):
            q = self._waiting.peek()
            prep = q.prep
            if self._long(prep) and (holding or any(self._long(o.prep) for o in out)):
                break
            need = len(prep.ids) + prep.job.sampling.max_new_tokens
            if (self._running or holding or out) and \
                    budget + need > self.settings.max_batch_tokens:
                break
            if not self._take_blocks(q, busy=bool(self._running or holding or out)):
                break
            self._waiting.remove(q)
            tenant = q.stream.job.tenant
            self._waiting.started(tenant)
            self._run_tenants[id(q.stream)] = tenant
            if q.resume is None:  # its prompt's uncached tokens are its tenant's service
                self._waiting.charge(tenant, len(prep.ids) - q.cached)
            budget += need
            self._held[id(q.stream)] = q.table
            out.append(q)
        return out

    def _make_room(self, holding: list[Running]) -> None:
        """With every running slot taken, make one for the job that should run next when it
        is owed one: a tenant below its share of the slots (by weight) takes a slot from the
        tenant most over its share, and an interactive job takes one from its own tenant's
        batch jobs. The job preempted keeps its full blocks in the prefix index, so coming
        back costs little while the pool has room."""
        slots = self.settings.max_running
        q = self._waiting.peek()
        if q is None or len(self._running) + len(holding) < slots or not self._running:
            return
        job = q.stream.job
        fair = self._waiting
        victims: list[Running] = []
        if fair.running(job.tenant) + 1 <= fair.share(job.tenant, slots):
            for _, other in fair.over_share(slots):
                if other != job.tenant and fair.running(other) - 1 >= fair.share(other, slots):
                    victims = [r for r in self._running if r.stream.job.tenant == other]
                    break
        if not victims and job.priority != BATCH:
            victims = [r for r in self._running
                       if r.stream.job.tenant == job.tenant and r.stream.job.priority == BATCH]
        if victims:
            self._preempt(self._victim(victims), why="for a fair share of the batch")

    def _victim(self, runs: list[Running]) -> Running:
        """The job to preempt: of the tenant most over its share of the running slots, its
        batch jobs before its interactive ones, the newest first."""
        slots, fair = self.settings.max_running, self._waiting
        over = {t: fair.running(t) / fair.share(t, slots)
                for t in {r.stream.job.tenant for r in runs}}
        return max(runs, key=lambda r: (over[r.stream.job.tenant],
                                        r.stream.job.priority == BATCH, r.t_admit))

    def _take_blocks(self, q: Queued, busy: bool) -> bool:
        """Blocks for a job's prompt (or, coming back, for what it had): shared ones first.
        While others run, one block per running row stays free for their next tokens."""
        size = self.pool.block_size
        if q.resume is not None:  # all of its full blocks may be shared: it needs no logits
            length, hashes, counted = q.resume.length, q.resume.hashes, 0
            share = length // size
        else:  # at least one position is computed: its logits give the first token
            length, hashes, counted = len(q.prep.ids), q.prep.hashes, len(q.prep.ids)
            share = (length - 1) // size
        shared = self.pool.acquire(hashes[:share]) if self.settings.prefix_cache else []
        spare = len(self._running) if busy else 0
        fresh = blocks_for(length, size) - len(shared)
        new = self.pool.allocate(fresh) if self.pool.available() - fresh >= spare else None
        if new is None:
            self.pool.release(shared)
            return False
        if counted:
            self.pool.count_lookup(counted, len(shared) * size)
        q.table, q.cached = shared + new, len(shared) * size
        return True

    def _grow(self) -> None:
        """Before a decode step: a block for every running row whose next position starts
        one. When the pool is out of blocks, the newest jobs give theirs back (preempted:
        computed again later, their clients see only a delay)."""
        size = self.pool.block_size
        while True:
            short = [r for r in self._running if r.length >= len(r.table) * size]
            if not short:
                return
            if self.pool.available() >= len(short):
                for r in short:
                    r.table.extend(self.pool.allocate(1))
                return
            victims = self._running + ([self._chunking.run] if self._chunking else [])
            if len(victims) == 1:  # alone and out of blocks: cannot happen (see _prepare)
                raise RuntimeError("the KV pool cannot hold the only running job")
            self._preempt(self._victim(victims))

    def _preempt(self, run: Running, why: str = "the KV pool is full") -> None:
        """Take a job's blocks back and queue it first to come back. Its full blocks stay in
        the prefix index, so coming back is cheap unless others need the space meanwhile."""
        run.preemptions += 1
        self.preemptions += 1
        log.info("preempting %s at %d tokens: %s", run.stream.job.request_id, run.length, why)
        if self._chunking is not None and self._chunking.run is run:
            self._chunking = None
            run.length = 0  # its prompt comes back as a new admission
            resume = None
        else:
            self._running.remove(run)
            resume = run
        with self._cv:
            tenant = self._run_tenants.pop(id(run.stream), None)
            if tenant is not None:
                self._waiting.stopped(tenant)
            self.pool.release(self._held.pop(id(run.stream)))
            run.table = []
            self._waiting.push(Queued(run.stream, run.prep, run.t_submit, resume), front=True)

    def _register(self, run: Running, upto: int | None = None) -> None:
        """Name the job's newly full blocks in the prefix index once the pass that filled
        them is done (`upto` positions are in its blocks; all of them by default): the
        prompt's hashes were made with it, the reply's are chained on here."""
        if not self.settings.prefix_cache:
            return
        size = self.pool.block_size
        full = (run.length if upto is None else upto) // size
        prompt = len(run.prep.ids)
        while len(run.hashes) < full:
            j = len(run.hashes)
            parent = run.hashes[-1] if run.hashes else namespace_root(
                run.stream.job.cache_namespace)
            media = run.prep.tail_media if j * size < prompt else ()
            run.hashes.append(chain(parent, run.tokens[j * size:(j + 1) * size], media))
        for j in range(run.registered, full):
            self.pool.register(run.table[j], run.hashes[j])
        run.registered = max(run.registered, full)

    def _fits_ever(self, prep: Prepared) -> str:
        """Why a job could never run here, or "" when it can: its prompt and reply (within
        the context) must fit the whole pool."""
        tokens = min(len(prep.ids) + prep.job.sampling.max_new_tokens, self.context_length)
        need = blocks_for(tokens, self.pool.block_size)
        if need <= self.pool.blocks:
            return ""
        return (f"the prompt ({len(prep.ids):,} tokens) and its reply (up to "
                f"{prep.job.sampling.max_new_tokens:,}) need {tokens:,} tokens of KV cache; this "
                f"server's pool holds {self.pool.blocks * self.pool.block_size:,} "
                f"({self.pool.blocks:,} blocks of {self.pool.block_size}). Send a shorter prompt "
                f"or a lower max_new_tokens")
