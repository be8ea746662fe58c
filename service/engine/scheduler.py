"""The engine thread: admits prepared jobs into the running batch and steps them together."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from preprocess.errors import PreprocessError
from service.engine.admission import Admitting, hash_prompt, pool_blocks
from service.engine.decode import Decoding
from service.engine.fair import FairQueue
from service.engine.grammar import Grammars
from service.engine.graphs import DecodeGraphs
from service.engine.interface import MIN_CHUNK, TOKEN_BUDGETS, EngineInfo, EngineSettings
from service.engine.job import (
    Cancelled,
    Capacity,
    ChatJob,
    DeadlineExceeded,
    EngineError,
    Finished,
    OutOfMemory,
    Trace,
    Unavailable,
    check_admission,
    timed,
)
from service.engine.llm import Decoder, kv_bytes_per_token
from service.engine.loader import LoadedModel
from service.engine.pacing import ChunkSizer
from service.engine.prefill import Prefilling
from service.engine.prepare import Preparer
from service.engine.processor_prompt import FRAME_LIMITS, make_style, resolve_style
from service.engine.runs import Chunked, Queued, Running, as_engine_error
from service.engine.stream import JobStream, Outbox, Sink
from service.engine.vision import VisionCache, VisionEncoder
from service.runtime import trim_malloc

__all__ = ["EngineSettings", "NativeEngine"]  # EngineSettings re-exported for callers

log = logging.getLogger(__name__)
_IDLE_RELEASE_S = 2.0  # idle this long, the engine gives the allocator's free pages back


class NativeEngine(Admitting, Prefilling, Decoding):
    """Eagle2 on transformers' modules with continuous batching in one engine thread."""

    def __init__(self, loaded: LoadedModel, settings: EngineSettings | None = None,
                 context_length: int | None = None) -> None:
        settings = settings or EngineSettings()
        self.lm = loaded
        self.settings = settings
        tok = loaded.tokenizer
        self.context_length = context_window(loaded.cfg, context_length)
        self.prompt_style = resolve_style(loaded.folder, loaded.cfg.model_type,
                                          settings.media.prompt_style)
        most, default = FRAME_LIMITS[self.prompt_style]
        self.max_video_frames = settings.media.max_video_frames or most
        self.default_video_frames = min(settings.media.default_video_frames or default,
                                        self.max_video_frames)
        self.video_pool = None
        decode = None
        if settings.video_workers:
            from service.engine.video_workers import VideoDecoderPool

            self.video_pool = VideoDecoderPool(settings.video_workers,
                                               settings.media.video.timeout_s,
                                               settings.video_memory_mb)
            decode = self.video_pool.decode
        self.prepare = Preparer(tok, loaded.cfg, self.context_length, settings.media,
                                **({"decode_video": decode} if decode else {}),
                                style=make_style(self.prompt_style, tok, loaded.folder),
                                device=loaded.device if loaded.device.type == "cuda" else None)
        self.image_token_id = self.prepare.tokens.img_context
        stops = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        self.stop_ids = {i for i in stops if i is not None and i != tok.unk_token_id}
        self.vocab_limit = min(len(tok), loaded.cfg.text.vocab_size)
        self.grammars = Grammars(tok, self.vocab_limit, self.stop_ids, settings.grammar)
        # masks of a step's constrained rows are computed here while the model runs
        self._masks = ThreadPoolExecutor(1, thread_name_prefix="masks")
        invariant = settings.batch_invariant
        if invariant is None:
            invariant = loaded.device.type == "cpu" and settings.attention != "flex"
        lm = loaded.model.language_model
        blocks = pool_blocks(settings, kv_bytes_per_token(lm), self.context_length,
                             loaded.device)
        self.decoder = Decoder(lm, settings.max_running, invariant, blocks,
                               settings.kv_block_size, settings.attention)
        self.pool = self.decoder.pool
        self._held: dict[int, list[int]] = {}  # KV blocks by id(stream), released in _end
        log.info("KV pool: %d blocks of %d tokens (%.0f MiB, %d tokens)", blocks,
                 settings.kv_block_size, self.pool.nbytes() / 2**20,
                 blocks * settings.kv_block_size)
        self.token_budget = settings.token_budget or TOKEN_BUDGETS.get(loaded.device.type,
                                                                       2048)
        self._chunking: Chunked | None = None
        self._chunk_s = 0.0  # this iteration's chunk of a long prompt, seconds
        self.pacing = (ChunkSizer(settings.max_itl_slowdown,
                                  start=max(MIN_CHUNK, self.token_budget),
                                  cap=settings.token_budget or max(self.token_budget,
                                                                   settings.chunk_above),
                                  floor=settings.kv_block_size)
                       if settings.max_itl_slowdown else None)
        if loaded.device.type == "cuda" and not invariant and settings.cuda_graphs:
            self.decoder.graphs = DecodeGraphs(
                self.decoder, settings.max_running, max_keys=self.context_length,
                compile=settings.compile_decode and settings.attention == "gather")
        # Decode steps and short prompts of a small model on CPU are too short to share among
        # threads: waking the OpenMP team costs more than it saves (a 35-token prompt of the
        # tiny model: 1.2 ms on one thread, 2.8 ms on two). Vision and long prompts keep every
        # core. These settings are per thread: only the engine thread's are changed.
        self._cpu_threads = torch.get_num_threads()
        small = sum(p.numel() for p in loaded.model.language_model.parameters()) < 50_000_000
        self._few_threads = 1 if loaded.device.type == "cpu" and small else 0
        self.vision_cache = (VisionCache(settings.vision_cache_tiles)
                             if settings.vision_cache_tiles else None)
        self.vision = VisionEncoder(loaded, self.vision_cache, settings.media.norm,
                                    settings.vision_batch, invariant)
        self._pool = ThreadPoolExecutor(settings.preprocess_workers, thread_name_prefix="media")
        self._cv = threading.Condition()
        self._waiting = FairQueue({name: weight for name, weight, _ in settings.tenants})
        self.capacity = Capacity(settings.max_running, settings.max_queue, settings.tenants)
        self._run_tenants: dict[int, str] = {}  # id(stream) -> tenant, of admitted jobs
        self._running: list[Running] = []
        self._streams: dict[int, JobStream] = {}  # keyed by id(stream): ids may repeat
        self._accepting = True
        self._stop = False
        self.steps = 0
        self.preemptions = 0
        self._trimmed_at = -1  # `steps` when memory was last given back
        # A test hook: called as hook("prefill", prepared) and hook("step", rows) before the
        # model runs, so tests can inject faults (out of memory, hangs) on CPU.
        self.fault_hook: Callable[[str, object], None] | None = None
        self._outbox = Outbox()  # engine-thread events, delivered once per loop iteration
        self.wedged = False
        self._busy_since: float | None = None
        # the current CUDA device is per thread: the engine thread selects the model's, and a
        # bare `cuda` means the device current where the engine is built
        self._cuda_index = ((loaded.device.index if loaded.device.index is not None
                             else torch.cuda.current_device())
                            if loaded.device.type == "cuda" else None)
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()
        self._watchdog = threading.Thread(target=self._watch, name="engine-watchdog",
                                          daemon=True)
        self._watchdog.start()

    # the interface ------------------------------------------------------------------------
    def submit(self, job: ChatJob, sink: Sink | None = None, key: object = None) -> JobStream:
        """Queue a job; its events arrive on the returned stream (or go to `sink`, see
        JobStream). Full: Overloaded at once."""
        stream = JobStream(job, sink, key)
        with self._cv:
            check_admission(self.wedged, self._accepting)
            self.capacity.take(job.tenant)
            self._streams[id(stream)] = stream
        t_submit = time.monotonic()
        self._pool.submit(self._prepare, stream, t_submit)
        return stream

    def cancel(self, request_id: str) -> bool:
        with self._cv:
            found = [s for s in self._streams.values() if s.job.request_id == request_id]
            for stream in found:
                stream.cancel()
            self._cv.notify()
        return bool(found)

    def info(self) -> EngineInfo:
        dev = self.lm.device
        return EngineInfo(self.lm.name, self.lm.cfg.model_type, self.context_length,
                          self.lm.cfg.patch_tokens, self.lm.cfg.image_size,
                          self.lm.cfg.max_tiles, f"{dev.type} {str(self.lm.dtype)[6:]}",
                          self.prompt_style, self.max_video_frames, self.default_video_frames,
                          self.pool.block_size, self.pool.blocks)

    def stats(self) -> dict[str, int]:
        kv = self.pool.counts()
        with self._cv:
            cache = self.vision_cache
            return {"kv_blocks_used": kv.used, "kv_blocks_cached": kv.cached,
                    "kv_blocks_free": kv.free, "kv_blocks_evicted": kv.evicted,
                    "prefix_prompt_tokens": kv.prompt_tokens, "prefix_hit_tokens": kv.hit_tokens,
                    "kv_preemptions": self.preemptions,
                    "in_flight": self.capacity.total, "waiting": len(self._waiting),
                    "running": len(self._running), "steps": self.steps,
                    "prefilling": int(self._chunking is not None),
                    "vision_cache_hits": cache.hits if cache is not None else 0,
                    "vision_cache_misses": cache.misses if cache is not None else 0,
                    "grammar_crashes": self.grammars.probe.crashes,
                    "grammar_timeouts": self.grammars.probe.timeouts}

    def drain(self, grace: float) -> None:
        """Refuse new jobs, let running ones finish for up to `grace` s, then end the rest."""
        with self._cv:
            self._accepting = False
        end = time.monotonic() + grace
        while time.monotonic() < end and self.stats()["in_flight"]:
            time.sleep(0.02)
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=0 if self.wedged else 5)
        for stream in list(self._streams.values()):
            self._end(stream, Unavailable("the server shut down before this request finished"))
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._masks.shutdown(wait=False, cancel_futures=True)
        if self.video_pool is not None:
            self.video_pool.close()
        self.grammars.close()

    # the media stage (worker threads) -------------------------------------------------------
    def _prepare(self, stream: JobStream, t_submit: float) -> None:
        try:
            if stream.cancelled.is_set():
                raise Cancelled("cancelled by the client")
            if stream.job.expired():
                raise DeadlineExceeded("the deadline passed while the request was queued")
            prepared = self.prepare(stream.job, stream.stages)
            why = self._fits_ever(prepared)
            if why:
                raise OutOfMemory(why)
            if self.settings.prefix_cache:
                hash_prompt(prepared, stream.job.cache_namespace, self.pool.block_size,
                            self.image_token_id, self.lm.cfg.patch_tokens)
            fmt = stream.job.sampling.response_format
            if fmt is not None:
                with timed(stream.stages, "eagle.grammar", **{
                        "eagle.format": fmt.kind,
                        "eagle.cached": self.grammars.cached(fmt, stream.job.cache_namespace)}):
                    prepared.constraint = self.grammars.constraint(fmt,
                                                                   stream.job.cache_namespace)
        except (PreprocessError, EngineError) as exc:
            self._end(stream, exc)
            return
        except Exception as exc:  # a bug in the media stage fails this job alone
            log.exception("preparing %s failed", stream.job.request_id)
            self._end(stream, EngineError(f"internal error while preparing media: {exc}"))
            return
        prepared.ready_ns = time.time_ns()
        with self._cv:
            self._waiting.push(Queued(stream, prepared, t_submit))
            self._cv.notify()

    # the engine thread --------------------------------------------------------------------
    def _run(self) -> None:
        """The engine thread: the loop, and if the loop itself ever dies (an error outside a
        step's own handling), every held call fails at once as on a wedged device, and the
        engine refuses new ones, rather than leaving callers waiting on a dead thread."""
        try:
            self._loop()
        except BaseException:
            log.exception("the engine thread stopped")
            self._wedge(0, "the engine stopped after an internal error; this replica is "
                           "restarting, retry on another")
            self._outbox.flush()  # this thread's ends are held in its outbox until flushed

    @torch.inference_mode()
    def _loop(self) -> None:
        if self._cuda_index is not None:
            torch.cuda.set_device(self._cuda_index)
        graphs = self.decoder.graphs
        if isinstance(graphs, DecodeGraphs) and graphs.compile:  # before any job: see warm()
            took = graphs.warm()
            if graphs.compile_error:
                log.warning("the decode step runs uncompiled: %s", graphs.compile_error)
            else:
                log.info("decode step compiled in %.1f s", took)
        while True:
            with self._cv:
                idle = not self._has_work()
                while not self._has_work():
                    if not self._cv.wait(timeout=_IDLE_RELEASE_S) and idle:
                        break  # idle for a while: give memory back, outside the lock
                if idle and not self._has_work():
                    admitted = None
                else:
                    admitted = [] if self._stop else self._admit()
            if admitted is None:
                self._release_memory()
                continue
            if self._stop:
                return
            try:
                self._busy_since = time.monotonic()
                iteration, self._chunk_s = time.perf_counter(), 0.0
                if admitted:
                    self._prefill(admitted)
                    self._outbox.flush()  # first tokens out now, not after the batch's step
                if self._chunking is not None:  # one chunk of a long prompt per iteration
                    self._prefill_next_chunk()
                    self._outbox.flush()
                self._reap()
                if self._running:
                    self._step()
                    if self.pacing is not None:
                        self.pacing.iteration_took(time.perf_counter() - iteration,
                                                   self._chunk_s)
            except Exception as exc:  # a bug in the loop itself: fail what runs, keep serving
                log.exception("engine loop iteration failed")
                for r in self._running:
                    self._end(r.stream, as_engine_error(exc))
                self._running.clear()
                if self._chunking is not None:
                    self._end(self._chunking.run.stream, as_engine_error(exc))
                    self._chunking = None
            finally:
                self._busy_since = None
                self._outbox.flush()

    def _has_work(self) -> bool:
        return bool(self._waiting or self._running or self._chunking or self._stop)

    def _threads(self, many: bool) -> None:
        if self._few_threads:
            torch.set_num_threads(self._cpu_threads if many else self._few_threads)

    def _watch(self) -> None:
        """The watchdog: a step over its limit wedges the engine for good (see settings)."""
        limit = self.settings.step_timeout_s
        while not self._stop and not self.wedged:
            time.sleep(min(0.5, limit / 4))
            since = self._busy_since
            if since is not None and time.monotonic() - since > limit:
                self._wedge(limit)

    def _wedge(self, limit: float, message: str = "") -> None:
        if not message:
            log.error("an engine step has run for over %.1f s: the device is wedged", limit)
            message = (f"the model has been stuck for over {limit:g} s; this replica is "
                       f"restarting, retry on another")
        with self._cv:
            self.wedged = True
            self._accepting = False
            streams = list(self._streams.values())
        for stream in streams:
            self._end(stream, Unavailable(message))

    def _release_memory(self) -> None:
        """Idle: give the allocator's free pages back (once per idle spell: the media
        threads' image buffers are freed too, and glibc keeps them)."""
        if self.steps != self._trimmed_at:
            self._trimmed_at = self.steps
            self._free_cached_memory()

    def _free_cached_memory(self) -> None:
        # no gc.collect(): tensors are freed by reference counting, and a full collection
        # over torch's object graph takes a few hundred milliseconds
        if self.lm.device.type == "cuda":
            torch.cuda.empty_cache()
        else:
            trim_malloc()  # glibc keeps freed pages otherwise; RSS would stay high

    def _reap(self) -> None:
        """Drop running jobs whose client went away or whose deadline passed."""
        now = time.monotonic()
        for r in self._running:
            if r.stream.cancelled.is_set():
                r.finished = True
                self._end(r.stream, Cancelled("cancelled by the client"))
            elif r.stream.job.expired(now):
                r.finished = True
                self._end(r.stream, DeadlineExceeded(
                    f"the deadline passed after {r.generated} tokens"))
        self._compact()

    def _compact(self) -> None:
        """Remove finished rows (their blocks went back when they ended)."""
        if any(r.finished for r in self._running):
            self._running = [r for r in self._running if not r.finished]

    def _drop_if_gone(self, stream: JobStream) -> bool:
        if stream.cancelled.is_set():
            self._end(stream, Cancelled("cancelled by the client"))
            return True
        if stream.job.expired():
            self._end(stream, DeadlineExceeded("the deadline passed while the request was queued"))
            return True
        return False

    def _end(self, stream: JobStream, outcome: object) -> None:
        """The single place a job ends: exactly one final event, and its slot and KV blocks
        are released.

        On the engine thread the final event joins the step's outbox (after the job's last
        deltas); from other threads it is delivered at once.
        """
        with self._cv:
            if self._streams.pop(id(stream), None) is None:
                return
            self.capacity.give(stream.job.tenant)
            tenant = self._run_tenants.pop(id(stream), None)
            if tenant is not None:
                self._waiting.stopped(tenant)
            held = self._held.pop(id(stream), None)
            if held is not None:
                self.pool.release(held)
        outbox = self._outbox if threading.current_thread() is self._thread else None
        if stream.stages is not None:
            stream.push(Trace(tuple(stream.stages)), outbox)
        if isinstance(outcome, Finished):
            stream.finish(outcome, outbox)
        else:
            stream.fail(outcome, outbox)


# Eagle 2.5 was trained to 128K tokens with plain RoPE although its config may say 32K
# (shared/reference/eagle-family.md); the legacy layout's window is its config's.
TRAINED_CONTEXT = {"eagle_2_5_vl": 131_072}


def context_window(cfg, requested: int | None = None) -> int:
    """The context window: the config's max_position_embeddings, or `requested`, which may
    exceed it up to what the model family was trained for (logged); beyond that refused."""
    configured = int(cfg.text.max_position_embeddings)
    if not requested:
        return configured
    limit = max(configured, TRAINED_CONTEXT.get(cfg.model_type, configured))
    if requested > limit:
        from service.engine.job import ModelLoadError

        raise ModelLoadError(f"--context-length {requested:,} is over what this model was "
                             f"trained for ({limit:,} tokens)")
    if requested > configured:
        log.warning("context length raised to %d tokens, beyond the config's "
                    "max_position_embeddings of %d (this model family was trained to %d)",
                    requested, configured, limit)
    return int(requested)
