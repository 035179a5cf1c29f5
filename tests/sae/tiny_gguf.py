"""A tiny Llama written as a GGUF file (F32, the gguf package's writer), for the GGUF model route.

The layout is llama.cpp's: its tensor names, Q and K rows permuted the way llama.cpp's converter
does (transformers undoes it on load) and a GPT-2 style BPE vocabulary. Loaded back by transformers
it gives tiny-llama's logits and token ids exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import torch

from sae.tiny import build_tiny

_BLOCK_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _llama_cpp_permute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's rotary layout of a Q/K projection [n_heads * head_dim, d_model]."""
    return (
        weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_tiny_llama_gguf(path: Path) -> None:
    hf, tokenizer, _ = build_tiny("tiny-llama")
    c = hf.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    _add_tokenizer(writer, tokenizer)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
    }
    for layer in range(c.num_hidden_layers):
        for ours, theirs in _BLOCK_TENSORS.items():
            names[f"model.layers.{layer}.{ours}.weight"] = f"blk.{layer}.{theirs}.weight"
    state = hf.state_dict()  # lm_head is tied to the embedding: not written
    for ours, theirs in names.items():
        tensor = state[ours].float()
        if theirs.endswith("attn_q.weight"):
            tensor = _llama_cpp_permute(tensor, c.num_attention_heads)
        elif theirs.endswith("attn_k.weight"):
            tensor = _llama_cpp_permute(tensor, c.num_key_value_heads)
        writer.add_tensor(theirs, tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer) -> None:
    tokens = [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    special = set(tokenizer.all_special_tokens)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control, 1: normal
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_add_bos_token(True)
