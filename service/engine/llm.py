"""Prefill and batched decode over the Qwen2 layers of transformers, with our own KV cache.

The layers' modules (projections, norms, MLP, rotary) are transformers' own; what is ours
is the cache: keys and values in fixed-size blocks of one pool (`kv.BlockPool`), each job
with a block table, so a job holds memory for its own tokens only. A pass writes each new
token's keys into its job's blocks and gathers, per group of rows of similar length, the
blocks each row attends over: a row reads its own tokens (rounded up to its key bucket),
never the longest row's.

Batch-invariant mode (the default on CPU) makes a job's tokens independent of what it is
batched with: every matrix product gets at least 8 rows (BLAS picks its kernel by shape, and
a different kernel rounds differently; see `_linear`) and attention runs over a key length
that depends on the row alone (`key_bucket`), rows of one bucket together. It costs a little
speed and buys exact reproducibility under greedy decoding.

One pass (`forward`) serves both phases: running rows with one new token each, and prompts
packed after them. CUDA graphs of the decode step are `graphs.DecodeGraphs`.

Decode attention has two backends (`ATTENTION`, the `--attention` setting): `gather` copies
each group's blocks into a contiguous tensor and runs SDPA over it; `flex` runs PyTorch's
FlexAttention over the pool itself, each row's block table given as the block mask's key
blocks, so nothing is copied and a row's keys are read once, in place (compiled on CUDA;
on a CPU it runs unfused, over the whole pool: for checking it, not for serving).
"""
from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from service.engine.kv import NULL_BLOCK, BlockPool, blocks_for

_BLOCK = 8
# A chunk after cached positions attends under an additive (n, offset + n) mask up to this
# many elements (64 MB in float32); beyond it, on CPU, `Decoder._attend_after`.
_MASK_LIMIT = 1 << 24
_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
ATTENTION = ("gather", "flex")  # decode attention backends; see the module's docstring
Table = list[int]  # a job's KV blocks in position order


@dataclass
class _Group:
    """Rows whose attention runs over the same key length `t` (batch-invariant mode)."""

    t: int
    rows: slice | torch.Tensor  # a slice when the rows are consecutive
    mask: torch.Tensor  # (rows, 1, 1, t) additive: each row sees its own positions only
    blocks: torch.Tensor  # (rows, t / block size): each row's table, padded with the null block


@dataclass
class _StepPlan:
    """What every layer of one decode step shares: where each row's new key goes, and the
    groups of rows that attend together (or, row by row, each row's blocks)."""

    positions: list[int]
    groups: list[_Group]
    rows: int = 0  # running rows in the pass (0..rows-1)
    to_block: torch.Tensor | None = None  # (rows,) the block of each row's new token
    to_slot: torch.Tensor | None = None  # (rows,) its place in that block
    tables: list[torch.Tensor] | None = None  # each row's own key slots (row-by-row mode)
    flex: object | None = None  # the FlexAttention BlockMask of the rows' tables (`flex`)


_IDLE = _StepPlan([], [])  # no step under way


@dataclass
class _Span:
    """A prompt (or a chunk of one) in a pass: its rows of the pass, where its keys go and,
    for a chunk after earlier positions, the blocks it attends over."""

    start: int
    n: int
    offset: int  # its first position: above 0 for a chunk after positions already cached
    to_block: torch.Tensor  # (n,)
    to_slot: torch.Tensor  # (n,)
    blocks: torch.Tensor | None  # (blocks over offset + n,) when offset > 0


