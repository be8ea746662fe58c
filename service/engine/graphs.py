"""CUDA graphs of the decode step, per batch and key-length bucket, replayed each step."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

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
    """

    BATCHES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
    MIN_KEYS = 256

    def __init__(self, decoder: Decoder, max_rows: int, capture: bool = True,
                 max_keys: int = 131_072) -> None:
        self.dec = decoder
        self.capture = capture
        self.batches = sorted({b for b in self.BATCHES if b < max_rows} | {max_rows})
        device = decoder.device
        self.tokens = torch.zeros(max_rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_rows, dtype=torch.long, device=device)
        width = max(self.MIN_KEYS, 1 << (max_keys - 1).bit_length()) // decoder.block_size
        self.blocks = torch.zeros(max_rows, width, dtype=torch.long, device=device)
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
        if m > self.blocks.shape[1]:  # beyond what the graphs were sized for: run eagerly
            return self.dec.forward(tokens, positions, tables)
        self.tokens[:b].copy_(tokens)
        self.tokens[b:batch].zero_()
        self.positions[:b].copy_(positions)
        self.positions[b:batch].zero_()
        self.blocks[:batch, :m].copy_(self.dec._padded(tables + [[]] * (batch - b), m),
                                      non_blocking=True)
        args = (self.tokens[:batch], self.positions[:batch], self.blocks[:batch, :m])
        if not self.capture:
            return self.dec.static_decode(*args)[:b]
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
                self.dec.static_decode(*args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.dec.static_decode(*args)
        self.captured += 1
        return graph, logits
