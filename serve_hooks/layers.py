"""The engine's decoder layer for every RoPE family: one table of what each family's layer does.

`LAYERS` maps a family name (sae/families.py) to a `LayerSpec`: where its projections and norms
live inside an HF block and which variant of each step it computes. Sizes and switches a
checkpoint chooses (sliding window, soft-caps, rope theta per layer type) are read from its
config. The model runner computes every family with the same forward:

    x = pre_attn_norm(h)              (absent in OLMo-2)
    q, k, v = qkv(x)                  (one fused GEMM; Qwen2 adds a bias)
    q, k = qk_norm(q), qk_norm(k)     ("head": over head_dim (Qwen3, Gemma-3); "full": over the
                                       whole projection (OLMo-2))
    q, k = rope(q), rope(k)           (Gemma-3: theta per layer type; Phi-3 may rotate a prefix)
    a = o(attention(q, k, v))         (window on sliding layers; Gemma-2 soft-caps the logits)
    h = h + post_attn_norm(a)         (sandwich norms: Gemma-2/3, OLMo-2)
    m = down(act(gate(x')) * up(x'))  with x' = pre_mlp_norm(h)
    h = h + post_mlp_norm(m)

Gemma's RMSNorm scales by (1 + w) (`Family.norm_offset`, sae/families.py) and its embeddings by
√d_model; Gemma-2/3 may soft-cap the final logits. Adding a family is one `LayerSpec` entry
(plus its `Family` entry).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from sae.families import FAMILIES, Family, family_of


@dataclass(frozen=True)
class LayerSpec:
    """One family's decoder layer, as the engine computes it (attribute names inside a block)."""

    qkv: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")  # inside self_attn; one name: fused
    gate_up: tuple[str, ...] = ("gate_proj", "up_proj")  # inside mlp; one name: fused
    act: str = "act_fn"  # the MLP's activation module, inside mlp
    pre_attn_norm: str | None = "input_layernorm"
    post_attn_norm: str | None = None
    pre_mlp_norm: str | None = "post_attention_layernorm"
    post_mlp_norm: str | None = None
    qk_norm: Literal["none", "head", "full"] = "none"
    embed_scale: bool = False  # embeddings times √d_model
    # Which layers slide: "all" (config.sliding_window on every layer: Mistral, Phi-3) or
    # "layer_types" (layers typed "sliding_attention" in config.layer_types).
    window: Literal["all", "layer_types"] = "layer_types"
    rope_per_layer_type: bool = False  # the rotary module takes the layer type (Gemma-3)


_GEMMA = dict(
    post_attn_norm="post_attention_layernorm",
    pre_mlp_norm="pre_feedforward_layernorm",
    post_mlp_norm="post_feedforward_layernorm",
    embed_scale=True,
)

LAYERS: dict[str, LayerSpec] = {
    "llama": LayerSpec(),
    "mistral": LayerSpec(window="all"),
    "qwen2": LayerSpec(),
    "qwen3": LayerSpec(qk_norm="head"),
    "gemma2": LayerSpec(**_GEMMA),
    "gemma3": LayerSpec(**_GEMMA, qk_norm="head", rope_per_layer_type=True),
    "phi3": LayerSpec(
        qkv=("qkv_proj",), gate_up=("gate_up_proj",), act="activation_fn", window="all"
    ),
    "olmo2": LayerSpec(
        pre_attn_norm=None,
        post_attn_norm="post_attention_layernorm",
        pre_mlp_norm=None,
        post_mlp_norm="post_feedforward_layernorm",
        qk_norm="full",
    ),
}


def engine_spec(config: Any) -> tuple[Family, LayerSpec]:
    """An HF config's family and engine layer; a clear error for a family the engine can't serve."""
    family = family_of(config)
    if not family.engine or family.name not in LAYERS:
        served = ", ".join(f.name for f in FAMILIES.values() if f.engine and f.name in LAYERS)
        raise ValueError(
            f"greylens's engine does not serve the {family.name!r} family (it serves {served}); "
            "serve it with vLLM and the greylens vLLM plugin instead (docs/vllm_plugin.md)"
        )
    return family, LAYERS[family.name]


def sliding_windows(spec: LayerSpec, config: Any) -> list[int | None]:
    """Per layer: the attention window in tokens (a query sees itself and window - 1 before it),
    or None for full attention."""
    window = getattr(config, "sliding_window", None)
    n = config.num_hidden_layers
    if window is None:
        return [None] * n
    if spec.window == "all":
        return [int(window)] * n
    types = getattr(config, "layer_types", None) or ["full_attention"] * n
    return [int(window) if t == "sliding_attention" else None for t in types]


