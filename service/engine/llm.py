"""Prefill and batched decode over the Qwen2 layers of transformers, with our own KV slots.

The layers' modules (projections, norms, MLP, rotary) are transformers' own; what is ours
is the cache: one tensor per layer holding every running job's keys and values in its own
row, so one decode step advances the whole batch with a single attention call per layer.
Rows are kept compact (the running jobs are rows 0..B-1) by moving the last row into a gap.

Batch-invariant mode (the default on CPU) makes a job's tokens independent of what it is
batched with: matrix products run on fixed 8-row blocks (BLAS picks its kernel by shape, and
a different kernel rounds differently) and attention runs over a key length that depends on
the row alone (`key_bucket`), rows of one bucket together. It costs a little speed and buys
exact reproducibility under greedy decoding.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

_BLOCK = 8


@dataclass
class _Group:
    """Rows whose attention runs over the same key length `t` (batch-invariant mode)."""

    t: int
    rows: slice | torch.Tensor  # a slice when the rows are consecutive
    mask: torch.Tensor  # (rows, 1, 1, t): each row sees its own positions only


@dataclass
class _StepPlan:
    """What every layer of one decode step shares: row positions, key length, mask, groups."""

    positions: list[int]
    t: int
    mask: torch.Tensor | None
    groups: list[_Group] | None = None


def key_bucket(length: int) -> int:
    """The key length a row of `length` positions attends over in batch-invariant mode: a
    function of its own length only, rounded up to 1/8 of its power of two (at least 64),
    so rows of similar length share one attention call and waste under 12.5%."""
    grain = max(64, 1 << max(0, length.bit_length() - 3))
    return -(-length // grain) * grain


def _plain(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x)


class KVSlots:
    """Keys and values per layer: (rows, kv_heads, capacity, head_dim), grown by doubling."""

    def __init__(self, layers: int, rows: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, capacity: int = 256) -> None:
        self.shape = (rows, kv_heads, capacity, head_dim)
        self.initial = capacity
        self.k = [torch.zeros(self.shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(self.shape, dtype=dtype, device=device) for _ in range(layers)]

    def reset(self) -> None:
        """Back to the initial capacity (only when no row is in use)."""
        self.k = [t.new_zeros(self.shape) for t in self.k]
        self.v = [t.new_zeros(self.shape) for t in self.v]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def reserve(self, length: int) -> None:
        """Make room for `length` positions per row."""
        if length <= self.capacity:
            return
        cap = self.capacity
        while cap < length:
            cap *= 2
        for store in (self.k, self.v):
            for i, old in enumerate(store):
                new = old.new_zeros(old.shape[0], old.shape[1], cap, old.shape[3])
                new[:, :, : old.shape[2]] = old
                store[i] = new

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy row `src` (its first `length` positions) into row `dst`."""
        for store in (self.k, self.v):
            for t in store:
                t[dst, :, :length] = t[src, :, :length]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class Decoder:
    """Runs a causal LM from transformers (Qwen2 layout) as prefill + batched decode steps."""

    def __init__(self, causal_lm: torch.nn.Module, max_rows: int,
                 batch_invariant: bool = False) -> None:
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
        self.slots = KVSlots(len(self.layers), max_rows, self.kv_heads, self.head_dim,
                             param.dtype, param.device)
        self._step = _StepPlan([], 0, None)
        self._spans: list[tuple[int, int, int]] = []  # packed prompts: (start, length, row)
        self._lin = _plain  # the projections' function for the pass being run

    def _attend(self, layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                rows: torch.Tensor, positions: torch.Tensor, i: int, prefill: bool) -> torch.Tensor:
        attn = layer.self_attn
        b, n, _ = x.shape
        lin = self._lin
        h = layer.input_layernorm(x)
        # (b, n, heads*d) -> (b, heads, n, d)
        q = lin(attn.q_proj, h).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = lin(attn.k_proj, h).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = lin(attn.v_proj, h).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if prefill:  # one or more prompts packed along n, each at positions 0..len-1
            o = self._attend_prompts(q, k, v, i)
        else:  # b jobs, one new token each at its own position
            self.slots.k[i][rows, :, positions] = k[:, :, 0]
            self.slots.v[i][rows, :, positions] = v[:, :, 0]
            if not self.invariant:
                o = self._attend_batch(q, positions, i)
            elif self._step.groups is not None:
                o = self._attend_groups(q, i)
            else:
                o = self._attend_rows(q, positions, i)
        o = o.transpose(1, 2).reshape(b, n, self.heads * self.head_dim)  # (b, n, hidden)
        x = x + lin(attn.o_proj, o)
        h = layer.post_attention_layernorm(x)
        if lin is _plain:
            return x + layer.mlp(h)
        mlp = layer.mlp  # Qwen2/Llama MLP: down(act(gate(h)) * up(h)), in fixed blocks
        return x + lin(mlp.down_proj, mlp.act_fn(lin(mlp.gate_proj, h)) * lin(mlp.up_proj, h))

    def _attend_prompts(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        i: int) -> torch.Tensor:
        """Causal attention within each packed prompt, whose keys also go to its KV row."""
        outs = []
        for start, n, row in self._spans:
            qj, kj, vj = (t[:, :, start:start + n] for t in (q, k, v))
            self.slots.k[i][row, :, :n] = kj[0]
            self.slots.v[i][row, :, :n] = vj[0]
            if len(self._spans) > 1 or self.invariant:  # the same strides alone or packed
                qj, kj, vj = qj.contiguous(), kj.contiguous(), vj.contiguous()
            outs.append(F.scaled_dot_product_attention(
                qj, kj, vj, is_causal=True, scale=self.scale,
                enable_gqa=self.heads != self.kv_heads))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def _attend_batch(self, q: torch.Tensor, positions: torch.Tensor, i: int) -> torch.Tensor:
        """All rows in one call over the longest row's length, shorter rows masked."""
        b = q.shape[0]
        t, mask = self._step.t, self._step.mask
        keys = self.slots.k[i][:b, :, :t]  # rows are 0..b-1: compact by construction
        values = self.slots.v[i][:b, :, :t]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale,
                                              enable_gqa=self.heads != self.kv_heads)

    def _attend_groups(self, q: torch.Tensor, i: int) -> torch.Tensor:
        """Rows grouped by key bucket, one call per group over contiguous copies. A row's
        result depends on its own keys and bucket only: on one thread the kernel works
        through each (row, head) alike whatever the batch (checked bit for bit in the tests);
        on several threads it splits the work by batch size, so `_attend_rows` is used."""
        groups = self._step.groups
        gqa = self.heads != self.kv_heads
        out = None if len(groups) == 1 else torch.empty_like(q)
        for g in groups:
            keys = self.slots.k[i][g.rows, :, :g.t]
            values = self.slots.v[i][g.rows, :, :g.t]
            if isinstance(g.rows, slice):
                keys, values = keys.contiguous(), values.contiguous()
            o = F.scaled_dot_product_attention(q[g.rows], keys, values, attn_mask=g.mask,
                                               scale=self.scale, enable_gqa=gqa)
            if out is None:
                return o
            out[g.rows] = o
        return out

    def _attend_rows(self, q: torch.Tensor, positions: torch.Tensor, i: int) -> torch.Tensor:
        """Row by row over each row's own length: what a row sees never depends on others."""
        outs = []
        for r, pos in enumerate(self._step.positions):
            # contiguous copies: the kernel's blocking follows the strides, and the strides
            # follow the pool's capacity, which depends on the other rows
            keys = self.slots.k[i][r:r + 1, :, :pos + 1].contiguous()
            values = self.slots.v[i][r:r + 1, :, :pos + 1].contiguous()
            outs.append(F.scaled_dot_product_attention(
                q[r:r + 1], keys, values, scale=self.scale,
                enable_gqa=self.heads != self.kv_heads))
        return torch.cat(outs)

    @staticmethod
    def _linear(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """module(x) with each row's result independent of how many rows there are.

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
            out = F.linear(rows, module.weight, module.bias)
        else:
            out = torch.cat([F.linear(rows[s:s + _BLOCK], module.weight, module.bias)
                             for s in range(0, rows.shape[0], _BLOCK)])
        return out[:count].reshape(*shape[:-1], -1)

    def _run(self, x: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor,
             prefill: bool) -> torch.Tensor:
        pos_ids = positions[None, :] if prefill else positions[:, None]  # (b, n)
        cos, sin = self.body.rotary_emb(x, pos_ids)
        for i, layer in enumerate(self.layers):
            x = self._attend(layer, x, cos, sin, rows, positions, i, prefill)
        return self.body.norm(x)

    def can_pack(self) -> bool:
        """Whether prompts may share a prefill pass without changing any one's result: always
        outside batch-invariant mode, on one thread within it (see `_linear`)."""
        return not self.invariant or torch.get_num_threads() == 1

    def _prefill_hidden(self, prompts: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
        lengths = [e.shape[0] for e, _ in prompts]
        if len(prompts) > 1 and not self.can_pack():
            raise ValueError("packed prefill is not batch-invariant on several threads")
        self.slots.reserve(max(lengths) + 1)
        device = prompts[0][0].device
        starts = [sum(lengths[:j]) for j in range(len(lengths))]
        self._spans = [(s, n, row) for s, n, (_, row) in zip(starts, lengths, prompts)]
        # Packed prompts share the projections and MLP, so in batch-invariant mode these
        # must give a row the same bits whatever else is packed: the one-thread `_linear`.
        self._lin = self._linear if self.invariant and self.can_pack() else _plain
        x = prompts[0][0][None] if len(prompts) == 1 else torch.cat([e for e, _ in prompts])[None]
        positions = torch.cat([torch.arange(n, device=device) for n in lengths])
        return self._run(x, positions, None, prefill=True)[0]  # (total, hidden)

    @torch.inference_mode()
    def prefill(self, embeds: torch.Tensor, row: int, all_logits: bool = False) -> torch.Tensor:
        """Prompt embeddings (n, hidden) into row `row`; logits of the last position (vocab,)
        or of every position (n, vocab)."""
        if all_logits:
            return self.lm.lm_head(self._prefill_hidden([(embeds, row)]))
        return self.prefill_many([(embeds, row)])[0]

    @torch.inference_mode()
    def prefill_many(self, prompts: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
        """Prompts (embeddings (n_j, hidden), KV row) in one pass: projections and MLP over all
        their positions together, attention within each. Logits of each last position (J, vocab).
        In batch-invariant mode each prompt gets exactly what it gets alone (`can_pack`)."""
        h = self._prefill_hidden(prompts)
        ends = torch.tensor(list(itertools.accumulate(e.shape[0] for e, _ in prompts)),
                            device=h.device) - 1
        last = h[ends]  # (J, hidden)
        if self.invariant:
            return self._linear(self.lm.lm_head, last)
        return self.lm.lm_head(last)

    @staticmethod
    def _groups(listed: list[int], positions: torch.Tensor) -> list[_Group]:
        by_bucket: dict[int, list[int]] = {}
        for row, pos in enumerate(listed):
            by_bucket.setdefault(key_bucket(pos + 1), []).append(row)
        groups = []
        for t, rows in sorted(by_bucket.items()):
            if rows == list(range(rows[0], rows[-1] + 1)):
                sel: slice | torch.Tensor = slice(rows[0], rows[-1] + 1)
            else:
                sel = torch.tensor(rows, device=positions.device)
            mask = (torch.arange(t, device=positions.device)[None, :]
                    <= positions[sel][:, None])[:, None, None]
            groups.append(_Group(t, sel, mask))
        return groups

    @torch.inference_mode()
    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token for each of rows 0..b-1 at `positions` (b,) -> logits (b, vocab)."""
        b = tokens.shape[0]
        # Worked out once per step, not once per layer: on a GPU each .max()/.tolist() is a
        # device sync.
        listed = positions.tolist()
        t = max(listed) + 1
        mask = groups = None
        if not self.invariant:  # (b, 1, 1, t): each row sees its own positions only
            mask = (torch.arange(t, device=positions.device)[None, :]
                    <= positions[:, None])[:, None, None]
        elif torch.get_num_threads() == 1:
            groups = self._groups(listed, positions)
            t = max(g.t for g in groups)
        self.slots.reserve(t)
        self._step = _StepPlan(listed, t, mask, groups)
        x = self.body.embed_tokens(tokens)[:, None, :]  # (b, 1, hidden)
        rows = torch.arange(b, device=tokens.device)
        self._lin = self._linear if self.invariant else _plain
        h = self._run(x, positions, rows, prefill=False)  # (b, 1, hidden)
        if self.invariant:
            return self._linear(self.lm.lm_head, h[:, 0])
        return self.lm.lm_head(h[:, 0])