def key_bucket(length: int) -> int:
    """The key length a row of `length` positions attends over in batch-invariant mode: a
    function of its own length only, rounded up to a grain of 1/16 of the power of two above
    it (at least 64), so rows of similar length share one attention call and the padding
    stays under an eighth of the row (or under 64 keys)."""
    grain = max(64, 1 << max(0, length.bit_length() - 4))
    return -(-length // grain) * grain


def kv_bytes_per_token(causal_lm: torch.nn.Module) -> int:
    """Bytes of keys and values one token holds across the model's layers."""
    cfg = causal_lm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    size = next(causal_lm.parameters()).element_size()
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * size


def _plain(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight, bias)


def _fuse(modules: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for linears that read the same input, so a pass makes one matrix
    product instead of several. The modules' own parameters become views into it: no copy
    stays behind, and the model's state dict is unchanged."""
    out = []
    for name in ("weight", "bias"):
        parts = [getattr(m, name) for m in modules]
        if parts[0] is None:
            out.append(None)
            continue
        fused = torch.cat([p.detach() for p in parts])
        at = 0
        for m, p in zip(modules, parts):
            setattr(m, name, torch.nn.Parameter(fused[at:at + p.shape[0]], requires_grad=False))
            at += p.shape[0]
        out.append(fused)
    return out[0], out[1]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (the Qwen2/Llama form) on (b, heads, n, d) with cos/sin of
    (b, n, d)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + turned * sin


def _norm(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm: one fused op in float32 (bit for bit what transformers' module computes
    there); the module itself for other dtypes, which it upcasts in its own way."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), module.weight, module.variance_epsilon)
    return module(x)


class Decoder:
    """Runs a causal LM from transformers (Qwen2 layout) as prefill + batched decode steps."""

    def __init__(self, causal_lm: torch.nn.Module, max_rows: int,
                 batch_invariant: bool = False, blocks: int = 0, block_size: int = 16,
                 attention: str = "gather") -> None:
        self.lm = causal_lm
        self.invariant = batch_invariant
        self.body = causal_lm.model
        cfg = causal_lm.config
        kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
        if kinds != {"full_attention"}:
            raise ValueError(f"only full-attention layers are supported, the config has {kinds}")
        self.layers = list(self.body.layers)
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.scale = attn.scaling
        param = next(causal_lm.parameters())
        if block_size < 1 or 64 % block_size:
            raise ValueError(f"the KV block size must divide 64 (key buckets are multiples "
                             f"of 64), got {block_size}")
        self.block_size = block_size
        # blocks 0: room for 4,096 tokens per row (tests and tools; the engine sizes its pool)
        self.pool = BlockPool(len(self.layers), blocks or max_rows * blocks_for(4096, block_size),
                              block_size, self.kv_heads, self.head_dim, param.dtype,
                              param.device)
        self.device = param.device
        self.dtype = param.dtype
        if attention not in ATTENTION:
            raise ValueError(f"--attention {attention!r}: use {' or '.join(ATTENTION)}")
        if attention == "flex" and batch_invariant:
            raise ValueError("--attention flex is not batch-invariant (its kernel splits the "
                             "work by batch); the engine turns that mode off for it")
        self.attention = attention
        if attention == "flex":
            from torch.nn.attention.flex_attention import flex_attention
            self._flex_attention = (torch.compile(flex_attention)
                                    if self.device.type == "cuda" else flex_attention)
            # The compiled kernel's key tile must divide a pool block. The decoding kernel
            # shrinks its tile to the block; the general one, which torch picks once the batch
            # size is symbolic (a second batch size recompiles with a dynamic batch), keeps 64
            # or 128 keys on torch 2.11 and refuses a 16-token block (seen on an H200):
            # pinned to the block here for both.
            self._flex_options = ({"BLOCK_N": self.pool.block_size}
                                  if self.device.type == "cuda" else None)
            # per row, as wide as the pool (a compiled kernel requires it of the mask): the
            # logical index of every pool block (-1: not the row's; what the mask reads),
            # and the block mask's key blocks, its table (full) and its last (partial)
            width = self.pool.k[0].shape[1]
            self._logical = torch.full((max_rows, width), -1, dtype=torch.int32,
                                       device=self.device)
            self._full_ids = torch.zeros_like(self._logical)
            self._last_ids = torch.zeros_like(self._logical)
        self._qkv = [_fuse([ly.self_attn.q_proj, ly.self_attn.k_proj, ly.self_attn.v_proj])
                     for ly in self.layers]
        self._gate_up = [_fuse([ly.mlp.gate_proj, ly.mlp.up_proj])[0] for ly in self.layers]
        self._step = _StepPlan([], [])
        self._spans: list[_Span] = []  # the prompts packed after the running rows
        self._lin = _plain  # the projections' function for the pass being run
        self._chunk_mask: torch.Tensor | None = None
        # graphs.DecodeGraphs, set by the engine on CUDA:
        # (tokens, positions, tables, longest) -> logits
        self.graphs: Callable[[torch.Tensor, torch.Tensor, list[Table], int],
                              torch.Tensor] | None = None

    def _attend(self, layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                i: int) -> torch.Tensor:
        """One layer over the pass's rows (1, L, hidden): the running rows first, each one new
        token, then the packed prompts. Projections and MLP see every row at once."""
        attn, mlp = layer.self_attn, layer.mlp
        length = x.shape[1]
        lin = self._lin
        heads, kv, d = self.heads, self.kv_heads, self.head_dim
        h = _norm(layer.input_layernorm, x)
        qkv = lin(*self._qkv[i], h).view(1, length, heads + 2 * kv, d).transpose(1, 2)
        qk = _rotate(qkv[:, :heads + kv], cos, sin)  # (1, heads+kv, L, d): q and k at once
        q, k, v = qk[:, :heads], qk[:, heads:], qkv[:, heads + kv:]
        outs = []
        b = self._step.rows
        if b:  # the running rows: write their new keys into their blocks, attend over them
            at = (slice(None), self._step.to_block, self._step.to_slot)
            self.pool.k[i][at] = k[0, :, :b]  # (kv, b, d)
            self.pool.v[i][at] = v[0, :, :b]
            qd = q[0, :, :b].transpose(0, 1).unsqueeze(2)  # (b, heads, 1, d)
            if self._step.flex is not None:
                od = self._attend_flex(qd, i)
            elif self._step.tables is not None:
                od = self._attend_rows(qd, i)
            else:
                od = self._attend_groups(qd, i)
            outs.append(od.reshape(b, heads * d))
        if self._spans:
            outs.append(self._attend_prompts(q, k, v, i).transpose(1, 2)
                        .reshape(length - b, heads * d))
        o = (outs[0] if len(outs) == 1 else torch.cat(outs))[None]  # (1, L, hidden)
        x = x + lin(attn.o_proj.weight, attn.o_proj.bias, o)
        h = _norm(layer.post_attention_layernorm, x)
        gate, up = lin(self._gate_up[i], None, h).chunk(2, dim=-1)  # Qwen2/Llama MLP
        return x + lin(mlp.down_proj.weight, mlp.down_proj.bias, mlp.act_fn(gate) * up)

    def _gather(self, store: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """Keys (or values) of the blocks `blocks` (g, m), each row's positions in order:
        (g, kv_heads, m * block size, head_dim), contiguous when g is 1 (index_select: on
        a CPU five times faster than indexing with the table)."""
        g, m = blocks.shape
        x = store.index_select(1, blocks.reshape(-1))  # (kv_heads, g * m, block, d)
        return x.view(self.kv_heads, g, m * self.block_size, self.head_dim).transpose(0, 1)

    def _attend_prompts(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        i: int) -> torch.Tensor:
        """Causal attention within each packed prompt, whose keys also go to its blocks. A
        chunk after earlier positions (offset > 0) attends over them too, from its blocks."""
        outs = []
        gqa = self.heads != self.kv_heads
        for sp in self._spans:
            qj, kj, vj = (t[:, :, sp.start:sp.start + sp.n] for t in (q, k, v))
            at = (slice(None), sp.to_block, sp.to_slot)
            self.pool.k[i][at] = kj[0]  # (kv, n, d)
            self.pool.v[i][at] = vj[0]
            if sp.offset and self._chunk_mask is None:  # too long for a mask (CPU)
                outs.append(self._attend_after(qj, kj, vj, sp, i))
                continue
            if sp.offset:
                end = sp.offset + sp.n
                keys = self._gather(self.pool.k[i], sp.blocks[None])[:, :, :end].contiguous()
                values = self._gather(self.pool.v[i], sp.blocks[None])[:, :, :end].contiguous()
                outs.append(F.scaled_dot_product_attention(
                    qj.contiguous(), keys, values, attn_mask=self._chunk_mask, scale=self.scale,
                    enable_gqa=gqa))
                continue
            if len(self._spans) > 1 or self.invariant:  # the same strides alone or packed
                qj, kj, vj = qj.contiguous(), kj.contiguous(), vj.contiguous()
            outs.append(F.scaled_dot_product_attention(
                qj, kj, vj, is_causal=True, scale=self.scale, enable_gqa=gqa))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def _attend_after(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sp: _Span,
                      i: int) -> torch.Tensor:
        """A long prompt part after `sp.offset` positions already in its blocks (a prefix hit,
        or a large chunk), on CPU, without an (n, offset + n) mask (26K tokens after one
        cached block made a 2.8 GB mask and took 7 s against 1.3 s for the whole prompt
        uncached): attention over the earlier keys, unmasked, and causal attention within
        the part, merged by their log-sum-exps. The earlier part takes the query heads that
        share a key head as extra positions (no causal order there), so no key is copied."""
        heads, kv, d = self.heads, self.kv_heads, self.head_dim
        group, n = heads // kv, sp.n
        blocks = sp.blocks[None, :blocks_for(sp.offset, self.block_size)]
        keys = self._gather(self.pool.k[i], blocks)[:, :, :sp.offset].contiguous()
        values = self._gather(self.pool.v[i], blocks)[:, :, :sp.offset].contiguous()
        grouped = q.reshape(1, kv, group * n, d)
        early, lse_early = _flash_cpu(grouped, keys, values, scale=self.scale)[:2]
        early, lse_early = early.reshape(1, heads, n, d), lse_early.reshape(1, heads, n)
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        own, lse_own = _flash_cpu(q.contiguous(), k.contiguous(), v.contiguous(),
                                  is_causal=True, scale=self.scale)[:2]
        lse = torch.logaddexp(lse_early, lse_own)
        out = (early.float() * torch.exp(lse_early - lse).unsqueeze(-1)
               + own.float() * torch.exp(lse_own - lse).unsqueeze(-1))
        return out.to(q.dtype)

    def _attend_groups(self, q: torch.Tensor, i: int) -> torch.Tensor:
        """Rows grouped by key bucket, one call per group over its rows' gathered blocks, so
        a row reads about its own length, not the longest row's.

        Batch-invariant mode: a row's result depends on its own keys and bucket only (on one
        thread the kernel works through each (row, head) alike whatever the batch; checked
        bit for bit in the tests; on several threads it splits the work by batch size, so
        `_attend_rows` is used). Otherwise the query heads that share a key head ride as that
        head's query positions, (g, kv, group, d): one new token has no causal order among
        its heads, so every backend (masked, no GQA support needed) runs it and no key is
        read more than once."""
        groups = self._step.groups
        gqa = self.heads != self.kv_heads
        out = None if len(groups) == 1 else torch.empty_like(q)
        for g in groups:
            keys = self._gather(self.pool.k[i], g.blocks)
            values = self._gather(self.pool.v[i], g.blocks)
            qg = q[g.rows]
            n = qg.shape[0]
            if self.invariant:  # contiguous: the kernel's blocking follows the strides
                keys, values = keys.contiguous(), values.contiguous()
                o = F.scaled_dot_product_attention(qg.contiguous(), keys, values,
                                                   attn_mask=g.mask, scale=self.scale,
                                                   enable_gqa=gqa)
            else:
                grouped = qg.reshape(n, self.kv_heads, self.heads // self.kv_heads,
                                     self.head_dim)
                o = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=g.mask,
                                                   scale=self.scale)
                o = o.reshape(n, self.heads, 1, self.head_dim)
            if out is None:
                return o
            out[g.rows] = o
        return out

    def _attend_flex(self, q: torch.Tensor, i: int) -> torch.Tensor:
        """FlexAttention of the rows' new tokens (b, heads, 1, d) over the pool of layer `i`
        seen as one sequence of blocks x block size keys; the step's block mask lists each
        row's own blocks, so the kernel visits those and no other."""
        kv, d = self.kv_heads, self.head_dim
        keys = self.pool.k[i].view(1, kv, -1, d)
        values = self.pool.v[i].view(1, kv, -1, d)
        # the query heads that share a key head go in as that head's queries (b, kv, group, d),
        # all at the row's position: every key block is read once per key head, and the
        # kernel is the decoding one whatever the group (Eagle2-1B's 7 is not a power of two,
        # which sends grouped heads to the prefill kernel, whose tiles a 16-token block
        # cannot hold: found on the first H200 run)
        n = q.shape[0]
        grouped = q.contiguous().view(n, kv, self.heads // kv, d)
        out = self._flex_attention(grouped, keys, values, block_mask=self._step.flex,
                                   scale=self.scale, kernel_options=self._flex_options)
        return out.reshape(n, self.heads, 1, d)

    def _flex_mask(self, positions: torch.Tensor, blocks: torch.Tensor) -> object:
        """The block mask of rows at `positions` (b,) with block tables `blocks` (b, m),
        padded with the null block: every block before a row's last is full (no mask), the
        last is partial, masked past the row's position. Device operations only (no sync),
        so a CUDA graph can hold it."""
        from torch.nn.attention.flex_attention import BlockMask

        b, m = blocks.shape
        size = self.block_size
        logical = self._logical[:b]
        logical.fill_(-1)
        order = torch.arange(m, dtype=torch.int32, device=self.device).expand(b, m)
        logical.scatter_(1, blocks, order)  # the null block's entry ends up at or past m
        last = positions // size  # (b,) the logical block holding each row's new token
        full, partial = self._full_ids[:b], self._last_ids[:b]
        full[:, :m] = blocks
        partial[:, 0] = blocks.gather(1, last[:, None])[:, 0]

        def own_keys(row, head, q, key):
            block = logical[row, key // size]
            return (block >= 0) & (block * size + key % size <= positions[row])

        return BlockMask.from_kv_blocks(
            torch.ones(b, 1, 1, dtype=torch.int32, device=self.device),
            partial[:, None, None], last.to(torch.int32)[:, None, None], full[:, None, None],
            BLOCK_SIZE=(128, size), mask_mod=own_keys,
            seq_lengths=(self.heads // self.kv_heads, logical.shape[1] * size),
            compute_q_blocks=False)

    def _attend_rows(self, q: torch.Tensor, i: int) -> torch.Tensor:
        """Row by row over each row's own length: what a row sees never depends on others."""
        outs = []
        kv, d = self.kv_heads, self.head_dim
        store_k, store_v = self.pool.k[i].view(kv, -1, d), self.pool.v[i].view(kv, -1, d)
        gqa = self.heads != kv
        for r, at in enumerate(self._step.tables):
            outs.append(F.scaled_dot_product_attention(
                q[r:r + 1].contiguous(), store_k.index_select(1, at)[None],
                store_v.index_select(1, at)[None], scale=self.scale, enable_gqa=gqa))
        return torch.cat(outs)

    @staticmethod
    def _linear(weight: torch.Tensor, bias: torch.Tensor | None,
                x: torch.Tensor) -> torch.Tensor:
        """F.linear(x, weight, bias) with each row's result independent of how many rows there are.

        Under _BLOCK rows BLAS switches to other kernels, so fewer rows are zero-padded. On one
        thread a product of _BLOCK or more rows gives each row the bits it gets in a block of
        _BLOCK (the same kernel tiles every row alike; checked over many shapes), so one call
        does. On several threads the split follows the row count: fixed blocks of _BLOCK.
        """
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        count = rows.shape[0]
        if torch.get_num_threads() == 1:
            pad = max(0, _BLOCK - count)
        else:
            pad = (-count) % _BLOCK
        if pad:
            rows = torch.cat([rows, rows.new_zeros(pad, rows.shape[1])])
        if torch.get_num_threads() == 1:
            out = F.linear(rows, weight, bias)
        else:
            out = torch.cat([F.linear(rows[s:s + _BLOCK], weight, bias)
                             for s in range(0, rows.shape[0], _BLOCK)])
        return out[:count].reshape(*shape[:-1], -1)

    def can_pack(self) -> bool:
        """Whether prompts and running rows may share a pass without changing any one's
        result: always outside batch-invariant mode, on one thread within it (`_linear`)."""
        return not self.invariant or torch.get_num_threads() == 1

    def _mask(self, positions: torch.Tensor, t: int) -> torch.Tensor:
        """(b, 1, 1, t) additive mask, 0 where a row may look and -inf past its position:
        made once per pass and shared by every layer (a boolean mask would be converted in
        each attention call)."""
        beyond = torch.arange(t, device=positions.device)[None, :] > positions[:, None]
        mask = torch.zeros(beyond.shape, dtype=self.dtype, device=positions.device)
        return mask.masked_fill_(beyond, float("-inf"))[:, None, None]

    def _padded(self, tables: list[Table], m: int) -> torch.Tensor:
        """(rows, m) block ids: each table's first m blocks, the null block after its end."""
        rows = [t[:m] + [NULL_BLOCK] * (m - min(m, len(t))) for t in tables]
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def _groups(self, listed: list[int], tables: list[Table],
                positions: torch.Tensor) -> list[_Group]:
        by_bucket: dict[int, list[int]] = {}
        for row, pos in enumerate(listed):
            by_bucket.setdefault(key_bucket(pos + 1), []).append(row)
        groups = []
        for t, rows in sorted(by_bucket.items()):
            if rows == list(range(rows[0], rows[-1] + 1)):
                sel: slice | torch.Tensor = slice(rows[0], rows[-1] + 1)
            else:
                sel = torch.tensor(rows, device=positions.device)
            blocks = self._padded([tables[r] for r in rows], t // self.block_size)
            groups.append(_Group(t, sel, self._mask(positions[sel], t), blocks))
        return groups

    def _where(self, table: Table, first: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(block, slot) of positions first .. first + n - 1 of a job with `table`."""
        size = self.block_size
        if len(table) * size < first + n:
            raise ValueError(f"a block table of {len(table)} blocks holds "
                             f"{len(table) * size} positions, not {first + n}")
        pos = torch.arange(first, first + n)
        ids = torch.tensor(table, dtype=torch.long)[pos // size]
        return ids.to(self.device), (pos % size).to(self.device)

    def _plan_rows(self, positions: torch.Tensor, tables: list[Table]) -> None:
        """What every layer shares about the running rows, worked out once per pass (on a
        GPU each .tolist() is a device sync): where new keys go, groups and masks."""
        b = positions.shape[0]
        if not b:
            self._step = _StepPlan([], [])
            return
        listed = positions.tolist()
        size = self.block_size
        to_block = torch.tensor([t[p // size] for t, p in zip(tables, listed)],
                                dtype=torch.long, device=self.device)
        to_slot = positions % size
        if self.invariant and torch.get_num_threads() != 1:
            # each row's key positions in the pool's (kv_heads, blocks x size, d) view:
            # one index_select per layer gives its keys contiguous, nothing sliced after
            slots = torch.arange(size, device=self.device)
            own = [(torch.tensor(t[:blocks_for(p + 1, size)], dtype=torch.long,
                                 device=self.device)[:, None] * size + slots).view(-1)[:p + 1]
                   for t, p in zip(tables, listed)]
            self._step = _StepPlan(listed, [], b, to_block, to_slot, own)
            return
        if self.attention == "flex":
            m = max(blocks_for(p + 1, size) for p in listed)
            self._step = _StepPlan(listed, [], b, to_block, to_slot,
                                   flex=self._flex_mask(positions, self._padded(tables, m)))
            return
        self._step = _StepPlan(listed, self._groups(listed, tables, positions), b, to_block,
                               to_slot)

    def _hidden(self, tokens: torch.Tensor, positions: torch.Tensor, tables: list[Table],
                prompts: list[tuple]) -> torch.Tensor:
        b = tokens.shape[0]
        # (embeddings, table) or (embeddings, table, first position) for a chunk
        prompts = [(p[0], p[1], p[2] if len(p) > 2 else 0) for p in prompts]
        lengths = [e.shape[0] for e, _, _ in prompts]
        offsets = [o for _, _, o in prompts]
        if (b or len(prompts) > 1) and prompts and not self.can_pack():
            raise ValueError("a shared pass is not batch-invariant on several threads")
        self._plan_rows(positions, tables)
        starts = itertools.accumulate([b] + lengths[:-1])
        self._spans = []
        for s, n, (_, table, o) in zip(starts, lengths, prompts):
            blocks = (torch.tensor(table[:blocks_for(o + n, self.block_size)],
                                   dtype=torch.long, device=self.device) if o else None)
            self._spans.append(_Span(s, n, o, *self._where(table, o, n), blocks))
        # A chunk (first position o > 0) attends over its o earlier keys and its own n,
        # causally: query j sees keys 0 .. o + j. An additive mask in the model's dtype, made
        # once for every layer (on CPU a boolean one costs twice the attention itself).
        self._chunk_mask = None
        chunk = [(n, o) for n, o in zip(lengths, offsets) if o]
        if chunk:
            if len(prompts) > 1:
                raise ValueError("a prompt chunk is prefilled in a pass of its own")
            n, o = chunk[0]
            if n * (o + n) <= _MASK_LIMIT or self.device.type != "cpu":
                blocked = torch.ones(n, o + n, dtype=torch.bool,
                                     device=self.device).triu_(o + 1)
                self._chunk_mask = torch.zeros(n, o + n, dtype=self.dtype,
                                               device=self.device).masked_fill_(blocked,
                                                                                float("-inf"))
        # In batch-invariant mode rows that share a pass must get the bits they get alone:
        # the one-thread `_linear`. A long prompt alone on several threads is alone by
        # construction and takes plain products.
        self._lin = self._linear if self.invariant and (b or self.can_pack()) else _plain
        parts = ([self.body.embed_tokens(tokens)] if b else []) + [e for e, _, _ in prompts]
        x = (parts[0] if len(parts) == 1 else torch.cat(parts))[None]  # (1, L, hidden)
        pos = torch.cat([positions] + [torch.arange(o, o + n, device=self.device)
                                       for n, o in zip(lengths, offsets)])
        cos, sin = self.body.rotary_emb(x, pos[None])
        for i, layer in enumerate(self.layers):
            x = self._attend(layer, x, cos, sin, i)
        return _norm(self.body.norm, x)[0]  # (L, hidden)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, tables: list[Table],
                prompts: list[tuple[torch.Tensor, Table]] = ()) -> torch.Tensor:
        """One pass: running rows 0..b-1 take one token each (`tokens` at `positions`, (b,),
        keys into their `tables`), and prompts (embeddings (n_j, hidden), block table) are
        prefilled beside them. Logits (b + J, vocab): each running row's, then each
        prompt's last position.

        In batch-invariant mode every row and prompt gets exactly what it gets in a pass of
        its own (see `can_pack` for when they may share one)."""
        b = tokens.shape[0]
        h = self._hidden(tokens, positions, tables, list(prompts))
        if prompts:
            ends = list(itertools.accumulate([b] + [p[0].shape[0] for p in prompts]))[1:]
            pick = torch.tensor(list(range(b)) + [e - 1 for e in ends], device=h.device)
            h = h[pick]
        if self.invariant:
            return self._linear(self.lm.lm_head.weight, self.lm.lm_head.bias, h)
        return self.lm.lm_head(h)

    def reserve(self, tokens: int) -> Table:
        """A block table for `tokens` positions from the pool (for tests and tools that drive
        the decoder directly; the engine keeps its own accounting)."""
        table = self.pool.allocate(blocks_for(tokens, self.block_size))
        if table is None:
            raise ValueError(f"the KV pool has {self.pool.available()} blocks free, "
                             f"not the {blocks_for(tokens, self.block_size)} {tokens} "
                             f"positions need")
        return table

    def _none(self) -> tuple[torch.Tensor, torch.Tensor, list[Table]]:
        empty = torch.empty(0, dtype=torch.long, device=self.device)
        return empty, empty, []

    @torch.inference_mode()
    def prefill(self, embeds: torch.Tensor, table: Table,
                all_logits: bool = False) -> torch.Tensor:
        """Prompt embeddings (n, hidden) into the blocks of `table`; logits of the last
        position (vocab,) or of every position (n, vocab)."""
        if all_logits:
            return self.lm.lm_head(self._hidden(*self._none(), [(embeds, table)]))
        return self.forward(*self._none(), [(embeds, table)])[0]

    def prefill_many(self, prompts: list[tuple[torch.Tensor, Table]]) -> torch.Tensor:
        """Prompts (embeddings, block table) in one pass: logits of each last position
        (J, vocab)."""
        return self.forward(*self._none(), prompts)

    def prefill_chunk(self, embeds: torch.Tensor, table: Table, offset: int) -> torch.Tensor:
        """Positions offset .. offset + n - 1 of a prompt whose earlier positions are already
        in its blocks (chunked prefill, or the rest after a prefix-cache hit): logits of the
        chunk's last position (vocab,)."""
        return self.forward(*self._none(), [(embeds, table, offset)])[0]

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, tables: list[Table],
                    longest: int | None = None) -> torch.Tensor:
        """One token for each of rows 0..b-1 at `positions` (b,), its keys into the block of
        `tables` that holds that position -> logits (b, vocab). `longest` is the largest
        position, when the caller knows it (saves a device sync)."""
        if self.graphs is not None:
            if longest is None:
                longest = int(positions.max())
            return self.graphs(tokens, positions, tables, longest)
        return self.forward(tokens, positions, tables)

    @torch.inference_mode()
    def static_decode(self, tokens: torch.Tensor, positions: torch.Tensor,
                      blocks: torch.Tensor) -> torch.Tensor:
        """A decode step over fixed shapes: rows 0..B-1 with block tables `blocks` (B, m),
        every row over m * block size keys with its mask made on the device. Nothing is read
        back to the host and no tensor is allocated by shape from data, so the step can be
        captured once as a CUDA graph and replayed (`DecodeGraphs`)."""
        return self.static_body(tokens, positions, blocks)

    def static_body(self, tokens: torch.Tensor, positions: torch.Tensor,
                    blocks: torch.Tensor) -> torch.Tensor:
        """`static_decode` without its inference-mode wrapper: what `torch.compile` takes
        (`DecodeGraphs(compile=True)`; the caller is already in inference mode)."""
        b, m = blocks.shape
        t = m * self.block_size
        size = self.block_size
        to_block = blocks.gather(1, (positions // size)[:, None])[:, 0]
        if self.attention == "flex":
            self._step = _StepPlan([], [], b, to_block, positions % size,
                                   flex=self._flex_mask(positions, blocks))
        else:
            group = _Group(t, slice(0, b), self._mask(positions, t), blocks)
            self._step = _StepPlan([], [group], b, to_block, positions % size)
        self._spans = []
        self._lin = _plain
        x = self.body.embed_tokens(tokens)[None]  # (1, B, hidden)
        cos, sin = self.body.rotary_emb(x, positions[None])
        for i, layer in enumerate(self.layers):
            x = self._attend(layer, x, cos, sin, i)
        # the plan holds the batch size and step tensors: not left behind, so that a compiled
        # step has no Python state to rebuild (which would fix the batch size it was traced at)
        self._step = _IDLE
        return self.lm.lm_head(_norm(self.body.norm, x)[0])
