"""The decoder forward over a flattened token batch with a paged KV cache, and hook points per
layer, for every RoPE family of the registry (serve_hooks.layers holds what each family's layer
computes).

One step runs every scheduled chunk together: the chunks' tokens are concatenated into one
[n_tokens] batch (`cu_seqlens_q` marks where each request's rows start), projections and MLPs
run on all rows at once, each new K/V row is written to its slot (block * block_size + offset),
and attention reads each request's blocks back from the pool: prefill chunks one request at a
time (causal within the chunk, full over the cached context before it), decode rows of all
requests in one padded call. Sliding-window layers mask keys older than their window. Weights are
the HF model's own tensors and its rotary module, so numerics follow transformers'.

Attached `EngineHook`s see the flattened batch once per layer at TransformerLens names
(`blocks.{L}.hook_resid_pre`, `hook_attn_out`, `hook_resid_mid`, `hook_mlp_out`,
`hook_resid_post`; for sandwich-norm families the attention / MLP outputs are taken after their
post-norm, as in sae.families), with a `StepContext` that maps rows to requests; a hook may
return a replacement tensor (steering).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel

from serve_hooks.attention import attend, decode_mask, prefill_mask
from serve_hooks.context import AttentionPlan, StepContext
from serve_hooks.engine_hook import EngineHook
from serve_hooks.kv_cache import KVCache
from serve_hooks.layers import LayerWeights, Linear, RMSNorm, apply_rope, engine_spec, layer_weights
from serve_hooks.sequence import Sequence

HOOK_POINTS = (
    "hook_resid_pre",
    "hook_attn_out",
    "hook_resid_mid",
    "hook_mlp_out",
    "hook_resid_post",
)


class ModelRunner:
    def __init__(
        self, hf_model: PreTrainedModel, kv: KVCache, hooks: list[EngineHook] | None = None
    ) -> None:
        config = hf_model.config
        self.family, spec = engine_spec(config)  # refuses families the engine does not serve
        self.model = hf_model.model  # the HF decoder (plain modules): embeddings, layers, rotary
        self.lm_head = hf_model.lm_head
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.kv = kv
        self.hooks = hooks if hooks is not None else []  # the engine's: attach() adds to it
        self.layers: list[LayerWeights] = layer_weights(
            self.family, spec, config, self.model.layers
        )
        self.qk_norm = spec.qk_norm
        embed = self.model.embed_tokens.weight  # [vocab, d_model]
        # Gemma scales embeddings by √d_model, rounded to the weights' dtype as transformers does.
        self.embed_scale = (
            torch.tensor(config.hidden_size**0.5, dtype=embed.dtype, device=embed.device)
            if spec.embed_scale
            else None
        )
        self.final_norm = RMSNorm(self.model.norm, self.family.norm_offset)
        self.final_softcap = getattr(config, "final_logit_softcapping", None)
        self.windows = sorted({w for w in (layer.window for layer in self.layers) if w})
        self.head = Linear(self.lm_head.weight)

    @property
    def device(self) -> torch.device:
        return self.kv.k.device

    def check_point(self, name: str) -> None:
        """Refuse a name that is not a hook point of this model."""
        layer, _, point = name.removeprefix("blocks.").partition(".")
        if not (
            name.startswith("blocks.")
            and layer.isdigit()
            and point in HOOK_POINTS
            and int(layer) < len(self.model.layers)
        ):
            raise ValueError(
                f"unknown engine hook point {name!r}; use blocks.L.<{'|'.join(HOOK_POINTS)}> "
                f"with L in 0..{len(self.model.layers) - 1}"
            )

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
        ctx = StepContext(
            [s for s, _ in scheduled],
            starts,
            as_tensor(cu),
            as_tensor(positions),
            as_tensor(slots),
            logit_seqs,
        )
        ctx.plan = self._plan(ctx, cu)
        return as_tensor(ids), ctx

    def _plan(self, ctx: StepContext, cu: list[int]) -> AttentionPlan:
        windows: list[int | None] = [None, *self.windows]
        decodes = [i for i in range(len(ctx.seqs)) if cu[i + 1] - cu[i] == 1 and ctx.starts[i] > 0]
        prefills, prefill_masks = [], {w: [] for w in windows}
        for i in sorted(set(range(len(ctx.seqs))) - set(decodes)):
            q_len, start = cu[i + 1] - cu[i], ctx.starts[i]
            prefills.append((cu[i], cu[i + 1], self._context_slots(ctx.seqs[i], start + q_len)))
            for w in windows:
                prefill_masks[w].append(prefill_mask(start, q_len, w, self.device))
        if not decodes:
            return AttentionPlan(prefills, prefill_masks, None, None, {})
        lengths = [ctx.starts[i] + 1 for i in decodes]
        slots = torch.zeros(len(decodes), max(lengths), dtype=torch.long, device=self.device)
        for row, i in enumerate(decodes):
            slots[row, : lengths[row]] = self._context_slots(ctx.seqs[i], lengths[row])
        as_tensor = torch.tensor(lengths, device=self.device)
        masks = {w: decode_mask(as_tensor, max(lengths), w) for w in windows}
        rows = torch.tensor([cu[i] for i in decodes], device=self.device)
        return AttentionPlan(prefills, prefill_masks, rows, slots, masks)

    def _context_slots(self, seq: Sequence, length: int) -> Tensor:
        bs = self.kv.block_size
        blocks = torch.tensor(seq.block_table[: (length + bs - 1) // bs], device=self.device)
        return (blocks[:, None] * bs + torch.arange(bs, device=self.device)).flatten()[:length]

    # ------------------------------------------------------------------ forward

    @torch.inference_mode()
    def forward(self, ids: Tensor, ctx: StepContext) -> Tensor:
        """Logits [len(ctx.logit_seqs), vocab] for the last row of each finishing chunk."""
        h = F.embedding(ids, self.model.embed_tokens.weight)  # [n_tokens, d_model]
        if self.embed_scale is not None:
            h = h * self.embed_scale
        rope = self._rope(h, ctx.positions)
        for index, layer in enumerate(self.layers):
            h = self._hook(index, "hook_resid_pre", h, ctx)
            x = layer.pre_attn(h) if layer.pre_attn else h
            attn = layer.o(self._attention(index, x, *rope[layer.rope_type], ctx))
            attn = layer.post_attn(attn) if layer.post_attn else attn
            attn = self._hook(index, "hook_attn_out", attn, ctx)
            h = self._hook(index, "hook_resid_mid", h + attn, ctx)
            x = layer.pre_mlp(h) if layer.pre_mlp else h
            gate, up = layer.gate_up(x).chunk(2, dim=-1)
            mlp = layer.down(layer.act(gate) * up)
            mlp = layer.post_mlp(mlp) if layer.post_mlp else mlp
            mlp = self._hook(index, "hook_mlp_out", mlp, ctx)
            h = self._hook(index, "hook_resid_post", h + mlp, ctx)
        last_rows = ctx.cu_seqlens_q[1:][ctx.logit_seqs] - 1
        logits = self.head(self.final_norm(h[last_rows])).float()
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def _rope(self, h: Tensor, positions: Tensor) -> dict[str | None, tuple[Tensor, Tensor]]:
        """cos, sin [n_tokens, rot_dim] per rope type the layers ask for (None: the only one)."""
        out = {}
        for rope_type in {layer.rope_type for layer in self.layers}:
            extra = () if rope_type is None else (rope_type,)
            cos, sin = self.model.rotary_emb(h, positions[None], *extra)
            out[rope_type] = (cos[0], sin[0])
        return out

    def _hook(self, layer: int, point: str, value: Tensor, ctx: StepContext) -> Tensor:
        if not self.hooks:
            return value
        name = f"blocks.{layer}.{point}"
        for hook in self.hooks:
            if name in hook.points:
                replaced = hook.on_layer(name, value, ctx)
                if replaced is not None:
                    value = replaced
        return value

    def _attention(
        self, index: int, x: Tensor, cos: Tensor, sin: Tensor, ctx: StepContext
    ) -> Tensor:
        layer, n, hd = self.layers[index], x.shape[0], self.head_dim
        q, k, v = layer.qkv(x).split([self.n_heads * hd, self.n_kv * hd, self.n_kv * hd], dim=-1)
        if self.qk_norm == "full":  # OLMo-2: over the whole projection, before the head split
            q, k = layer.q_norm(q), layer.k_norm(k)
        q, k = q.view(n, self.n_heads, hd), k.view(n, self.n_kv, hd)
        if self.qk_norm == "head":  # Qwen3, Gemma-3: over each head's dims
            q, k = layer.q_norm(q), layer.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_pool = self.kv.k[index].view(-1, self.n_kv, hd)  # [num_blocks * block_size, n_kv, hd]
        v_pool = self.kv.v[index].view(-1, self.n_kv, hd)
        k_pool[ctx.slots] = k
        v_pool[ctx.slots] = v.view(n, self.n_kv, hd)
        out = torch.empty_like(q)  # [n_tokens, n_heads, hd]
        plan, scale, cap = ctx.plan, layer.scale, layer.softcap
        # 4-D inputs: 3-D ones miss the fused CPU kernel (several times slower).
        masks = plan.prefill_masks[layer.window]
        for (start, end, slots), mask in zip(plan.prefills, masks, strict=True):
            keys = k_pool[slots].transpose(0, 1)[None]  # [1, n_kv, ctx, hd]
            values = v_pool[slots].transpose(0, 1)[None]
            query = q[start:end].transpose(0, 1)[None]  # [1, n_heads, q_len, hd]
            out[start:end] = attend(query, keys, values, mask, scale, cap)[0].transpose(0, 1)
        if plan.decode_rows is not None:
            keys = k_pool[plan.decode_slots].transpose(1, 2)  # [n_decode, n_kv, longest, hd]
            values = v_pool[plan.decode_slots].transpose(1, 2)
            query = q[plan.decode_rows][:, :, None]  # [n_decode, n_heads, 1, hd]
            mask = plan.decode_masks[layer.window]
            out[plan.decode_rows] = attend(query, keys, values, mask, scale, cap)[:, :, 0]
        return out.view(n, -1)
