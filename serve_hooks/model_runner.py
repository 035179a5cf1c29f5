"""Llama forward over a flattened token batch with a paged KV cache, and hook points per layer.

One step runs every scheduled chunk together: the chunks' tokens are concatenated into one
[n_tokens] batch (`cu_seqlens_q` marks where each request's rows start), projections and MLPs
run on all rows at once, each new K/V row is written to its slot (block * block_size + offset),
and attention reads each request's blocks back from the pool: prefill chunks one request at a
time (causal within the chunk, full over the cached context before it), decode rows of all
requests in one padded call. Weights are the HF model's own modules (RMSNorm, projections, MLP,
rotary embedding), so numerics follow transformers'.

Attached `EngineHook`s see the flattened batch once per layer at TransformerLens names
(`blocks.{L}.hook_resid_pre`, `hook_attn_out`, `hook_resid_mid`, `hook_mlp_out`,
`hook_resid_post`), with a `StepContext` that maps rows to requests; a hook may return a
replacement tensor (steering).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from serve_hooks.context import AttentionPlan, StepContext
from serve_hooks.engine_hook import EngineHook
from serve_hooks.kv_cache import KVCache
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
        self.model = hf_model.model  # LlamaModel (plain HF modules)
        self.lm_head = hf_model.lm_head
        config = hf_model.config
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.kv = kv
        self.hooks = hooks if hooks is not None else []  # the engine's: attach() adds to it
        # One GEMM for q, k, v and one for gate, up: fewer, larger matmuls per layer.
        layers = self.model.layers
        self.qkv = [
            Linear(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
            for a in self._attns()
        ]
        self.o = [Linear(layer.self_attn.o_proj.weight) for layer in layers]
        self.gate_up = [
            Linear(torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]))
            for layer in layers
        ]
        self.down = [Linear(layer.mlp.down_proj.weight) for layer in layers]
        self.head = Linear(self.lm_head.weight)

    def _attns(self) -> list[torch.nn.Module]:
        return [layer.self_attn for layer in self.model.layers]

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
        decodes = [i for i in range(len(ctx.seqs)) if cu[i + 1] - cu[i] == 1 and ctx.starts[i] > 0]
        prefills = []
        for i in sorted(set(range(len(ctx.seqs))) - set(decodes)):
            q_len, start = cu[i + 1] - cu[i], ctx.starts[i]
            mask = None  # a chunk from position 0 is plainly causal
            if start > 0:  # query j sits at position start + j and sees keys 0..start + j
                mask = (
                    torch.arange(start + q_len, device=self.device)[None]
                    <= (start + torch.arange(q_len, device=self.device))[:, None]
                )
            prefills.append(
                (cu[i], cu[i + 1], self._context_slots(ctx.seqs[i], start + q_len), mask)
            )
        if not decodes:
            return AttentionPlan(prefills, None, None, None)
        lengths = torch.tensor([ctx.starts[i] + 1 for i in decodes], device=self.device)
        slots = torch.zeros(len(decodes), int(lengths.max()), dtype=torch.long, device=self.device)
        for row, i in enumerate(decodes):
            slots[row, : int(lengths[row])] = self._context_slots(ctx.seqs[i], int(lengths[row]))
        mask = torch.arange(slots.shape[1], device=self.device)[None] < lengths[:, None]
        rows = torch.tensor([cu[i] for i in decodes], device=self.device)
        return AttentionPlan(prefills, rows, slots, mask[:, None, None])

    def _context_slots(self, seq: Sequence, length: int) -> Tensor:
        bs = self.kv.block_size
        blocks = torch.tensor(seq.block_table[: (length + bs - 1) // bs], device=self.device)
        return (blocks[:, None] * bs + torch.arange(bs, device=self.device)).flatten()[:length]

    # ------------------------------------------------------------------ forward

    @torch.inference_mode()
    def forward(self, ids: Tensor, ctx: StepContext) -> Tensor:
        """Logits [len(ctx.logit_seqs), vocab] for the last row of each finishing chunk."""
        h = self.model.embed_tokens(ids)  # [n_tokens, d_model]
        cos, sin = self.model.rotary_emb(h, ctx.positions[None])
        for index, layer in enumerate(self.model.layers):
            h = self._hook(index, "hook_resid_pre", h, ctx)
            x = _rms_norm(layer.input_layernorm, h)
            attn = self.o[index](self._attention(index, x, cos[0], sin[0], ctx))
            attn = self._hook(index, "hook_attn_out", attn, ctx)
            h = self._hook(index, "hook_resid_mid", h + attn, ctx)
            gate, up = self.gate_up[index](_rms_norm(layer.post_attention_layernorm, h)).chunk(
                2, dim=-1
            )
            mlp = self.down[index](layer.mlp.act_fn(gate) * up)
            mlp = self._hook(index, "hook_mlp_out", mlp, ctx)
            h = self._hook(index, "hook_resid_post", h + mlp, ctx)
        last_rows = ctx.cu_seqlens_q[1:][ctx.logit_seqs] - 1
        return self.head(_rms_norm(self.model.norm, h[last_rows])).float()

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
        self, layer: int, x: Tensor, cos: Tensor, sin: Tensor, ctx: StepContext
    ) -> Tensor:
        n, hd, scale = x.shape[0], self.head_dim, self.model.layers[layer].self_attn.scaling
        q, k, v = self.qkv[layer](x).split(
            [self.n_heads * hd, self.n_kv * hd, self.n_kv * hd], dim=-1
        )
        q, k = apply_rotary_pos_emb(
            q.view(n, self.n_heads, hd), k.view(n, self.n_kv, hd), cos, sin, unsqueeze_dim=1
        )
        k_pool = self.kv.k[layer].view(-1, self.n_kv, hd)  # [num_blocks * block_size, n_kv, hd]
        v_pool = self.kv.v[layer].view(-1, self.n_kv, hd)
        k_pool[ctx.slots] = k
        v_pool[ctx.slots] = v.view(n, self.n_kv, hd)
        out = torch.empty_like(q)  # [n_tokens, n_heads, hd]
        plan = ctx.plan
        # 4-D inputs: 3-D ones miss the fused CPU kernel (several times slower).
        for start, end, slots, mask in plan.prefills:
            keys = k_pool[slots].transpose(0, 1)[None]  # [1, n_kv, ctx, hd]
            values = v_pool[slots].transpose(0, 1)[None]
            out[start:end] = F.scaled_dot_product_attention(
                q[start:end].transpose(0, 1)[None],
                keys,
                values,
                attn_mask=mask,
                is_causal=mask is None,
                scale=scale,
                enable_gqa=True,
            )[0].transpose(0, 1)
        if plan.decode_rows is not None:
            keys = k_pool[plan.decode_slots].transpose(1, 2)  # [n_decode, n_kv, longest, hd]
            values = v_pool[plan.decode_slots].transpose(1, 2)
            out[plan.decode_rows] = F.scaled_dot_product_attention(
                q[plan.decode_rows][:, :, None],
                keys,
                values,
                attn_mask=plan.decode_mask,
                scale=scale,
                enable_gqa=True,
            )[:, :, 0]
        return out.view(n, -1)


def _rms_norm(norm: torch.nn.Module, x: Tensor) -> Tensor:
    """torch's fused RMSNorm with the HF module's weight and epsilon (bitwise equal in fp32)."""
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


class Linear:
    """y = x Wᵀ with the weight prepacked for oneDNN on CPU (when torch has it), else F.linear.

    Decode steps multiply a few rows by every weight of the model, which makes them memory-bound;
    oneDNN's blocked weight layout streams the weights several times faster than `F.linear` on
    CPU. Results differ from `F.linear` in the last bits (another summation order); the
    greedy-equality tests against transformers hold with it."""

    BATCH_HINT = 16  # rows the packing is tuned for; any row count works

    def __init__(self, weight: Tensor) -> None:
        self.weight = weight.detach()
        self.packed = None
        if (
            weight.device.type == "cpu"
            and weight.dtype == torch.float32
            and torch.backends.mkldnn.is_available()
        ):
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, self.BATCH_HINT)
            except (RuntimeError, AttributeError):  # a torch without these ops: plain GEMM
                self.packed = None

    def __call__(self, x: Tensor) -> Tensor:
        if self.packed is None:
            return F.linear(x, self.weight)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