class Linear:
    """y = x Wᵀ + b with the weight prepacked for oneDNN on CPU (when torch has it), else F.linear.

    Decode steps multiply a few rows by every weight of the model, which makes them memory-bound;
    oneDNN's blocked weight layout streams the weights several times faster than `F.linear` on
    CPU. Results differ from `F.linear` in the last bits (another summation order); the
    greedy-equality tests against transformers hold with it."""

    BATCH_HINT = 16  # rows the packing is tuned for; any row count works

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        self.weight = weight.detach()
        self.bias = bias.detach() if bias is not None else None
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

    @classmethod
    def fused(cls, modules: list[torch.nn.Linear]) -> Linear:
        """One GEMM for several projections of the same input (q, k, v or gate, up)."""
        biases = [m.bias for m in modules]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat(
                [
                    b if b is not None else m.weight.new_zeros(m.out_features)
                    for m, b in zip(modules, biases, strict=True)
                ]
            )
        return cls(torch.cat([m.weight for m in modules]), bias)

    def __call__(self, x: Tensor) -> Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class RMSNorm:
    """torch's fused RMSNorm with an HF norm module's weight (plus the family's offset) and eps;
    bitwise equal to the HF module in fp32 for offset 0."""

    def __init__(self, norm: torch.nn.Module, offset: float) -> None:
        weight = norm.weight.detach()
        self.weight = weight + offset if offset else weight
        self.eps = getattr(norm, "variance_epsilon", None) or norm.eps

    def __call__(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


@dataclass
class LayerWeights:
    """One layer's weights, laid out for the engine's forward (norms None where absent)."""

    qkv: Linear
    o: Linear
    gate_up: Linear
    down: Linear
    act: torch.nn.Module
    pre_attn: RMSNorm | None
    post_attn: RMSNorm | None
    pre_mlp: RMSNorm | None
    post_mlp: RMSNorm | None
    q_norm: RMSNorm | None
    k_norm: RMSNorm | None
    window: int | None
    rope_type: str | None  # the layer type to ask the rotary module for (Gemma-3), else None
    scale: float  # attention logit scale (Gemma: query_pre_attn_scalar ** -0.5)
    softcap: float | None  # attention logit soft-cap (Gemma-2)


def layer_weights(
    family: Family, spec: LayerSpec, config: Any, layers: torch.nn.ModuleList
) -> list[LayerWeights]:
    windows = sliding_windows(spec, config)
    types = getattr(config, "layer_types", None)

    def norm(module: torch.nn.Module, name: str | None) -> RMSNorm | None:
        # the RMSNorm weight offset (Gemma's 1 + w) is a family fact: sae/families.py holds it
        return RMSNorm(getattr(module, name), family.norm_offset) if name else None

    out = []
    for index, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        has_qk = spec.qk_norm != "none"
        out.append(
            LayerWeights(
                qkv=Linear.fused([getattr(attn, n) for n in spec.qkv]),
                o=Linear(attn.o_proj.weight, attn.o_proj.bias),
                gate_up=Linear.fused([getattr(mlp, n) for n in spec.gate_up]),
                down=Linear(mlp.down_proj.weight, mlp.down_proj.bias),
                act=getattr(mlp, spec.act),
                pre_attn=norm(layer, spec.pre_attn_norm),
                post_attn=norm(layer, spec.post_attn_norm),
                pre_mlp=norm(layer, spec.pre_mlp_norm),
                post_mlp=norm(layer, spec.post_mlp_norm),
                q_norm=norm(attn, "q_norm" if has_qk else None),
                k_norm=norm(attn, "k_norm" if has_qk else None),
                window=windows[index],
                rope_type=types[index] if spec.rope_per_layer_type else None,
                scale=float(attn.scaling),
                softcap=getattr(config, "attn_logit_softcapping", None),
            )
        )
    return out


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of x [n, heads, head_dim] with cos/sin [n, rot_dim] (HF's rotate_half
    layout); a rot_dim below head_dim rotates the first rot_dim dims only (Phi-3's partial RoPE)."""
    rot = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    if rot == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat([x_rot * cos + _rotate_half(x_rot) * sin, x_pass], dim=-1)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
