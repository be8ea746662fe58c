"""What an engine is to the servicer: its settings, its description, and its interface."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from service.engine.grammar import GrammarSettings
from service.engine.job import ChatJob, EngineInfo
from service.engine.prepare import MediaSettings
from service.engine.stream import JobStream


@dataclass(frozen=True)
class EngineSettings:
    """Capacity of the engine: what runs at once, what may wait, and the media stage."""

    max_running: int = 16
    max_queue: int = 64
    max_batch_tokens: int = 262_144
    preprocess_workers: int = 2
    vision_batch: int = 32
    vision_cache_tiles: int = 256  # 0 turns the cache off
    # A prefill or decode step running longer than this means the device is wedged (a
    # running kernel cannot be interrupted): running jobs get UNAVAILABLE, health goes
    # NOT_SERVING and the server exits for its supervisor to restart it.
    step_timeout_s: float = 120.0
    video_workers: int = 0  # decoder processes; 0 decodes in the media threads
    video_memory_mb: int = 4096
    # exact per-job results whatever the batch (see llm.py); None: on for CPU, off for CUDA
    batch_invariant: bool | None = None
    cuda_graphs: bool = True  # decode steps replayed from CUDA graphs (CUDA, not invariant)
    # those graphs captured from the torch.compile'd step (gather attention); the server's
    # --compile-decode turns it on, engines built in code (tests, tools) opt in
    compile_decode: bool = False
    # Stall-free prefill of long prompts: a prompt over `chunk_above` tokens is prefilled in
    # chunks, one per decode step, each as large as the per-iteration token budget leaves
    # after the running streams' decode rows (one token each; at least MIN_CHUNK), so the
    # streams keep a pace set by the budget. Shorter prompts are packed and prefilled whole.
    # token_budget 0: the device's measured default (TOKEN_BUDGETS); chunk_above 0: never.
    token_budget: int = 0
    chunk_above: int = 4096
    # With running streams, each chunk is sized by its measured cost (pacing.py) so the
    # streams' inter-token gap stays within this many plain decode steps; the token budget is
    # then only the first chunk's size, before anything is measured. 0: the budget rule above.
    max_itl_slowdown: float = 2.0
    # The KV cache (kv.py): blocks of `kv_block_size` tokens from one pool of `kv_cache_mb`
    # (0: the device's default, admission.pool_blocks); full blocks are shared between jobs
    # whose prompts start alike (same tokens, media and cache namespace) unless prefix_cache
    # is off.
    kv_cache_mb: int = 0
    kv_block_size: int = 16
    prefix_cache: bool = True
    # decode attention over the block tables (llm.ATTENTION): "gather" (SDPA over each
    # group's gathered blocks) or "flex" (FlexAttention over the pool in place; not
    # batch-invariant, so it turns the invariant mode's default off)
    attention: str = "gather"
    media: MediaSettings = MediaSettings()
    # Tenants' shares and queues: (name, weight, max_queue; 0: max_queue above). A tenant
    # not named has weight 1 and the server's queue (see fair.py and job.Capacity).
    tenants: tuple[tuple[str, float, int], ...] = ()
    grammar: GrammarSettings = GrammarSettings()


# Per-iteration token budgets by device type, measured with `make bench` (kv section). On
# this project's 2-core CPU, 256 gave the best time to first token of a 26K-token prompt
# (2.57 s; 2.78 s with the old 4096-token chunks) while cutting the running streams' median
# inter-token latency during it from 363 to 22 ms (docs/performance.md). CUDA's is the usual
# Sarathi-Serve figure; on an H200 (bench/gpu.sh, 2026-12-04, Eagle2-1B shapes) it prefilled a
# 26K-token prompt in 0.98 s against 3.6 s at 512, with the streams beside it stalled alike
# (15-17x their gap alone) at both: kept.
TOKEN_BUDGETS = {"cpu": 256, "cuda": 2048}
MIN_CHUNK = 64


class Engine(Protocol):
    """What the servicer needs from an engine; it knows nothing of protobuf."""

    def submit(self, job: ChatJob) -> JobStream: ...

    def cancel(self, request_id: str) -> bool: ...

    def info(self) -> EngineInfo: ...
