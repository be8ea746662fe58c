"""The decode step on the engine thread: one token for every running job, sampled under its
settings and format, and the finish of jobs that are done."""
from __future__ import annotations

import time

import torch

from service.engine.job import (
    Delta,
    Finished,
    FinishReason,
    Stage,
    Timing,
    TokenLogprob,
    Usage,
)
from service.engine.runs import Running, as_engine_error
from service.engine.sampling import logprobs_of


class Decoding:
    """NativeEngine's decode step and finish (a part of the engine, split off for size)."""

    def _step(self) -> None:
        self._grow()  # a block for each row whose next position starts one (may preempt)
        rows = self._running
        if not rows:
            return
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
            logits = self.decoder.decode_step(tokens, positions, [r.table for r in rows],
                                              max(r.length for r in rows))
        except torch.OutOfMemoryError:
            # The batch did not fit: the job holding the most cache leaves with
            # RESOURCE_EXHAUSTED, the others retry the step without it.
            victim = max(rows, key=lambda r: r.length)
            victim.finished = True
            self._end(victim.stream, as_engine_error(torch.OutOfMemoryError()))
            self._compact()
            self._free_cached_memory()
            return
        except Exception as exc:  # a bug in the step: every job in it fails, loudly
            for r in rows:
                r.finished = True
                self._end(r.stream, as_engine_error(exc))
            self._compact()
            return
        self.steps += 1
        with self._cv:  # one token each: its tenant's service (fair.py)
            for r in rows:
                self._waiting.charge(r.stream.job.tenant, 1)
        allowed: dict[int, torch.Tensor] = {}
        if masks is not None:
            masks.result()
            device_masks = bitmask.to(logits.device)
            allowed = {i: self.grammars.allowed(device_masks[k])
                       for k, i in enumerate(constrained)}
        # plain greedy rows (most traffic) take one argmax over the whole batch
        argmax = logits[:, : self.vocab_limit].argmax(-1).tolist()
        size = self.pool.block_size
        for i, r in enumerate(rows):
            r.tokens.append(r.last)  # now in its blocks at position r.length
            r.length += 1
            if r.length % size == 0:
                self._register(r)
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
                self._end(r.stream, as_engine_error(exc))
        self._compact()

    def _accept(self, r: Running, token: int, dist: torch.Tensor | None = None) -> None:
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

    def _finish(self, r: Running, reason: FinishReason) -> None:
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
                      cached_tiles=r.cached_tiles, cached_prompt_tokens=r.cached_tokens)
        timing = Timing(queue_ms=max(0.0, (r.t_admit - r.t_submit) * 1000 - p.preprocess_ms),
                        preprocess_ms=p.preprocess_ms,
                        prefill_ms=(r.t_first - r.t_admit) * 1000,
                        decode_ms=(end - r.t_first) * 1000)
        self._end(r.stream, Finished(reason, r.text.text, usage, timing, tuple(p.adjustments),
                                     r.text.stopped_by))
