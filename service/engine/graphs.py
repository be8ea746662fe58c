"""CUDA graphs of the decode step, per batch and key-length bucket, replayed each step."""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch
import torch._dynamo
from torch.fx.experimental import _config as fx_config

if TYPE_CHECKING:
    from service.engine.llm import Decoder

log = logging.getLogger(__name__)


class DecodeGraphs:
    """Decode steps replayed from CUDA graphs: one launch per step instead of a few hundred
    kernel launches from Python, which is where single-stream decode loses its time on a GPU.

    A graph is captured, on first use, per (batch bucket, key-length bucket); a step pads
    its rows up to the bucket (padding rows write into the null block) and its block tables
    up to the power-of-two key length above its longest row, so every row of a replayed step
    reads that many keys. The pool never moves, so graphs stay valid for the engine's life.
    `capture=False` runs the same static steps eagerly: how the padding and buckets are
    tested on a machine without CUDA.

    `compile=True` captures the step as compiled by `torch.compile` (Inductor) instead of
    op by op. A replayed graph still runs every kernel it holds, and the first H200 profile
    (bench/gpu-runs/2026-12-04-h200-run4) found one stream's step at 2.8 ms of device time
    for about 40 small kernels per layer, most of them elementwise (RMSNorm's seven, the
    rotary's five, the residual adds), against 0.2 ms to read the weights; compiled, each
    such chain is one kernel. One compile serves every bucket (dynamic shapes; batch 1 is
    specialised, so two in all), made by `warm()` before the server reports SERVING. If
    compiling fails the step is captured uncompiled, as before.
    """

    BATCHES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
    MIN_KEYS = 256

    def __init__(self, decoder: Decoder, max_rows: int, capture: bool = True,
                 max_keys: int = 131_072, compile: bool = False) -> None:
        self.dec = decoder
        self.capture = capture
        self.max_rows = max_rows
        # the step's function: compiled lazily (on the first step or warm()), eager if that fails
        self._body = None
        self.compile = compile
        self.compile_error = ""
        self.warm_s = 0.0  # what warm() took (the compiles)
        self.warmed = False  # after warm(): no further compiles (see _step)
        self.uncompiled_steps = 0  # steps that would have compiled again, run uncompiled
        self.batches = sorted({b for b in self.BATCHES if b < max_rows} | {max_rows})
        device = decoder.device
        self.tokens = torch.zeros(max_rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_rows, dtype=torch.long, device=device)
        width = max(self.MIN_KEYS, 1 << (max_keys - 1).bit_length()) // decoder.block_size
        # One column more than any step uses: a step's table view (rows, m) is then never
        # contiguous, even at the widest bucket (m == width), so the compiled step sees the
        # same layout at every key length. The sixth H200 run: a 31K-token row reached the
        # widest bucket, its view became contiguous, and the guard on that recompiled the
        # step (a minute) in the middle of serving.
        self.blocks = torch.zeros(max_rows, width + 1, dtype=torch.long, device=device)
        self.width = width
        self._graphs: dict[tuple[int, int], tuple[object, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self.captured = 0
        self.replayed = 0

    def shapes(self, rows: int, longest: int) -> tuple[int, int]:
        """(batch bucket, key length) a step of `rows` rows up to position `longest` runs at."""
        batch = next(b for b in self.batches if b >= rows)
        return batch, max(self.MIN_KEYS, 1 << longest.bit_length())

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, tables: list[list[int]],
                 longest: int) -> torch.Tensor:
        b = tokens.shape[0]
        batch, t = self.shapes(b, longest)
        m = t // self.dec.block_size
        if m > self.width:  # beyond what the graphs were sized for: run eagerly
            return self.dec.forward(tokens, positions, tables)
        self.tokens[:b].copy_(tokens)
        self.tokens[b:batch].zero_()
        self.positions[:b].copy_(positions)
        self.positions[b:batch].zero_()
        self.blocks[:batch, :m].copy_(self.dec._padded(tables + [[]] * (batch - b), m),
                                      non_blocking=True)
        args = (self.tokens[:batch], self.positions[:batch], self.blocks[:batch, :m])
        if not self.capture:
            return self._step(*args)[:b]
        entry = self._graphs.get((batch, t))
        if entry is None:
            try:
                entry = self._graphs[(batch, t)] = self._capture(args)
            except torch.OutOfMemoryError:
                raise
            except Exception:  # a step this build cannot capture: serve eagerly from now on
                log.exception("capturing the decode step as a CUDA graph failed; decoding "
                              "without graphs")
                self.dec.graphs = None
                return self.dec.forward(tokens, positions, tables)
        graph, logits = entry
        graph.replay()
        self.replayed += 1
        return logits[:b]

    def _capture(self, args: tuple[torch.Tensor, ...]) -> tuple[object, torch.Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture, as CUDA graphs require
            for _ in range(2):
                self._step(*args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._step(*args)
        self.captured += 1
        return graph, logits

    @torch.inference_mode()
    def _step(self, *args: torch.Tensor) -> torch.Tensor:
        """The static step, compiled when asked (compiled on first use; a compile that fails
        is logged once and the eager step serves from then on)."""
        if self.compile and self._body is None:
            self._body = torch.compile(self.dec.static_body, fullgraph=True)
        if self.compile and not self.compile_error:
            # The bucket's sizes are symbols (batch from 2 up, the key blocks always), the
            # weights' fixed; no "duck" sizing, which would equate a batch of 16 with 16 key
            # blocks (or a weight's width) and recompile when they part.
            tokens, positions, blocks = args
            if blocks.shape[0] > 1:
                for t in args:
                    torch._dynamo.maybe_mark_dynamic(t, 0)
            torch._dynamo.maybe_mark_dynamic(blocks, 1)
            # Once warm, a step that would compile again (a layout or size the guards did not
            # foresee) runs uncompiled instead: a compile takes about a minute on the GPU
            # machine, every running stream would wait on it and the watchdog could take
            # it for a wedged device.
            stance = "fail_on_recompile" if self.warmed else "default"
            try:
                with fx_config.patch(use_duck_shape=False), torch.compiler.set_stance(stance):
                    out = self._body(*args)
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - an Inductor failure: run uncompiled
                if not self.warmed:
                    self.compile_error = f"{type(exc).__name__}: {exc}"[:500]
                    log.exception("compiling the decode step failed; running it uncompiled")
                else:
                    self.uncompiled_steps += 1
                    if self.uncompiled_steps == 1:
                        log.warning("a decode step would have compiled again while serving; "
                                    "it runs uncompiled (%s)", str(exc).splitlines()[0][:300])
            else:
                return out
        return self.dec.static_body(*args)

    def warm(self) -> float:
        """Compile the step now (batch 1 and a larger batch, over the null block: nothing is
        read or written that a job owns) so no request waits on it; seconds taken."""
        if not self.compile:
            return 0.0
        start = time.perf_counter()
        for batch in sorted({1, min(2, self.max_rows)}):
            m = self.MIN_KEYS // self.dec.block_size
            args = (self.tokens[:batch].zero_(), self.positions[:batch].zero_(),
                    self.blocks[:batch, :m].zero_())
            self._step(*args)
            if self.compile_error:
                break
        if self.dec.device.type == "cuda":
            torch.cuda.synchronize(self.dec.device)
        self.warm_s = time.perf_counter() - start
        self.warmed = True
        return self.warm_s
