"""The family registry: how each decoder-only architecture maps onto hook points and the engine.

A family is one `Family` entry. It names where a Hugging Face `*ForCausalLM` keeps its blocks,
attention, MLP and norms, which module's output is what a block adds to its residual stream (for
sandwich-norm families that is the post-norm, not the attention itself), whether attention and
MLP run in parallel, and whether greylens's own engine serves it. Everything else (hook capture,
harvest, the engine's layer, the tiny test models, the conformance tests) reads the entry, so a new
family is one entry here plus the shared conformance tests passing.

TransformerLens hook points per block `blocks.{L}.…`, as greylens computes them:

    hook_resid_pre    the block's input
    hook_attn_out     what attention adds to the residual (after a post-attention norm if any)
    hook_resid_mid    hook_resid_pre + hook_attn_out (sequential families only)
    mlp.hook_in       the MLP's input (after its pre-norm): a transcoder's input
    hook_mlp_out      what the MLP adds to the residual (after a post-MLP norm if any)
    hook_resid_post   the block's output
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

# Every tiny model shares these sizes (small enough for a test to build one in well under a second).
TINY_LAYERS, TINY_D_MODEL, TINY_N_CTX = 3, 64, 256
TINY_HEADS, TINY_KV_HEADS = 4, 2  # GQA, as in SmolLM2 (9 heads, 3 KV heads)


@dataclass(frozen=True)
class Family:
    """How one architecture maps to hook points and the engine (paths are attribute paths)."""

    name: str  # the registry key: tiny models are `tiny-<name>`
    model_types: tuple[str, ...]  # the HF `config.model_type` values it covers
    config_class: str  # the transformers config class its tiny model is built from
    layers: str = "model.layers"  # from the *ForCausalLM to the list of blocks
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    attn: str = "self_attn"  # inside a block
    mlp: str = "mlp"
    # The block module whose output is what attention / the MLP adds to the residual stream;
    # None: the attention (first output) / MLP module itself.
    attn_out: str | None = None
    mlp_out: str | None = None
    # Attention and MLP both read hook_resid_pre (GPT-NeoX / Pythia): no hook_resid_mid. The
    # value is the config attribute that switches it, or True for always.
    parallel: str | bool = False
    engine: bool = True  # greylens's engine serves it natively (else: the vLLM plugin)
    # The final norm: RMSNorm, or LayerNorm (centres, then scales; GPT-2, GPT-NeoX). Gemma's
    # RMSNorm multiplies by (1 + weight): norm_offset 1.0.
    norm: Literal["rms", "layer"] = "rms"
    norm_offset: float = 0.0
    # Used as BOS when the tokenizer has none (Qwen's tokenizers ship without one).
    bos_fallback: str | None = None
    tiny: dict[str, Any] = field(default_factory=dict)  # config fields of its tiny model

    def is_parallel(self, config: Any) -> bool:
        if isinstance(self.parallel, bool):
            return self.parallel
        return bool(getattr(config, self.parallel, False))

    def blocks(self, hf: torch.nn.Module) -> torch.nn.ModuleList:
        return _get(hf, self.layers)

    def hook_points(self, config: Any) -> tuple[str, ...]:
        """The per-block hook points (`blocks.{L}.<point>`) a model of this family has."""
        if self.is_parallel(config):
            return tuple(p for p in BLOCK_POINTS if p != "hook_resid_mid")
        return BLOCK_POINTS

    def point_module(self, block: torch.nn.Module, point: str) -> torch.nn.Module:
        """The block submodule whose output (input, for mlp.hook_in) is `point`."""
        paths = {
            "hook_attn_out": self.attn_out or self.attn,
            "hook_mlp_out": self.mlp_out or self.mlp,
            "mlp.hook_in": self.mlp,
        }
        return _get(block, paths[point])

    def final_norm_module(self, hf: torch.nn.Module) -> torch.nn.Module:
        return _get(hf, self.final_norm)

    def readout(self, hf: Any) -> Readout:
        """The final norm and unembedding of `hf`, for direct (logit-lens) effects."""
        norm = self.final_norm_module(hf)
        eps = next(getattr(norm, a) for a in ("eps", "variance_epsilon") if hasattr(norm, a))
        W_U = hf.get_output_embeddings().weight  # [vocab, d_model]
        cap = getattr(hf.config, "final_logit_softcapping", None)
        return Readout(norm.weight.float() + self.norm_offset, W_U, self.norm == "layer", eps, cap)


# Per-block hook points in forward order (see the module docstring).
BLOCK_POINTS: tuple[str, ...] = (
    "hook_resid_pre",
    "hook_attn_out",
    "hook_resid_mid",
    "mlp.hook_in",
    "hook_mlp_out",
    "hook_resid_post",
)


@dataclass(frozen=True)
class Readout:
    """Final norm + unembedding, linearised: a residual direction d's direct effect on the logits
    at a token whose final residual is x is `project(d) @ W_U.T / scale(x)` (the norm's
    per-token divisor held fixed, its bias and any logit soft-cap left out: they do not depend
    on d, or only monotonically)."""

    gain: torch.Tensor  # [d_model] the norm's effective weight
    W_U: torch.Tensor  # [vocab, d_model]
    centred: bool  # LayerNorm subtracts the mean first
    eps: float
    softcap: float | None  # final logits = softcap * tanh(logits / softcap) (Gemma 2/3)

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d] final residuals -> [...] the norm's divisor (RMS, or std for LayerNorm)."""
        x = x.float()
        if self.centred:
            x = x - x.mean(-1, keepdim=True)
        return (x.pow(2).mean(-1) + self.eps).sqrt()

    def project(self, directions: torch.Tensor) -> torch.Tensor:
        """[..., d] residual directions -> [..., d] what the unembedding sees (before / scale)."""
        directions = directions.float()
        if self.centred:
            directions = directions - directions.mean(-1, keepdim=True)
        return directions * self.gain.to(directions.device)

    def cap(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply the family's final-logit soft-cap (identity for most families)."""
        if self.softcap is None:
            return logits
        return self.softcap * torch.tanh(logits / self.softcap)


def _get(module: Any, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part)
    return module


_SANDWICH = dict(attn_out="post_attention_layernorm", mlp_out="post_feedforward_layernorm")
_LAYERNORM = dict(norm="layer", engine=False)
# Tiny sliding windows and soft-caps small enough that the tests' prompts cross them.
_GEMMA_TINY = dict(
    head_dim=16,
    query_pre_attn_scalar=16,
    sliding_window=8,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("llama", ("llama",), "LlamaConfig"),
        Family("mistral", ("mistral",), "MistralConfig", tiny=dict(sliding_window=None)),
        Family(
            "qwen2",
            ("qwen2",),
            "Qwen2Config",
            bos_fallback="<|endoftext|>",
            tiny=dict(use_sliding_window=False),
        ),
        Family(
            "qwen3",
            ("qwen3",),
            "Qwen3Config",
            bos_fallback="<|endoftext|>",
            tiny=dict(head_dim=16, use_sliding_window=False),
        ),
        Family(
            "gemma2",
            ("gemma2",),
            "Gemma2Config",
            **_SANDWICH,
            norm_offset=1.0,
            tiny=dict(_GEMMA_TINY, attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
        ),
        Family(
            "gemma3",
            ("gemma3_text",),
            "Gemma3TextConfig",
            **_SANDWICH,
            norm_offset=1.0,
            tiny=dict(_GEMMA_TINY, final_logit_softcapping=3.0),
        ),
        Family("phi3", ("phi3",), "Phi3Config", tiny=dict(pad_token_id=0)),
        Family("olmo2", ("olmo2",), "Olmo2Config", **_SANDWICH),
        Family(
            "gpt2",
            ("gpt2",),
            "GPT2Config",
            layers="transformer.h",
            embed="transformer.wte",
            final_norm="transformer.ln_f",
            attn="attn",
            **_LAYERNORM,
        ),
        Family(
            "gpt_neox",
            ("gpt_neox",),
            "GPTNeoXConfig",
            layers="gpt_neox.layers",
            embed="gpt_neox.embed_in",
            final_norm="gpt_neox.final_layer_norm",
            attn="attention",
            parallel="use_parallel_residual",
            **_LAYERNORM,
        ),
    )
}


def family_named(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; greylens knows {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of(config: Any) -> Family:
    """The family of a transformers config, by its `model_type`; a clear error for others."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    known = ", ".join(t for f in FAMILIES.values() for t in f.model_types)
    raise ValueError(
        f"model_type {model_type!r} is not a family greylens supports (it knows: {known}); "
        "adding one is one `Family` entry in sae/families.py plus the conformance tests "
        "(tests/sae/test_families.py)"
    )


def tiny_config(family: Family, vocab_size: int, bos: int, eos: int) -> Any:
    """A small random-init config of `family` (TINY_* sizes) for tests and quick tries."""
    import transformers

    config_class = getattr(transformers, family.config_class)
    if family.name == "gpt2":
        sizes = dict(n_embd=TINY_D_MODEL, n_layer=TINY_LAYERS, n_head=TINY_HEADS)
        sizes |= dict(n_positions=TINY_N_CTX, n_inner=4 * TINY_D_MODEL)
    else:
        sizes = dict(
            hidden_size=TINY_D_MODEL,
            intermediate_size=4 * TINY_D_MODEL,
            num_hidden_layers=TINY_LAYERS,
            num_attention_heads=TINY_HEADS,
            num_key_value_heads=TINY_KV_HEADS,
            max_position_embeddings=TINY_N_CTX,
        )
        if family.name == "gpt_neox":
            sizes.pop("num_key_value_heads")  # GPT-NeoX has no GQA
    config = config_class(
        vocab_size=vocab_size,
        bos_token_id=bos,
        eos_token_id=eos,
        tie_word_embeddings=family.name not in ("gpt_neox",),
        **sizes,
        **family.tiny,
    )
    return config
