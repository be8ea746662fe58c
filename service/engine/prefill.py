"""Prefill on the engine thread: admitted prompts packed and prefilled whole, or a long one
a chunk per iteration within the token budget; the first token of each."""
from __future__ import annotations

import time

import torch

from service.engine.detok import TextAssembler
from service.engine.interface import MIN_CHUNK
from service.engine.job import Stage
from service.engine.prepare import Prepared
from service.engine.runs import Chunked, Running, as_engine_error
from service.engine.sampling import Sampler
from service.engine.stream import JobStream
from service.engine.vision import VisionSteps

_LONG_PROMPT = 256  # tokens from which a prompt is prefilled alone, on every CPU thread
_PACK_TOKENS = 2048  # positions of short prompts prefilled together in one pass


class Prefilling:
    """NativeEngine's prefill steps (a part of the engine, split off for size: it uses the
    engine's model, decoder, vision encoder and batch)."""

    def _long(self, prep: Prepared) -> bool:
        """Prefilled in chunks, one per iteration (see EngineSettings.chunk_above)."""
        return 0 < self.settings.chunk_above < len(prep.ids)

    def _chunk_size(self) -> int:
        """What this iteration's token budget leaves for the long prompt after the running
        streams' decode rows."""
        return max(MIN_CHUNK, self.token_budget - len(self._running))

    def _prefill(self, admitted: list[tuple[JobStream, Prepared, float]]) -> None:
        now, now_ns = time.monotonic(), time.time_ns()
        live = []
        for stream, prep, t_submit in admitted:
            if stream.stages is not None:
                stream.stages.append(Stage("eagle.queue", prep.ready_ns, now_ns))
            if self._drop_if_gone(stream):
                continue
            if self._long(prep):  # vision and prefill step by step, between decode steps
                self._chunking = Chunked(self._new_run(stream, prep, t_submit, now, 0),
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
                self._end(stream, as_engine_error(exc))
            return
        done_ns = time.time_ns()
        for (stream, prep, _), (_, cached) in zip(live, vision):
            if stream.stages is not None and prep.groups:  # the admission's tiles, together
                stream.stages.append(Stage("eagle.vision", now_ns, done_ns, (
                    ("eagle.tiles", prep.image_tiles + prep.video_frames),
                    ("eagle.cached_tiles", cached), ("eagle.batch_jobs", len(live)))))
        ready: list[tuple[Running, torch.Tensor]] = []
        for (stream, prep, t_submit), (feats, cached) in zip(live, vision):
            try:
                if self.fault_hook:
                    self.fault_hook("prefill", prep)
                run = self._new_run(stream, prep, t_submit, now, cached)
                ready.append((run, self.lm.model.embed(run.seen, feats, self.image_token_id)))
            except Exception as exc:
                self._end(stream, as_engine_error(exc))
                if isinstance(exc, torch.OutOfMemoryError):
                    self._free_cached_memory()
        for pack, many in self._packs(ready):
            self._prefill_pack(pack, many)
        self._compact()

    def _new_run(self, stream: JobStream, prep: Prepared, t_submit: float, t_admit: float,
                 cached: int) -> Running:
        job = stream.job
        ids = torch.tensor(prep.ids, device=self.lm.device)
        return Running(stream, prep, Sampler(job.sampling, self.vocab_limit, self.lm.device),
                        TextAssembler(self.lm.tokenizer, job.sampling.stop), ids,
                        prep.constraint, length=len(prep.ids), cached_tiles=cached,
                        t_submit=t_submit, t_admit=t_admit)

    def _packs(self, ready: list[tuple[Running, torch.Tensor]]
               ) -> list[tuple[list[tuple[Running, torch.Tensor]], bool]]:
        """Short prompts share one pass (up to _PACK_TOKENS positions); a long prompt goes
        alone with every CPU thread. The split depends on each prompt's own length only, so
        in batch-invariant mode a prompt takes the same path alone or among others."""
        packs: list[tuple[list[tuple[Running, torch.Tensor]], bool]] = []
        short: list[tuple[Running, torch.Tensor]] = []
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

    def _prefill_pack(self, pack: list[tuple[Running, torch.Tensor]], many: bool) -> None:
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
                self._end(pack[0][0].stream, as_engine_error(torch.OutOfMemoryError()))
                return
            for item in pack:  # the pack did not fit: each prompt on its own
                self._prefill_pack([item], many)
            return
        except Exception as exc:
            for run, _ in pack:
                self._end(run.stream, as_engine_error(exc))
            return
        for j, (run, _) in enumerate(pack):  # row base + j, where its keys were written
            self._started(run, logits[j], start_ns, (("eagle.packed_prompts", len(pack)),))

    def _started(self, run: Running, logits: torch.Tensor, start_ns: int,
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
            self._end(run.stream, as_engine_error(exc))

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
            self._end(run.stream, as_engine_error(exc))
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
