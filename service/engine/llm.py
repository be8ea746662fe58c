"""Prefill and batched decode over the Qwen2 layers of transformers, with our own KV slots.

The layers' modules (projections, norms, MLP, rotary) are transformers' own; what is ours
is the cache: one tensor per layer holding every running job's keys and values in its own
row, so one decode step advances the whole batch with a single attention call per layer.
Rows are kept compact (the running jobs are rows 0..B-1) by moving the last row into a gap.

Batch-invariant mode (the default on CPU) makes a job's tokens independent of what it is
batched with: every matrix product gets at least 8 rows (BLAS picks its kernel by shape, and
a different kernel rounds differently; see `_linear`) and attention runs over a key length
that depends on the row alone (`key_bucket`), rows of one bucket together. It costs a little
speed and buys exact reproducibility under greedy decoding.

One pass (`forward`) serves both phases: running rows with one new token each, and prompts
packed after them. The KV cache is `kv.KVSlots`; CUDA graphs of the decode step are
`graphs.DecodeGraphs`.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from service.engine.kv import KVSlots

_BLOCK = 8


@dataclass
class _Group:
    """Rows whose attention runs over the same key length `t` (batch-invariant mode)."""

    t: int
    rows: slice | torch.Tensor  # a slice when the rows are consecutive
    mask: torch.Tensor  # (rows, 1, 1, t) additive: each row sees its own positions only


@dataclass
class _StepPlan:
    """What every layer of one decode step shares: row positions, key length, mask, groups."""

    positions: list[int]
    t: int
    mask: torch.Tensor | None
    groups: list[_Group] | None = None
    rows: torch.Tensor = torch.empty(0, dtype=torch.long)  # 0..b-1, the running rows
    at: torch.Tensor = torch.empty(0, dtype=torch.long)  # their positions, as a tensor


def key_bucket(length: int) -> int:
    """The key length a row of `length` positions attends over in batch-invariant mode: a
    function of its own length only, rounded up to a grain of 1/16 of the power of two above
    it (at least 64), so rows of similar length share one attention call and the padding
    stays under an eighth of the row (or under 64 keys)."""
    grain = max(64, 1 << max(0, length.bit_length() - 4))
    return -(-length // grain) * grain


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
        self._qkv = [_fuse([ly.self_attn.q_proj, ly.self_attn.k_proj, ly.self_attn.v_proj])
                     for ly in self.layers]
        self._gate_up = [_fuse([ly.mlp.gate_proj, ly.mlp.up_proj])[0] for ly in self.layers]
        self._step = _StepPlan([], 0, None)
        # packed prompts: (start in the pass, length, KV row, first position); a first
        # position above 0 continues a prompt already partly in its row (chunked prefill)
        self._spans: list[tuple[int, int, int, int]] = []
        self._lin = _plain  # the projections' function for the pass being run
        self._chunk_mask: torch.Tensor | None = None
        # graphs.DecodeGraphs, set by the engine on CUDA: (tokens, positions, longest) -> logits
        self.graphs: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None

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
        b = self._step.rows.shape[0]
        if b:  # the running rows: write their new keys, attend over their KV rows
            self.slots.k[i][self._step.rows, :, self._step.at] = k[0, :, :b].transpose(0, 1)
            self.slots.v[i][self._step.rows, :, self._step.at] = v[0, :, :b].transpose(0, 1)
            qd = q[0, :, :b].transpose(0, 1).unsqueeze(2)  # (b, heads, 1, d)
            if not self.invariant:
                od = self._attend_batch(qd, i)
            elif self._step.groups is not None:
                od = self._attend_groups(qd, i)
            else:
                od = self._attend_rows(qd, i)
            outs.append(od.reshape(b, heads * d))
        if self._spans:
            outs.append(self._attend_prompts(q, k, v, i).transpose(1, 2)
                        .reshape(length - b, heads * d))
        o = (outs[0] if len(outs) == 1 else torch.cat(outs))[None]  # (1, L, hidden)
        x = x + lin(attn.o_proj.weight, attn.o_proj.bias, o)
        h = _norm(layer.post_attention_layernorm, x)
        gate, up = lin(self._gate_up[i], None, h).chunk(2, dim=-1)  # Qwen2/Llama MLP
        return x + lin(mlp.down_proj.weight, mlp.down_proj.bias, mlp.act_fn(gate) * up)

    def _attend_prompts(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        i: int) -> torch.Tensor:
        """Causal attention within each packed prompt, whose keys also go to its KV row. A
        chunk of a longer prompt (first position > 0) also sees the row's earlier keys."""
        outs = []
        gqa = self.heads != self.kv_heads
        for start, n, row, offset in self._spans:
            qj, kj, vj = (t[:, :, start:start + n] for t in (q, k, v))
            self.slots.k[i][row, :, offset:offset + n] = kj[0]
            self.slots.v[i][row, :, offset:offset + n] = vj[0]
            if offset:
                keys = self.slots.k[i][row:row + 1, :, :offset + n].contiguous()
                values = self.slots.v[i][row:row + 1, :, :offset + n].contiguous()
                outs.append(F.scaled_dot_product_attention(
                    qj.contiguous(), keys, values, attn_mask=self._chunk_mask, scale=self.scale,
                    enable_gqa=gqa))
                continue
            if len(self._spans) > 1 or self.invariant:  # the same strides alone or packed
                qj, kj, vj = qj.contiguous(), kj.contiguous(), vj.contiguous()
            outs.append(F.scaled_dot_product_attention(
                qj, kj, vj, is_causal=True, scale=self.scale, enable_gqa=gqa))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def _attend_batch(self, q: torch.Tensor, i: int) -> torch.Tensor:
        """All rows in one call over the longest row's length, shorter rows masked. The query
        heads that share a key head ride as that head's query positions, (b, kv, group, d):
        one new token has no causal order among its heads, so every backend (masked, no GQA
        support needed) runs it and no key is read more than once."""
        b = q.shape[0]
        t, mask = self._step.t, self._step.mask
        keys = self.slots.k[i][:b, :, :t]  # rows are 0..b-1: compact by construction
        values = self.slots.v[i][:b, :, :t]
        grouped = q.reshape(b, self.kv_heads, self.heads // self.kv_heads, self.head_dim)
        o = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask,
                                           scale=self.scale)
        return o.reshape(b, self.heads, 1, self.head_dim)

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
            o = F.scaled_dot_product_attention(q[g.rows].contiguous(), keys, values,
                                               attn_mask=g.mask, scale=self.scale,
                                               enable_gqa=gqa)
            if out is None:
                return o
            out[g.rows] = o
        return out

    def _attend_rows(self, q: torch.Tensor, i: int) -> torch.Tensor:
        """Row by row over each row's own length: what a row sees never depends on others."""
        outs = []
        for r, pos in enumerate(self._step.positions):
            # contiguous copies: the kernel's blocking follows the strides, and the strides
            # follow the pool's capacity, which depends on the other rows
            keys = self.slots.k[i][r:r + 1, :, :pos + 1].contiguous()
            values = self.slots.v[i][r:r + 1, :, :pos + 1].contiguous()
            outs.append(F.scaled_dot_product_attention(
                q[r:r + 1].contiguous(), keys, values, scale=self.scale,
                enable_gqa=self.heads != self.kv_heads))
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
        mask = torch.zeros(beyond.shape, dtype=self.slots.k[0].dtype, device=positions.device)
        return mask.masked_fill_(beyond, float("-inf"))[:, None, None]

    def _groups(self, listed: list[int], positions: torch.Tensor) -> list[_Group]:
        by_bucket: dict[int, list[int]] = {}
        for row, pos in enumerate(listed):
            by_bucket.setdefault(key_bucket(pos + 1), []).append(row)
        groups = []
        for t, rows in sorted(by_bucket.items()):
            if rows == list(range(rows[0], rows[-1] + 1)):
                sel: slice | torch.Tensor = slice(rows[0], rows[-1] + 1)
            else:
                sel = torch.tensor(rows, device=positions.device)
            groups.append(_Group(t, sel, self._mask(positions[sel], t)))
        return groups

    def _hidden(self, tokens: torch.Tensor, positions: torch.Tensor,
                prompts: list[tuple]) -> torch.Tensor:
        b = tokens.shape[0]
        # (embeddings, row) or (embeddings, row, first position) for a chunk
        prompts = [(p[0], p[1], p[2] if len(p) > 2 else 0) for p in prompts]
        lengths = [e.shape[0] for e, _, _ in prompts]
        offsets = [o for _, _, o in prompts]
        if (b or len(prompts) > 1) and prompts and not self.can_pack():
            raise ValueError("a shared pass is not batch-invariant on several threads")
        device = self.slots.k[0].device
        # What every layer shares, worked out once per pass (on a GPU each .tolist() or
        # .max() is a device sync): row positions, key length, masks, groups.
        listed = positions.tolist()
        t = max(listed) + 1 if b else 0
        mask = groups = None
        if b and not self.invariant:
            mask = self._mask(positions, t)
        elif b and torch.get_num_threads() == 1:
            groups = self._groups(listed, positions)
            t = max(g.t for g in groups)
        self.slots.reserve(max([t] + [o + n + 1 for n, o in zip(lengths, offsets)]))
        self._step = _StepPlan(listed, t, mask, groups, torch.arange(b, device=device),
                               positions)
        starts = itertools.accumulate([b] + lengths[:-1])
        self._spans = [(s, n, row, o) for s, n, (_, row, o) in zip(starts, lengths, prompts)]
        # A chunk (first position o > 0) attends over its row's o earlier keys and its own n,
        # causally: query j sees keys 0 .. o + j. An additive mask in the model's dtype, made
        # once for every layer (on CPU a boolean one costs twice the attention itself).
        self._chunk_mask = None
        chunk = [(n, o) for n, o in zip(lengths, offsets) if o]
        if chunk:
            if len(prompts) > 1:
                raise ValueError("a prompt chunk is prefilled in a pass of its own")
            n, o = chunk[0]
            blocked = torch.ones(n, o + n, dtype=torch.bool, device=device).triu_(o + 1)
            self._chunk_mask = torch.zeros(n, o + n, dtype=self.slots.k[0].dtype,
                                           device=device).masked_fill_(blocked, float("-inf"))
        # In batch-invariant mode rows that share a pass must get the bits they get alone:
        # the one-thread `_linear`. A long prompt alone on several threads is alone by
        # construction and takes plain products.
        self._lin = self._linear if self.invariant and (b or self.can_pack()) else _plain
        parts = ([self.body.embed_tokens(tokens)] if b else []) + [e for e, _, _ in prompts]
        x = (parts[0] if len(parts) == 1 else torch.cat(parts))[None]  # (1, L, hidden)
        pos = torch.cat([positions] + [torch.arange(o, o + n, device=device)
                                       for n, o in zip(lengths, offsets)])
        cos, sin = self.body.rotary_emb(x, pos[None])
        for i, layer in enumerate(self.layers):
            x = self._attend(layer, x, cos, sin, i)
        return _norm(self.body.norm, x)[0]  # (L, hidden)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor,
                prompts: list[tuple[torch.Tensor, int]] = ()) -> torch.Tensor:
        """One pass: running rows 0..b-1 take one token each (`tokens` at `positions`, (b,)),
        and prompts (embeddings (n_j, hidden), KV row) are prefilled beside them. Logits
        (b + J, vocab): each running row's, then each prompt's last position.

        In batch-invariant mode every row and prompt gets exactly what it gets in a pass of
        its own (see `can_pack` for when they may share one)."""
        b = tokens.shape[0]
        h = self._hidden(tokens, positions, list(prompts))
        if prompts:
            ends = list(itertools.accumulate([b] + [p[0].shape[0] for p in prompts]))[1:]
            pick = torch.tensor(list(range(b)) + [e - 1 for e in ends], device=h.device)
            h = h[pick]
        if self.invariant:
            return self._linear(self.lm.lm_head.weight, self.lm.lm_head.bias, h)
        return self.lm.lm_head(h)

    def _none(self) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.slots.k[0].device
        return (torch.empty(0, dtype=torch.long, device=device),) * 2

    @torch.inference_mode()
    def prefill(self, embeds: torch.Tensor, row: int, all_logits: bool = False) -> torch.Tensor:
        """Prompt embeddings (n, hidden) into row `row`; logits of the last position (vocab,)
        or of every position (n, vocab)."""
        if all_logits:
            return self.lm.lm_head(self._hidden(*self._none(), [(embeds, row)]))
        return self.forward(*self._none(), [(embeds, row)])[0]

    def prefill_many(self, prompts: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
        """Prompts (embeddings, KV row) in one pass: logits of each last position (J, vocab)."""
        return self.forward(*self._none(), prompts)

    def prefill_chunk(self, embeds: torch.Tensor, row: int, offset: int) -> torch.Tensor:
        """Positions offset .. offset + n - 1 of a prompt whose earlier positions are already
        in row `row` (chunked prefill): logits of the chunk's last position (vocab,)."""
        return self.forward(*self._none(), [(embeds, row, offset)])[0]

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor,
                    longest: int | None = None) -> torch.Tensor:
        """One token for each of rows 0..b-1 at `positions` (b,) -> logits (b, vocab).
        `longest` is the largest position, when the caller knows it (saves a device sync)."""
        if self.graphs is not None:
            if longest is None:
                longest = int(positions.max())
            return self.graphs(tokens, positions, longest)
        return self.forward(tokens, positions)

    @torch.inference_mode()
    def static_decode(self, tokens: torch.Tensor, positions: torch.Tensor,
                      t: int) -> torch.Tensor:
        """A decode step over fixed shapes: rows 0..B-1, every row over `t` keys with its mask
        made on the device. Nothing is read back to the host and no tensor is allocated by
        shape from data, so the step can be captured once as a CUDA graph and replayed
        (`DecodeGraphs`). The KV rows must already hold `t` positions."""
        b = tokens.shape[0]
        self._step = _StepPlan([], t, self._mask(positions, t), None,
                               torch.arange(b, device=tokens.device), positions)
        self._spans = []
        self._lin = _plain
        x = self.body.embed_tokens(tokens)[None]  # (1, B, hidden)
        cos, sin = self.body.rotary_emb(x, positions[None])
        for i, layer in enumerate(self.layers):
            x = self._attend(layer, x, cos, sin, i)
        return self.lm.lm_head(_norm(self.body.norm, x)[0])
