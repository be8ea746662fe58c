"""The engine thread: admits prepared jobs into the running batch and steps them together."""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from preprocess.errors import PreprocessError
from service.engine.detok import TextAssembler
from service.engine.grammar import Constraint, Grammars
from service.engine.graphs import DecodeGraphs
from service.engine.interface import MIN_CHUNK, TOKEN_BUDGETS, EngineInfo, EngineSettings
from service.engine.job import (
    Cancelled,
    ChatJob,
    DeadlineExceeded,
    Delta,
    EngineError,
    Finished,
    FinishReason,
    OutOfMemory,
    Stage,
    Timing,
    TokenLogprob,
    Trace,
    Unavailable,
    Usage,
    check_admission,
    timed,
)
from service.engine.llm import Decoder
from service.engine.loader import LoadedModel
from service.engine.prepare import Prepared, Preparer
from service.engine.processor_prompt import FRAME_LIMITS, make_style, resolve_style
from service.engine.sampling import Sampler, logprobs_of
from service.engine.stream import JobStream, Outbox, Sink
from service.engine.vision import VisionCache, VisionEncoder, VisionSteps
from service.runtime import trim_malloc

__all__ = ["EngineSettings", "NativeEngine"]  # EngineSettings re-exported for callers

log = logging.getLogger(__name__)
_IDLE_RELEASE_S = 2.0  # idle this long, the engine gives grown KV rows back
_LONG_PROMPT = 256  # tokens from which a prompt is prefilled alone, on every CPU thread
_PACK_TOKENS = 2048  # positions of short prompts prefilled together in one pass


@dataclass
class _Running:
    stream: JobStream
    prep: Prepared
    sampler: Sampler
    text: TextAssembler
    seen: torch.Tensor  # prompt + reply ids, for the repetition penalty
    constraint: Constraint | None = None  # the job's response_format
    length: int = 0  # tokens in the KV row
    last: int = 0  # the sampled token not yet in the KV row
    generated: int = 0
    cached_tiles: int = 0
    t_submit: float = 0.0
    t_admit: float = 0.0
    t_first: float = 0.0
    first_ns: int = 0  # wall clock of the first token, for the trace
    finished: bool = field(default=False)


@dataclass
class _Chunked:
    """A long prompt being prefilled a step at a time: its vision features a slice of tiles
    per step, then its prompt a chunk per step into the engine's spare KV row."""

    run: _Running
    vision: VisionSteps
    embeds: torch.Tensor | None = None  # (prompt, hidden), once the vision is done
    done: int = 0  # positions already in the KV row
    chunks: int = 0
    start_ns: int = 0


