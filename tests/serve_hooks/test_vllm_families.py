"""The vLLM plugin on every family: its layer table agrees with sae/families.py, it finds the
decoder layers and reads the residual stream in both output forms (HF tiny models, no vLLM), and —
with the vLLM side venv — vLLM serving tiny GPT-2 / GPT-NeoX writes the features greylens
computes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sae.families import FAMILIES, TINY_LAYERS
from sae.io import save_sae
from sae.models import LoadedModel, load_model
from sae.sae import SAE, SAEConfig
from sae.tiny import build_tiny
from serve_hooks import vllm_plugin
from serve_hooks.vllm_families import LAYER_PATHS, candidate_paths, decoder_layers, stream_parts
from serve_hooks.vllm_features import read_features

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("GREYLENS_CACHE") or Path.home() / ".cache" / "greylens")
VENV_PY = CACHE / "venvs" / "vllm" / "bin" / "python"
HOOK = "blocks.1.hook_resid_post"


# ------------------------------------------------------------- the table (no vLLM)


def test_layer_table_agrees_with_family_registry():
    """One entry per model_type of sae/families.py, at the family's HF layer path."""
    expected = {t: f.layers for f in FAMILIES.values() for t in f.model_types}
    assert LAYER_PATHS == expected


def test_unknown_architecture_is_refused_naming_the_supported_ones():
    with pytest.raises(ValueError, match="does not know where 'bloom'.*gpt_neox") as info:
        candidate_paths("bloom")
    assert "LAYER_PATHS" in str(info.value)


def test_unknown_architecture_is_refused_before_the_weights_load():
    loaded: list[str] = []

    class Runner:
        model_config = SimpleNamespace(hf_config=SimpleNamespace(model_type="bloom"))

        def load_model(self) -> None:
            loaded.append("weights")

    vllm_plugin._wrap_load_model(Runner)
    with pytest.raises(ValueError, match="does not know where 'bloom'"):
        Runner().load_model()
    assert loaded == []


def test_transformers_backend_paths():
    """vLLM's Transformers backend keeps the HF base model as `model` (GPT-NeoX, OLMo-2 there)."""
    assert candidate_paths("gpt_neox") == ["gpt_neox.layers", "model.layers"]
    assert candidate_paths("gpt2") == ["transformer.h", "model.h"]
    assert candidate_paths("llama") == ["model.layers"]
    hf, _, _ = build_tiny("tiny-gpt_neox")
    backend_like = SimpleNamespace(model=hf.gpt_neox)  # what TransformersForCausalLM holds
    assert decoder_layers(backend_like, "gpt_neox", TINY_LAYERS) is hf.gpt_neox.layers
    with pytest.raises(ValueError, match="no list of 5 decoder layers"):
        decoder_layers(backend_like, "gpt_neox", 5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hook_reads_resid_post_of_every_family(family, monkeypatch):
    """On the HF tiny model (layers return the stream as one tensor in transformers 5, with a batch
    dimension, as under vLLM's Transformers backend), the plugin's hook on the layer it locates
    hands the op the rows of hidden_states[L + 1] = hook_resid_post."""
    hf, tok, _ = build_tiny(f"tiny-{family}")
    layers = decoder_layers(hf, hf.config.model_type, TINY_LAYERS)
    assert layers is FAMILIES[family].blocks(hf)
    seen: list[tuple[int, torch.Tensor]] = []
    vllm_plugin._register_op()
    monkeypatch.setattr(
        vllm_plugin, "_TAP", SimpleNamespace(record=lambda layer, rows: seen.append((layer, rows)))
    )
    handle = layers[1].register_forward_hook(vllm_plugin._layer_hook(1))
    ids = torch.tensor([tok("To be, or not to be, that is the question.").input_ids])
    with torch.no_grad():
        hidden = hf(ids, output_hidden_states=True).hidden_states  # [1, seq, d] each
    handle.remove()
    assert [layer for layer, _ in seen] == [1]
    torch.testing.assert_close(seen[0][1], hidden[2][0], rtol=0, atol=0)  # [seq, d]


def test_stream_parts_sums_fused_residual_and_refuses_other_forms():
    hidden, residual = torch.randn(5, 8), torch.randn(5, 8)
    rows_a, rows_b = stream_parts((hidden, residual), 0)
    assert torch.equal(rows_a, hidden) and torch.equal(rows_b, residual)
    rows_a, rows_b = stream_parts(hidden[None], 0)  # [1, n_rows, d]: Transformers backend
    assert torch.equal(rows_a, hidden) and rows_b is None
    for bad, form in (
        ((hidden, None), r"tuple\(Tensor, NoneType\)"),
        ((hidden, residual, hidden), "tuple"),
        ((hidden, torch.randn(5, 9)), "tuple"),
        ([hidden, residual], "list"),
    ):
        with pytest.raises(TypeError, match=f"layer 3 returned {form}"):
            stream_parts(bad, 3)


# ---------------------------------------------------------------- vLLM (side venv)

# Greedy continuations of this prompt vary on both 2-head tiny models (many prompts repeat a token).
PROMPT = "Now is the winter of our discontent made glorious summer by this sun of York."
MAX_TOKENS, TOP_N = 4, 8


def save_vllm_sized(family: str, out: Path) -> None:
    """tiny-<family>, with 2 attention heads instead of 4, saved as an HF directory.

    vLLM's CPU attention takes head sizes >= 32; the tiny models have 64 / 4 = 16. GPT-2's and
    GPT-NeoX's weight shapes do not depend on the head count, so the same weights load as a
    valid 2-head model (a different function of its input, the same for both sides here)."""
    hf, tok, _ = build_tiny(f"tiny-{family}")
    heads = "n_head" if family == "gpt2" else "num_attention_heads"
    setattr(hf.config, heads, 2)
    hf.save_pretrained(out)
    tok.save_pretrained(out)


@torch.no_grad()
def resid_post(model: LoadedModel, ids: list[int]) -> torch.Tensor:  # -> [n, d_model]
    _, cache = model.bridge.run_with_cache(
        torch.tensor([ids]), names_filter=[HOOK], return_cache_object=False
    )
    return cache[HOOK][0]


def fitted_sae(model: LoadedModel, n_latents: int = 256) -> SAE:
    """A TopK SAE built on harvested activations: the input scale fitted so E‖x‖ = √d (as the
    trainer does), b_dec their scaled mean, encoder rows drawn around the centred activations
    (comparing two engines needs codes that vary from token to token, not a trained SAE)."""
    text = " ".join(["The quick brown fox jumps over the lazy dog."] * 4)
    acts = resid_post(model, model.tokenizer(text).input_ids)  # [n, d]
    d = acts.shape[1]
    scale = d**0.5 / float(acts.norm(dim=1).mean())
    torch.manual_seed(0)
    sae = SAE(
        SAEConfig(d_in=d, n_latents=n_latents, arch="topk", k=12, hook=HOOK, input_scale=scale)
    )
    centred = (acts - acts.mean(0)) * scale  # [n, d]
    with torch.no_grad():
        sae.b_dec.copy_(acts.mean(0) * scale)  # b_dec lives in the scaled space
        picks = centred[torch.randint(len(acts), (n_latents,))]  # [n_latents, d]
        sae.W_enc.copy_(picks / d + 0.3 * torch.randn(n_latents, d) / d**0.5)
        sae.b_enc.normal_(0, 0.05)
    return sae


def run_vllm(model_dir: Path, sae_dir: Path, sink: Path) -> tuple[dict, float]:
    """One vLLM start in its default mode (torch.compile with Inductor, where a plain forward hook
    would silently never fire; on these tiny models no slower than --enforce-eager), the prompt
    greedily; (its JSON line, seconds)."""
    cmd = [str(VENV_PY), str(REPO / "scripts" / "_vllm_features.py"), "--model", str(model_dir)]
    cmd += ["--max-model-len", "256", "--sae", str(sae_dir), "--sink", str(sink)]
    cmd += ["--top-n", str(TOP_N), "--max-tokens", str(MAX_TOKENS), "--block-size", "32"]
    cmd += ["--prompt", PROMPT]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=env, cwd=REPO)
    seconds = time.perf_counter() - started
    lines = [line for line in done.stdout.splitlines() if line.startswith('{"requests"')]
    assert done.returncode == 0 and lines, done.stderr[-4000:] + done.stdout[-2000:]
    return json.loads(lines[-1]), seconds


