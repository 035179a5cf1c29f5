"""Llama forward over a flattened token batch with a paged KV cache, and hook points per layer.

One step runs every scheduled chunk together: the chunks' tokens are concatenated into one
[n_tokens] batch (`cu_seqlens_q` marks where each request's rows start), projections and MLPs
run on all rows at once, each new K/V row is written to its slot (block * block_size + offset),
and attention reads each request's blocks back from the pool: prefill chunks one request at a
time (causal within the chunk, full over the cached context before it), decode rows of all
requests in one padded call. Weights are the HF model's own modules (RMSNorm, projections, MLP,
rotary embedding), so numerics follow transformers'.

Hooks see the flattened batch once per layer at TransformerLens names (`blocks.{L}.hook_resid_pre`,
`hook_attn_out`, `hook_resid_mid`, `hook_mlp_out`, `hook_resid_post`), with a `StepContext` that
maps rows to requests; a hook may return a replacement tensor (steering).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from serve_hooks.kv_cache import KVCache
from serve_hooks.sequence import Sequence

HOOK_POINTS = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")
Hook = Callable[[Tensor, "StepContext"], Tensor | None]


@dataclass
class StepContext:
    """What one step computes: rows [cu_seqlens_q[i], cu_seqlens_q[i + 1]) belong to seqs[i]."""

    seqs: list[Sequence]
    starts: list[int]  # first computed position of each request's chunk
    cu_seqlens_q: Tensor  # [n_seqs + 1] int64
    positions: Tensor  # [n_tokens] int64
    slots: Tensor  # [n_tokens] int64 KV slot of each row
    logit_seqs: list[int]  # indices into seqs whose last row yields logits (chunk ends the sequence)

    @property
    def n_tokens(self) -> int:
        return int(self.cu_seqlens_q[-1])


class ModelRunner:
    def __init__(self, hf_model, kv: KVCache) -> None:
        self.model = hf_model.model  # LlamaModel (plain HF modules)
        self.lm_head = hf_model.lm_head
        config = hf_model.config
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.kv = kv
        self.hooks: dict[str, list[Hook]] = {}

    @property
    def device(self) -> torch.device:
        return self.kv.k.device

    def add_hook(self, name: str, hook: Hook) -> Callable[[], None]:
        layer, _, point = name.removeprefix("blocks.").partition(".")
        if not (name.startswith("blocks.") and layer.isdigit() and point in HOOK_POINTS
                and int(layer) < len(self.model.layers)):  # fmt: skip
            raise ValueError(f"unknown engine hook point {name!r}; use blocks.L.<{'|'.join(HOOK_POINTS)}> "
                             f"with L in 0..{len(self.model.layers) - 1}")  # fmt: skip
        self.hooks.setdefault(name, []).append(hook)
        return lambda: self.hooks[name].remove(hook)

    # ------------------------------------------------------------------ batch

    def prepare(self, scheduled: list[tuple[Sequence, int]]) -> tuple[Tensor, StepContext]:
        bs = self.kv.block_size
        ids, positions, slots, cu, starts, logit_seqs = [], [], [], [0], [], []
        for i, (seq, n) in enumerate(scheduled):
            start = seq.num_computed
            span = range(start, start + n)
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(span)
            slots.extend(seq.block_table[p // bs] * bs + p % bs for p in span)
            cu.append(cu[-1] + n)
            starts.append(start)
            if start + n == seq.num_tokens:
                logit_seqs.append(i)
        as_tensor = lambda x: torch.tensor(x, dtype=torch.long, device=self.device)  # noqa: E731
        ctx = StepContext([s for s, _ in scheduled], starts, as_tensor(cu), as_tensor(positions), as_tensor(slots), logit_seqs)
        return as_tensor(ids), ctx

    # ------------------------------------------------------------------ forward

    @torch.inference_mode()
    def forward(self, ids: Tensor, ctx: StepContext) -> Tensor:
        """Logits [len(ctx.logit_seqs), vocab] for the last row of each finishing chunk."""
        h = self.model.embed_tokens(ids)  # [n_tokens, d_model]
        cos, sin = self.model.rotary_emb(h, ctx.positions[None])
        for index, layer in enumerate(self.model.layers):
            h = self._hook(index, "hook_resid_pre", h, ctx)
            x = layer.input_layernorm(h)
            attn = layer.self_attn.o_proj(self._attention(layer.self_attn, index, x, cos[0], sin[0], ctx))
            attn = self._hook(index, "hook_attn_out", attn, ctx)
            h = self._hook(index, "hook_resid_mid", h + attn, ctx)
            mlp = self._hook(index, "hook_mlp_out", layer.mlp(layer.post_attention_layernorm(h)), ctx)
            h = self._hook(index, "hook_resid_post", h + mlp, ctx)
        last_rows = ctx.cu_seqlens_q[1:][ctx.logit_seqs] - 1
        return self.lm_head(self.model.norm(h[last_rows])).float()

    def _hook(self, layer: int, point: str, value: Tensor, ctx: StepContext) -> Tensor:
        for hook in self.hooks.get(f"blocks.{layer}.{point}", ()):
            replaced = hook(value, ctx)
            if replaced is not None:
                value = replaced
        return value

    def _attention(self, attn, layer: int, x: Tensor, cos: Tensor, sin: Tensor, ctx: StepContext) -> Tensor:
        n = x.shape[0]
        q = attn.q_proj(x).view(n, self.n_heads, self.head_dim)
        k = attn.k_proj(x).view(n, self.n_kv, self.head_dim)
        v = attn.v_proj(x).view(n, self.n_kv, self.head_dim)
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
        k_pool = self.kv.k[layer].view(-1, self.n_kv, self.head_dim)  # [num_blocks * block_size, n_kv, hd]
        v_pool = self.kv.v[layer].view(-1, self.n_kv, self.head_dim)
        k_pool[ctx.slots] = k
        v_pool[ctx.slots] = v
        out = torch.empty_like(q)  # [n_tokens, n_heads, hd]
        cu = ctx.cu_seqlens_q.tolist()
        decodes = [i for i in range(len(ctx.seqs)) if cu[i + 1] - cu[i] == 1 and ctx.starts[i] > 0]
        for i in sorted(set(range(len(ctx.seqs))) - set(decodes)):
            out[cu[i] : cu[i + 1]] = self._prefill_attention(q[cu[i] : cu[i + 1]], k_pool, v_pool, ctx, i, attn.scaling)
        if decodes:
            rows = torch.tensor([cu[i] for i in decodes], device=q.device)
            out[rows] = self._decode_attention(q[rows], k_pool, v_pool, ctx, decodes, attn.scaling)
        return out.view(n, -1)

    def _context_slots(self, seq: Sequence, length: int) -> Tensor:
        bs = self.kv.block_size
        blocks = torch.tensor(seq.block_table[: (length + bs - 1) // bs], device=self.device)
        return (blocks[:, None] * bs + torch.arange(bs, device=self.device)).flatten()[:length]

    def _prefill_attention(self, q: Tensor, k_pool, v_pool, ctx: StepContext, i: int, scale: float) -> Tensor:
        q_len, start = q.shape[0], ctx.starts[i]
        slots = self._context_slots(ctx.seqs[i], start + q_len)
        k, v = k_pool[slots].transpose(0, 1), v_pool[slots].transpose(0, 1)  # [n_kv, ctx, hd]
        if start == 0:
            out = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:  # query j sits at position start + j and sees keys 0..start + j
            mask = torch.arange(start + q_len, device=q.device)[None] <= (start + torch.arange(q_len, device=q.device))[:, None]
            out = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        return out.transpose(0, 1)  # [q_len, n_heads, hd]

    def _decode_attention(self, q: Tensor, k_pool, v_pool, ctx: StepContext, seqs: list[int], scale: float) -> Tensor:
        lengths = [ctx.starts[i] + 1 for i in seqs]
        longest = max(lengths)
        slots = torch.zeros(len(seqs), longest, dtype=torch.long, device=q.device)
        for row, (i, length) in enumerate(zip(seqs, lengths, strict=True)):
            slots[row, :length] = self._context_slots(ctx.seqs[i], length)
        mask = torch.arange(longest, device=q.device)[None] < torch.tensor(lengths, device=q.device)[:, None]
        k, v = k_pool[slots].transpose(1, 2), v_pool[slots].transpose(1, 2)  # [B, n_kv, longest, hd]
        out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask[:, None, None], scale=scale, enable_gqa=True)
        return out[:, :, 0]  # [B, n_heads, hd]