class NativeEngine:
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
            invariant = loaded.device.type == "cpu"
        # one row beyond the batch: where a chunked prefill builds its keys and values
        self.decoder = Decoder(loaded.model.language_model, settings.max_running + 1, invariant)
        self._spare_row = settings.max_running
        self.token_budget = settings.token_budget or TOKEN_BUDGETS.get(loaded.device.type,
                                                                       2048)
        self._chunking: _Chunked | None = None
        if loaded.device.type == "cuda" and not invariant and settings.cuda_graphs:
            self.decoder.graphs = DecodeGraphs(self.decoder, settings.max_running)
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
        self._waiting: deque[tuple[JobStream, Prepared, float]] = deque()
        self._running: list[_Running] = []
        self._streams: dict[int, JobStream] = {}  # keyed by id(stream): ids may repeat
        self._in_flight = 0
        self._accepting = True
        self._stop = False
        self.steps = 0
        self._trimmed_at = -1  # `steps` when memory was last given back
        # A test hook: called as hook("prefill", prepared) and hook("step", rows) before the
        # model runs, so tests can inject faults (out of memory, hangs) on CPU.
        self.fault_hook: Callable[[str, object], None] | None = None
        self._outbox = Outbox()  # engine-thread events, delivered once per loop iteration
        self.wedged = False
        self._busy_since: float | None = None
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
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
            check_admission(self.wedged, self._accepting, self._in_flight,
                            self.settings.max_running, self.settings.max_queue)
            self._in_flight += 1
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
                          self.prompt_style, self.max_video_frames, self.default_video_frames)

    def stats(self) -> dict[str, int]:
        with self._cv:
            cache = self.vision_cache
            return {"in_flight": self._in_flight, "waiting": len(self._waiting),
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
            fmt = stream.job.sampling.response_format
            if fmt is not None:
                with timed(stream.stages, "eagle.grammar", **{
                        "eagle.format": fmt.kind, "eagle.cached": self.grammars.cached(fmt)}):
                    prepared.constraint = self.grammars.constraint(fmt)
        except (PreprocessError, EngineError) as exc:
            self._end(stream, exc)
            return
        except Exception as exc:  # a bug in the media stage fails this job alone
            log.exception("preparing %s failed", stream.job.request_id)
            self._end(stream, EngineError(f"internal error while preparing media: {exc}"))
            return
        prepared.ready_ns = time.time_ns()
        with self._cv:
            self._waiting.append((stream, prepared, t_submit))
            self._cv.notify()

    # the engine thread --------------------------------------------------------------------
    @torch.inference_mode()
    def _loop(self) -> None:
        if self.lm.device.type == "cuda":  # the current device is per thread: `cuda:N`
            torch.cuda.set_device(self.lm.device)
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
                if admitted:
                    self._prefill(admitted)
                    self._outbox.flush()  # first tokens out now, not after the batch's step
                if self._chunking is not None:  # one chunk of a long prompt per iteration
                    self._prefill_next_chunk()
                    self._outbox.flush()
                self._reap()
                if self._running:
                    self._step()
            except Exception as exc:  # a bug in the loop itself: fail what runs, keep serving
                log.exception("engine loop iteration failed")
                for r in self._running:
                    self._end(r.stream, _as_engine_error(exc))
                self._running.clear()
                if self._chunking is not None:
                    self._end(self._chunking.run.stream, _as_engine_error(exc))
                    self._chunking = None
            finally:
                self._busy_since = None
                self._outbox.flush()

    def _has_work(self) -> bool:
        return bool(self._waiting or self._running or self._chunking or self._stop)

    def _long(self, prep: Prepared) -> bool:
        """Prefilled in chunks, one per iteration (see EngineSettings.chunk_above)."""
        return 0 < self.settings.chunk_above < len(prep.ids)

    def _chunk_size(self) -> int:
        """What this iteration's token budget leaves for the long prompt after the running
        streams' decode rows."""
        return max(MIN_CHUNK, self.token_budget - len(self._running))

    def _admit(self) -> list[tuple[JobStream, Prepared, float]]:
        """Pop waiting jobs that fit the batch-size cap and the token budget (lock held), in
        order; a long prompt waits while another is being prefilled in chunks."""
        out = []
        holding = [c.run for c in (self._chunking,) if c is not None]
        budget = sum(r.prep.job.sampling.max_new_tokens + len(r.prep.ids)
                     for r in self._running + holding)
        while (self._waiting and len(self._running) + len(holding) + len(out)
               < self.settings.max_running):
            stream, prep, t = self._waiting[0]
            if self._long(prep) and (holding or any(self._long(p) for _, p, _ in out)):
                break
            need = len(prep.ids) + prep.job.sampling.max_new_tokens
            if (self._running or holding or out) and \
                    budget + need > self.settings.max_batch_tokens:
                break
            self._waiting.popleft()
            budget += need
            out.append((stream, prep, t))
        return out

    def _threads(self, many: bool) -> None:
        if self._few_threads:
            torch.set_num_threads(self._cpu_threads if many else self._few_threads)

    def _prefill(self, admitted: list[tuple[JobStream, Prepared, float]]) -> None:
        now, now_ns = time.monotonic(), time.time_ns()
        live = []
        for stream, prep, t_submit in admitted:
            if stream.stages is not None:
                stream.stages.append(Stage("eagle.queue", prep.ready_ns, now_ns))
            if self._drop_if_gone(stream):
                continue
            if self._long(prep):  # vision and prefill step by step, between decode steps
                self._chunking = _Chunked(self._new_run(stream, prep, t_submit, now, 0),
                                          VisionSteps(self.vision, prep), start_ns=now_ns)
                continue
            live.append((stream, prep, t_submit))
        if not live:
            return
        try:
            self._threads(any(p.image_tiles or p.video_frames for _, p, _ in live))
            vision = self.vision.encode([p for _, p, _ in live])
        except Exception as exc:  # fails every job of this admission, none of the running
            for stream, _, _ in live:
                self._end(stream, _as_engine_error(exc))
            return
        done_ns = time.time_ns()
        for (stream, prep, _), (_, cached) in zip(live, vision):
            if stream.stages is not None and prep.groups:  # the admission's tiles, together
                stream.stages.append(Stage("eagle.vision", now_ns, done_ns, (
                    ("eagle.tiles", prep.image_tiles + prep.video_frames),
                    ("eagle.cached_tiles", cached), ("eagle.batch_jobs", len(live)))))
        ready: list[tuple[_Running, torch.Tensor]] = []
        for (stream, prep, t_submit), (feats, cached) in zip(live, vision):
            try:
                if self.fault_hook:
                    self.fault_hook("prefill", prep)
                run = self._new_run(stream, prep, t_submit, now, cached)
                ready.append((run, self.lm.model.embed(run.seen, feats, self.image_token_id)))
            except Exception as exc:
                self._end(stream, _as_engine_error(exc))
                if isinstance(exc, torch.OutOfMemoryError):
                    self._free_cached_memory()
        for pack, many in self._packs(ready):
            self._prefill_pack(pack, many)
        self._compact()

    def _new_run(self, stream: JobStream, prep: Prepared, t_submit: float, t_admit: float,
                 cached: int) -> _Running:
        job = stream.job
        ids = torch.tensor(prep.ids, device=self.lm.device)
        return _Running(stream, prep, Sampler(job.sampling, self.vocab_limit, self.lm.device),
                        TextAssembler(self.lm.tokenizer, job.sampling.stop), ids,
                        prep.constraint, length=len(prep.ids), cached_tiles=cached,
                        t_submit=t_submit, t_admit=t_admit)

    def _packs(self, ready: list[tuple[_Running, torch.Tensor]]
               ) -> list[tuple[list[tuple[_Running, torch.Tensor]], bool]]:
        """Short prompts share one pass (up to _PACK_TOKENS positions); a long prompt goes
        alone with every CPU thread. The split depends on each prompt's own length only, so
        in batch-invariant mode a prompt takes the same path alone or among others."""
        packs: list[tuple[list[tuple[_Running, torch.Tensor]], bool]] = []
        short: list[tuple[_Running, torch.Tensor]] = []
        for item in ready:
            n = item[0].length
            if n >= _LONG_PROMPT:
                packs.append(([item], True))
                continue
            if short and sum(r.length for r, _ in short) + n > _PACK_TOKENS:
                packs.append((short, False))
                short = []
            short.append(item)
        if short:
            packs.append((short, False))
        return packs

    def _prefill_pack(self, pack: list[tuple[_Running, torch.Tensor]], many: bool) -> None:
        self._threads(many)
        if len(pack) > 1 and not self.decoder.can_pack():
            for item in pack:
                self._prefill_pack([item], many)
            return
        base = len(self._running)
        start_ns = time.time_ns()
        try:
            logits = self.decoder.prefill_many([(e, base + j) for j, (_, e) in enumerate(pack)])
        except torch.OutOfMemoryError:
            self._free_cached_memory()
            if len(pack) == 1:  # this prompt alone does not fit: it fails, nothing else
                self._end(pack[0][0].stream, _as_engine_error(torch.OutOfMemoryError()))
                return
            for item in pack:  # the pack did not fit: each prompt on its own
                self._prefill_pack([item], many)
            return
        except Exception as exc:
            for run, _ in pack:
                self._end(run.stream, _as_engine_error(exc))
            return
        for j, (run, _) in enumerate(pack):  # row base + j, where its keys were written
            self._started(run, logits[j], start_ns, (("eagle.packed_prompts", len(pack)),))

    def _started(self, run: _Running, logits: torch.Tensor, start_ns: int,
                 attrs: tuple = ()) -> None:
        """A prompt is in its KV row: join the running batch, take the first token."""
        run.t_first, run.first_ns = time.monotonic(), time.time_ns()
        if run.stream.stages is not None:
            run.stream.stages.append(Stage("eagle.prefill", start_ns, run.first_ns, (
                ("eagle.prompt_tokens", run.length), *attrs)))
        self._running.append(run)
        try:
            allowed = None
            if run.constraint is not None:
                bitmask = self.grammars.new_bitmask(1)
                self.grammars.fill([run.constraint], bitmask)
                run.constraint.check()
                allowed = self.grammars.allowed(bitmask[0].to(logits.device))
            self._accept(run, *run.sampler(logits, run.seen, allowed))
        except Exception as exc:
            run.finished = True
            self._end(run.stream, _as_engine_error(exc))

    def _prefill_next_chunk(self) -> None:
        """One chunk of the long prompt into the spare row; the last one moves the row into
        the batch and takes the first token. Cancels and deadlines apply between chunks."""
        c = self._chunking
        run = c.run
        if self._drop_if_gone(run.stream):
            self._chunking = None
            return
        total = len(run.prep.ids)
        a, b = c.done, min(c.done + self._chunk_size(), total)
        self._threads(True)
        try:
            if c.embeds is None:  # the vision first, a slice of tiles per step
                if c.vision.step():
                    run.cached_tiles = c.vision.cached
                    if run.stream.stages is not None:
                        run.stream.stages.append(Stage("eagle.vision", c.start_ns,
                                                       time.time_ns(), (
                            ("eagle.tiles", run.prep.image_tiles + run.prep.video_frames),
                            ("eagle.cached_tiles", c.vision.cached))))
                    c.embeds = self.lm.model.embed(run.seen, c.vision.result(),
                                                   self.image_token_id)
                return
            logits = self.decoder.prefill_chunk(c.embeds[a:b], self._spare_row, a)
        except Exception as exc:  # out of memory, or a bug: this job alone fails
            self._chunking = None
            self._end(run.stream, _as_engine_error(exc))
            if isinstance(exc, torch.OutOfMemoryError):
                self._free_cached_memory()
            return
        c.done, c.chunks = b, c.chunks + 1
        if b < total:
            return
        self._chunking = None
        run.length = total
        self.decoder.slots.move(self._spare_row, len(self._running), total)
        self._started(run, logits, c.start_ns, (("eagle.prefill_chunks", c.chunks),))
        self._compact()

    def _step(self) -> None:
        rows = self._running
        self._threads(False)
        tokens = torch.tensor([r.last for r in rows], device=self.lm.device)
        positions = torch.tensor([r.length for r in rows], device=self.lm.device)
        constrained = [i for i, r in enumerate(rows) if r.constraint is not None]
        masks = None
        if constrained:  # computed on another thread while the model runs
            bitmask = self.grammars.new_bitmask(len(constrained))
            masks = self._masks.submit(self.grammars.fill,
                                       [rows[i].constraint for i in constrained], bitmask)
        try:
            if self.fault_hook:
                self.fault_hook("step", rows)
            logits = self.decoder.decode_step(tokens, positions, max(r.length for r in rows))
        except torch.OutOfMemoryError:
            # The batch did not fit: the job holding the most cache leaves with
            # RESOURCE_EXHAUSTED, the others retry the step without it.
            victim = max(rows, key=lambda r: r.length)
            victim.finished = True
            self._end(victim.stream, _as_engine_error(torch.OutOfMemoryError()))
            self._compact()
            self._free_cached_memory()
            return
        except Exception as exc:  # a bug in the step: every job in it fails, loudly
            for r in rows:
                r.finished = True
                self._end(r.stream, _as_engine_error(exc))
            self._compact()
            return
        self.steps += 1
        allowed: dict[int, torch.Tensor] = {}
        if masks is not None:
            masks.result()
            device_masks = bitmask.to(logits.device)
            allowed = {i: self.grammars.allowed(device_masks[k])
                       for k, i in enumerate(constrained)}
        # plain greedy rows (most traffic) take one argmax over the whole batch
        argmax = logits[:, : self.vocab_limit].argmax(-1).tolist()
        for i, r in enumerate(rows):
            r.length += 1
            try:
                if r.sampler.plain_greedy:
                    self._accept(r, argmax[i])
                    continue
                if r.sampler.params.repetition_penalty != 1.0:
                    r.seen = torch.cat([r.seen, tokens[i:i + 1]])
                if r.constraint is not None:
                    r.constraint.check()
                self._accept(r, *r.sampler(logits[i], r.seen, allowed.get(i)))
            except Exception as exc:
                r.finished = True
                self._end(r.stream, _as_engine_error(exc))
        self._compact()

    def _accept(self, r: _Running, token: int, dist: torch.Tensor | None = None) -> None:
        """Take one sampled token (`dist`: the distribution it came from): emit text and its
        logprob, or finish on a stop token, a stop string, the end of the format or a limit."""
        params = r.prep.job.sampling
        if token in self.stop_ids and not (params.ignore_eos and r.constraint is None):
            self._finish(r, FinishReason.STOP)
            return
        r.generated += 1
        r.last = token
        logprobs = (self._logprob(token, dist, params.top_logprobs),) if params.logprobs else ()
        if r.constraint is not None:
            r.constraint.accept(token)
        delta = r.text.add(token)
        if delta or logprobs:
            r.stream.push(Delta(delta, logprobs), self._outbox)
        if r.text.stopped:
            self._finish(r, FinishReason.STOP_SEQUENCE)
        elif r.constraint is not None and r.constraint.complete:
            self._finish(r, FinishReason.STOP)
        elif (r.generated >= r.prep.job.sampling.max_new_tokens
              or r.length + 1 >= self.context_length):
            self._finish(r, FinishReason.LENGTH)

    def _logprob(self, token: int, dist: torch.Tensor, top: int) -> TokenLogprob:
        value, best = logprobs_of(dist, token, top)
        tb = self.grammars.token_bytes
        return TokenLogprob(token, tb(token), value, tuple((i, tb(i), v) for i, v in best))

    def _finish(self, r: _Running, reason: FinishReason) -> None:
        r.finished = True
        tail = r.text.finish()
        if tail:
            r.stream.push(Delta(tail), self._outbox)
        if r.text.stopped:  # found when the last held-back text was flushed
            reason = FinishReason.STOP_SEQUENCE
        end = time.monotonic()
        p = r.prep
        if r.stream.stages is not None:
            r.stream.stages.append(Stage("eagle.decode", r.first_ns, time.time_ns(), (
                ("eagle.completion_tokens", r.generated), ("eagle.finish_reason", reason.value))))
        usage = Usage(prompt_tokens=len(p.ids), completion_tokens=r.generated,
                      vision_tokens=self.lm.cfg.patch_tokens * (p.image_tiles + p.video_frames),
                      image_tiles=p.image_tiles, video_frames=p.video_frames,
                      cached_tiles=r.cached_tiles)
        timing = Timing(queue_ms=max(0.0, (r.t_admit - r.t_submit) * 1000 - p.preprocess_ms),
                        preprocess_ms=p.preprocess_ms,
                        prefill_ms=(r.t_first - r.t_admit) * 1000,
                        decode_ms=(end - r.t_first) * 1000)
        self._end(r.stream, Finished(reason, r.text.text, usage, timing, tuple(p.adjustments),
                                     r.text.stopped_by))

    def _watch(self) -> None:
        """The watchdog: a step over its limit wedges the engine for good (see settings)."""
        limit = self.settings.step_timeout_s
        while not self._stop and not self.wedged:
            time.sleep(min(0.5, limit / 4))
            since = self._busy_since
            if since is not None and time.monotonic() - since > limit:
                self._wedge(limit)

    def _wedge(self, limit: float) -> None:
        log.error("an engine step has run for over %.1f s: the device is wedged", limit)
        with self._cv:
            self.wedged = True
            self._accepting = False
            streams = list(self._streams.values())
        for stream in streams:
            self._end(stream, Unavailable(
                f"the model has been stuck for over {limit:g} s; this replica is restarting, "
                f"retry on another"))

    def _release_memory(self) -> None:
        """Idle: give the KV rows' growth and the allocator's free pages back (once per idle
        spell: the media threads' image buffers are freed too, and glibc keeps them)."""
        if self.decoder.slots.capacity > self.decoder.slots.initial:
            self.decoder.slots.reset()
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
        """Remove finished rows, moving the last row into each gap so rows stay 0..B-1."""
        gone = [i for i, r in enumerate(self._running) if r.finished]
        for i in reversed(gone):
            last = len(self._running) - 1
            if i != last:
                self.decoder.slots.move(last, i, self._running[last].length)
                self._running[i] = self._running[last]
            self._running.pop()

    def _drop_if_gone(self, stream: JobStream) -> bool:
        if stream.cancelled.is_set():
            self._end(stream, Cancelled("cancelled by the client"))
            return True
        if stream.job.expired():
            self._end(stream, DeadlineExceeded("the deadline passed while the request was queued"))
            return True
        return False

    def _end(self, stream: JobStream, outcome: object) -> None:
        """The single place a job ends: exactly one final event, and its slot is released.

        On the engine thread the final event joins the step's outbox (after the job's last
        deltas); from other threads it is delivered at once.
        """
        with self._cv:
            if self._streams.pop(id(stream), None) is None:
                return
            self._in_flight -= 1
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


def _as_engine_error(exc: BaseException) -> EngineError:
    if isinstance(exc, EngineError):
        return exc
    if isinstance(exc, torch.OutOfMemoryError):
        return OutOfMemory("the model ran out of memory for this request; send fewer or smaller "
                           "images, fewer frames, or a lower max_new_tokens")
    log.error("engine step failed", exc_info=exc)
    return EngineError(f"internal error in the engine: {type(exc).__name__}")