@pytest.mark.slow
@pytest.mark.skipif(
    not VENV_PY.exists(), reason="no vLLM side venv: run `python scripts/_vllm_side.py setup`"
)
@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_vllm_features_equal_greylens_on_non_llama_family(tmp_path, family):
    """vLLM (its own GPT-2 class; GPT-NeoX through its Transformers backend) serves the tiny model
    with the plugin on: greedy tokens equal transformers' generate, and every position's top-n
    features equal greylens's (bridge hook_resid_post, sae.SAE.encode)."""
    save_vllm_sized(family, tmp_path / "model")
    # a local HF directory spec: hooks through the bridge, generate on the plain twin
    model = load_model(str(tmp_path / "model"), device="cpu", dtype="float32")
    sae = fitted_sae(model)
    save_sae(sae, tmp_path / "sae")
    run, seconds = run_vllm(tmp_path / "model", tmp_path / "sae", tmp_path / "sink")
    assert run["backend"] == "inductor"
    (req,) = run["requests"]
    ids, generated = req["prompt_token_ids"], req["output_token_ids"]
    model.fast.generation_config.eos_token_id = None  # vLLM ran with ignore_eos
    with torch.no_grad():
        hf_out = model.fast.generate(
            torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False
        )
    assert generated == hf_out[0, len(ids) :].tolist(), "greedy tokens differ from transformers"
    assert len(set(generated)) > 1, "the tiny model repeats one token: a weak comparison"
    sequence = ids + generated[:-1]  # every token the model read
    got = read_features(tmp_path / "sink", "0", timeout=60)
    assert got.token_ids.tolist() == sequence and got.missing == []
    idx, val = got.codes[HOOK]  # [n, TOP_N] each
    dense = sae.encode(resid_post(model, sequence)).to_dense(sae.cfg.n_latents)  # [n, n_latents]
    ref = dense.topk(TOP_N + 1, dim=1)
    # Both fp32, different kernels: values within 1e-5 of the row's largest (measured: 7.1e-7 on
    # both families); indices equal where the reference's neighbouring values are further apart
    # than twice that (a near-tie may swap two slots).
    scale = ref.values[:, :1].clamp_min(1e-6)  # [n, 1]
    err = ((val - ref.values[:, :TOP_N]).abs() / scale).max()
    assert err <= 1e-5, f"values differ by {err:.3g} of the row scale"
    gaps = ref.values[:, :-1] - ref.values[:, 1:]  # [n, TOP_N]
    clear = gaps > 2e-5 * scale
    clear[:, 1:] &= gaps[:, :-1] > 2e-5 * scale
    assert clear.float().mean() > 0.9
    assert torch.equal(idx[clear], ref.indices[:, :TOP_N][clear])
    print(f"[{family}] vLLM run {seconds:.0f} s, max |Δvalue|/row scale {err:.3g}", file=sys.stderr)
