"""Prefill on the engine thread: admitted prompts packed and prefilled whole, or a long one
a chunk per iteration within the token budget; the first token of each."""
from __future__ import annotations

import time

import torch

from service.engine.detok import TextAssembler
from service.engine.interface import MIN_CHUNK
from service.engine.job import Stage
from service.engine.prepare import Prepared
from service.engine.runs import Chunked, Queued, Running, as_engine_error
from service.engine.sampling import Sampler
from service.engine.vision import VisionSteps

_LONG_PROMPT = 256  # tokens from which a prompt is prefilled alone, on every CPU thread
_PACK_TOKENS = 2048  # positions of short prompts prefilled together in one pass


class Prefilling:
    """NativeEngine's prefill steps (a part of the engine, split off for size: it uses the
    engine's model, decoder, vision encoder and batch)."""

    def _long(self, prep: Prepared) -> bool:
        """Prefilled in chunks, one per iteration (see EngineSettings.chunk_above)."""
        return 0 < self.settings.chunk_above < len(prep.ids)

    def _chunk_size(self, offset: int, remaining: int) -> int:
        """This iteration's chunk of the long prompt: sized by its measured cost against the
        decode step's (pacing.py) when --max-itl-slowdown is on; else what the token budget
        leaves after the running streams' decode rows."""
        if self.pacing is not None:
            return self.pacing.next(offset, len(self._running), remaining)
        return min(remaining, max(MIN_CHUNK, self.token_budget - len(self._running)))

    def _prefill(self, admitted: list[Queued]) -> None:
        """Admitted jobs into their blocks: positions the prefix cache held are skipped, a
        long rest is prefilled in chunks between decode steps, short prompts are packed."""
        now, now_ns = time.monotonic(), time.time_ns()
        live: list[tuple[Running, int, bool]] = []  # (run, first position to compute, vision)
        for q in admitted:
            if q.stream.stages is not None and q.resume is None:
                q.stream.stages.append(Stage("eagle.queue", q.prep.ready_ns, now_ns))
            if self._drop_if_gone(q.stream):
                continue
            run = self._admitted(q, now)
            start = q.cached
            if start >= run.length:  # coming back with every block still cached
                self._started(run, None, now_ns)
                continue
            vision = any(t == self.image_token_id for t in q.prep.ids[start:])
            if self._long(q.prep) and run.length - start > self.settings.chunk_above:
                steps = VisionSteps(self.vision, q.prep) if vision else None
                self._chunking = Chunked(run, steps, start_ns=now_ns, done=start)
                continue
            live.append((run, start, vision))
        if not live:
            self._compact()
            return
        wanted = [run.prep for run, _, vision in live if vision]
        try:
            self._threads(bool(wanted))
            encoded = iter(self.vision.encode(wanted))
        except Exception as exc:  # fails every job of this admission, none of the running
            for run, _, _ in live:
                self._end(run.stream, as_engine_error(exc))
            return
        done_ns = time.time_ns()
        ready: list[tuple[Running, torch.Tensor, int]] = []
        for run, start, vision in live:
            prep = run.prep
            feats, cached = next(encoded) if vision else (None, prep.image_tiles
                                                          + prep.video_frames)
            if run.stream.stages is not None and prep.groups and not run.started:
                run.stream.stages.append(Stage("eagle.vision", now_ns, done_ns, (
                    ("eagle.tiles", prep.image_tiles + prep.video_frames),
                    ("eagle.cached_tiles", cached), ("eagle.batch_jobs", len(wanted)))))
            try:
                if self.fault_hook:
                    self.fault_hook("prefill", prep)
                if not run.started:
                    run.cached_tiles = cached
                ready.append((run, self._embeds(run, feats)[start:], start))
            except Exception as exc:
                self._end(run.stream, as_engine_error(exc))
                if isinstance(exc, torch.OutOfMemoryError):
                    self._free_cached_memory()
        for pack, many in self._packs(ready):
            self._prefill_pack(pack, many)
        self._compact()

    def _admitted(self, q: Queued, now: float) -> Running:
        """The job's running state with the blocks admission gave it: new, or the preempted
        job's own, to be computed again."""
        if q.resume is not None:
            run = q.resume
            run.table = q.table
            run.registered = min(run.registered, q.cached // self.pool.block_size)
            return run
        job, prep = q.stream.job, q.prep
        ids = torch.tensor(prep.ids, device=self.lm.device)
        return Running(q.stream, prep, Sampler(job.sampling, self.vocab_limit, self.lm.device),
                       TextAssembler(self.lm.tokenizer, job.sampling.stop), ids,
                       prep.constraint, length=len(prep.ids), t_submit=q.t_submit,
                       t_admit=now, table=q.table, tokens=list(prep.ids),
                       hashes=list(prep.hashes), cached_tokens=q.cached)

    def _embeds(self, run: Running, feats: torch.Tensor | None) -> torch.Tensor:
        """Input embeddings of the job's positions 0 .. length - 1 (length, hidden): the
        prompt with its vision features (`feats`; without them the media positions hold the
        placeholder's embedding, for callers that skip them), then the reply so far."""
        prompt = len(run.prep.ids)
        ids = torch.tensor(run.tokens[:run.length], device=self.lm.device)
        if feats is None:
            return self.lm.model.embed_tokens(ids)
        embeds = self.lm.model.embed(ids[:prompt], feats, self.image_token_id)
        if run.length > prompt:
            embeds = torch.cat([embeds, self.lm.model.embed_tokens(ids[prompt:])])
        return embeds

    def _packs(self, ready: list[tuple[Running, torch.Tensor, int]]
               ) -> list[tuple[list[tuple[Running, torch.Tensor, int]], bool]]:
        """Short prompts share one pass (up to _PACK_TOKENS positions); a long prompt, or
        the rest of one after a prefix-cache hit, goes alone (every CPU thread when long).
        The split depends on each prompt's own length and hit only, so in batch-invariant
        mode a prompt takes the same path alone or among others."""
        packs: list[tuple[list[tuple[Running, torch.Tensor, int]], bool]] = []
        short: list[tuple[Running, torch.Tensor, int]] = []
        for item in ready:
            n = item[1].shape[0]
            if n >= _LONG_PROMPT or item[2]:
                packs.append(([item], n >= _LONG_PROMPT))
                continue
            if short and sum(e.shape[0] for _, e, _ in short) + n > _PACK_TOKENS:
                packs.append((short, False))
                short = []
            short.append(item)
        if short:
            packs.append((short, False))
        return packs

    def _prefill_pack(self, pack: list[tuple[Running, torch.Tensor, int]], many: bool) -> None:
        self._threads(many)
        if len(pack) > 1 and not self.decoder.can_pack():
            for item in pack:
                self._prefill_pack([item], many)
            return
        start_ns = time.time_ns()
        try:
            if pack[0][2]:  # the rest of a prompt after its cached blocks
                run, embeds, start = pack[0]
                logits = self.decoder.prefill_chunk(embeds, run.table, start)[None]
            else:
                logits = self.decoder.prefill_many([(e, run.table) for run, e, _ in pack])
        except torch.OutOfMemoryError:
            self._free_cached_memory()
            if len(pack) == 1:  # this prompt alone does not fit: it fails, nothing else
                self._end(pack[0][0].stream, as_engine_error(torch.OutOfMemoryError()))
                return
            for item in pack:  # the pack did not fit: each prompt on its own
                self._prefill_pack([item], many)
            return
        except Exception as exc:
            for run, _, _ in pack:
                self._end(run.stream, as_engine_error(exc))
            return
        for j, (run, _, _) in enumerate(pack):
            self._started(run, logits[j], start_ns, (("eagle.packed_prompts", len(pack)),))

    def _started(self, run: Running, logits: torch.Tensor | None, start_ns: int,
                 attrs: tuple = ()) -> None:
        """A prompt is in its blocks: join the running batch and take the first token (a job
        coming back from preemption already has its next token)."""
        self._register(run)
        self._running.append(run)
        if run.started:
            return
        run.started = True
        run.t_first, run.first_ns = time.monotonic(), time.time_ns()
        if run.stream.stages is not None:
            run.stream.stages.append(Stage("eagle.prefill", start_ns, run.first_ns, (
                ("eagle.prompt_tokens", run.length),
                ("eagle.cached_prompt_tokens", run.cached_tokens), *attrs)))
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
            self._end(run.stream, as_engine_error(exc))

    def _prefill_next_chunk(self) -> None:
        """One chunk of the long prompt into its blocks; the last one joins the batch and
        takes the first token. Cancels and deadlines apply between chunks."""
        c = self._chunking
        run = c.run
        if self._drop_if_gone(run.stream):
            self._chunking = None
            return
        total = run.length
        a = c.done
        b = a + self._chunk_size(a, total - a)
        self._threads(True)
        try:
            if c.embeds is None:  # the vision first, a slice of tiles per step
                if c.vision is None:
                    c.embeds = self._embeds(run, None)
                elif c.vision.step():
                    if not run.started:
                        run.cached_tiles = c.vision.cached
                    if run.stream.stages is not None and not run.started:
                        run.stream.stages.append(Stage("eagle.vision", c.start_ns,
                                                       time.time_ns(), (
                            ("eagle.tiles", run.prep.image_tiles + run.prep.video_frames),
                            ("eagle.cached_tiles", c.vision.cached))))
                    c.embeds = self._embeds(run, c.vision.result())
                return
            began = time.perf_counter()
            logits = self.decoder.prefill_chunk(c.embeds[a:b], run.table, a)
            if self.pacing is not None:
                if logits.device.type == "cuda":  # the chunk's own time, not its launch's
                    torch.cuda.synchronize(logits.device)
                self._chunk_s = time.perf_counter() - began
                self.pacing.chunk_took(b - a, a, self._chunk_s)
        except Exception as exc:  # out of memory, or a bug: this job alone fails
            self._chunking = None
            self._end(run.stream, as_engine_error(exc))
            if isinstance(exc, torch.OutOfMemoryError):
                self._free_cached_memory()
            return
        c.done, c.chunks = b, c.chunks + 1
        self._register(run, b)
        if b < total:
            return
        self._chunking = None
        self._started(run, logits, c.start_ns, (("eagle.prefill_chunks", c.chunks),))
        self._compact()
