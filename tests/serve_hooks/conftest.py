"""Engine fixtures: a tiny Llama whose greedy outputs vary (the default tiny model just repeats
its last token, which would make every equality test trivially true) and HF reference outputs."""

from __future__ import annotations

import copy

import pytest
import torch

from sae.models import LoadedModel, load_model


@pytest.fixture(scope="session")
def lively() -> LoadedModel:
    model = load_model("tiny")  # its own copy: the shared `tiny` fixture stays untouched
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.fast.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for linear in (
                attn.q_proj,
                attn.k_proj,
                attn.v_proj,
                attn.o_proj,
                mlp.gate_proj,
                mlp.up_proj,
                mlp.down_proj,
            ):
                linear.weight.normal_(0, linear.weight.shape[1] ** -0.5, generator=generator)
    return model


def hf_greedy(model: LoadedModel, prompt: list[int], n: int) -> list[int]:
    """transformers' own greedy `generate`, exactly n tokens (EOS does not stop it: ignore_eos)."""
    config = copy.deepcopy(model.fast.generation_config)
    never = model.fast.config.vocab_size  # an id no step can produce (None would fall back to EOS)
    config.eos_token_id = config.pad_token_id = never
    out = model.fast.generate(
        torch.tensor([prompt]), generation_config=config, max_new_tokens=n, do_sample=False
    )
    assert out.shape[1] == len(prompt) + n, "the reference stopped early"
    return out[0, len(prompt) :].tolist()


def prompts(n: int, seed: int = 0, shared: int = 0, vocab: int = 500) -> list[list[int]]:
    """n random prompts of 3-40 tokens; the first `shared` tokens are common to all."""
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(3, vocab, (shared,), generator=g).tolist()
    return [
        head
        + torch.randint(
            3, vocab, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g
        ).tolist()
        for _ in range(n)
    ]
