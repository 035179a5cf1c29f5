"""Conformance of every registered family (a new family is one `FAMILIES` entry; these tests then
cover it): each documented hook point equals what Hugging Face computes, through the harvest fast
path, the TransformerLens bridge, a KV-cached decode step (what `probes.Lens.monitor` records) and
a harvested store read back; the tiny model generates varied text; the tokenizer has a BOS.

The reference is the plain HF model rebuilt from the same seed: `output_hidden_states` for the
residual stream and forward hooks on the modules the registry names for attn_out / mlp_out /
mlp.hook_in. Those module choices are checked independently by the block's own bookkeeping:
resid_post - resid_pre must equal attn_out + mlp_out.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sae.families import BLOCK_POINTS, FAMILIES, Family
from sae.harvest import HarvestConfig, harvest
from sae.hooks import capture, editing, recording, validate_hooks
from sae.models import LoadedModel, load_model
from sae.tiny import build_tiny

# fp32 rounding: the fast twin runs eager attention, the reference SDPA; the bridge re-wires modules
TOL = dict(rtol=1e-4, atol=1e-4)
SEQ = 24  # crosses the gemma tiny sliding window (8)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest) -> Family:
    return FAMILIES[request.param]


@pytest.fixture(scope="module")
def model(family: Family) -> LoadedModel:
    return load_model(f"tiny-{family.name}")


@pytest.fixture(scope="module")
def tokens(model: LoadedModel) -> torch.Tensor:
    text = "The quick brown fox jumps over the lazy dog; to be or not to be, that is it."
    rows = [model.tokenizer(t).input_ids[:SEQ] for t in (text * 2, text[::-1] * 2)]
    assert min(map(len, rows)) == SEQ
    return torch.tensor(rows)  # [2, SEQ], BOS first


def _names(model: LoadedModel) -> list[str]:
    points = model.family.hook_points(model.fast.config)
    return [f"blocks.{layer}.{point}" for layer in range(model.n_layers) for point in points]


@pytest.fixture(scope="module")
def reference(model: LoadedModel, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    return hf_points(model, tokens)


def hf_points(model: LoadedModel, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every hook point of an independent plain-HF copy: {name: [batch, seq, d_model]}."""
    hf, _, sha = build_tiny(model.name)
    assert sha == model.weights_sha256
    hf = hf.eval()
    family, seen, handles = model.family, {}, []

    def keep(name: str, inputs: bool = False):
        def hook(module, args, output=None):
            value = args[0] if inputs else output
            seen[name] = value[0] if isinstance(value, tuple) else value

        return hook

    blocks = family.blocks(hf)
    for layer, block in enumerate(blocks):
        out = family.attn_out or family.attn
        handles.append(block.get_submodule(out).register_forward_hook(keep(f"{layer}.attn")))
        out = family.mlp_out or family.mlp
        handles.append(block.get_submodule(out).register_forward_hook(keep(f"{layer}.mlp")))
        mlp = block.get_submodule(family.mlp)
        handles.append(mlp.register_forward_pre_hook(keep(f"{layer}.mlp_in", inputs=True)))
    final = family.final_norm_module(hf)
    handles.append(final.register_forward_pre_hook(keep("final", inputs=True)))
    with torch.no_grad():
        out = hf(tokens, output_hidden_states=True, use_cache=False)
    for handle in handles:
        handle.remove()
    hidden = out.hidden_states  # embeddings, then each block's output (the last one normed)
    assert len(hidden) == len(blocks) + 1
    ref = {"logits": out.logits}
    for layer in range(len(blocks)):
        post = hidden[layer + 1] if layer + 1 < len(blocks) else seen["final"]
        ref |= {
            f"blocks.{layer}.hook_resid_pre": hidden[layer],
            f"blocks.{layer}.hook_attn_out": seen[f"{layer}.attn"],
            f"blocks.{layer}.mlp.hook_in": seen[f"{layer}.mlp_in"],
            f"blocks.{layer}.hook_mlp_out": seen[f"{layer}.mlp"],
            f"blocks.{layer}.hook_resid_post": post,
        }
        if "hook_resid_mid" in family.hook_points(hf.config):
            ref[f"blocks.{layer}.hook_resid_mid"] = hidden[layer] + seen[f"{layer}.attn"]
    return ref


def test_registry_module_choices_add_up_to_the_block(
    model: LoadedModel, reference: dict[str, torch.Tensor]
) -> None:
    """resid_post = resid_pre + attn_out + mlp_out, whichever way the block is wired."""
    for layer in range(model.n_layers):
        at = {p: reference[f"blocks.{layer}.{p}"] for p in BLOCK_POINTS if p != "hook_resid_mid"}
        summed = at["hook_resid_pre"] + at["hook_attn_out"] + at["hook_mlp_out"]
        torch.testing.assert_close(summed, at["hook_resid_post"], **TOL)
        assert not torch.allclose(at["hook_attn_out"], torch.zeros_like(summed))


def test_fast_path_equals_hf(model: LoadedModel, tokens: torch.Tensor, reference: dict) -> None:
    names = _names(model)
    got = capture(model, tokens, names)
    assert set(got) == set(names)
    for name in names:
        torch.testing.assert_close(got[name], reference[name], **TOL, msg=name)


def test_fast_path_stops_early_and_still_matches(
    model: LoadedModel, tokens: torch.Tensor, reference: dict
) -> None:
    name = "blocks.0.mlp.hook_in"
    torch.testing.assert_close(capture(model, tokens, [name])[name], reference[name], **TOL)


def test_bridge_equals_hf(model: LoadedModel, tokens: torch.Tensor, reference: dict) -> None:
    names = _names(model)
    validate_hooks(model, names)
    logits, cache = model.bridge.run_with_cache(tokens, names_filter=names)
    for name in names:
        torch.testing.assert_close(cache[name], reference[name], **TOL, msg=name)
    # the final logits, soft-capped for Gemma 2/3 as HF does
    torch.testing.assert_close(logits, reference["logits"], **TOL)


def test_kv_cached_decode_records_the_same_rows(
    model: LoadedModel, tokens: torch.Tensor, reference: dict
) -> None:
    """What Lens.monitor sees: prefill, then one cached token at a time, via `recording`."""
    names = _names(model)
    prompt = 20
    with torch.no_grad(), recording(model, names) as latest:
        out = model.fast(input_ids=tokens[:1, :prompt], use_cache=True)
        cache = out.past_key_values
        for position in range(prompt, SEQ):
            step = tokens[:1, position : position + 1]
            out = model.fast(input_ids=step, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            rows = latest()
            for name in names:
                expected = reference[name][:1, position : position + 1]
                torch.testing.assert_close(rows[name], expected, **TOL, msg=name)


def test_harvested_store_reads_back_hf_values(
    model: LoadedModel, tmp_path: Path, reference: dict, tokens: torch.Tensor
) -> None:
    corpus = tmp_path / "corpus.txt"  # a few hundred tokens: the built-in corpora take seconds
    corpus.write_text(" ".join(["In the beginning God created the heaven and the earth."] * 20))
    last = model.n_layers - 1
    names = [f"blocks.{last}.mlp.hook_in", f"blocks.{last}.hook_resid_post"]
    cfg = HarvestConfig(
        out=str(tmp_path / "store"),
        model=model.name,
        hooks=",".join(names),
        tokens=62,
        context_size=32,
        batch_size=2,
        store_dtype="float32",
        corpus=str(corpus),
    )
    store = harvest(cfg, model)
    rows = store.rows(torch.arange(len(store)), hooks=names)
    windows = rows["token_ids"].long().reshape(-1, cfg.rows_per_window)  # [2, 31] BOS dropped
    bos = torch.full((len(windows), 1), model.bos_token_id)
    expected = hf_points(model, torch.cat([bos, windows], 1))  # [2, 32, d_model] each
    for name in names:
        flat = expected[name][:, 1:].reshape(-1, model.d_model)
        torch.testing.assert_close(rows[name], flat, **TOL, msg=name)


def test_resid_mid_only_where_the_family_is_sequential(model: LoadedModel) -> None:
    name = "blocks.0.hook_resid_mid"
    if model.family.is_parallel(model.fast.config):
        with pytest.raises(ValueError, match="parallel.*no hook_resid_mid"):
            validate_hooks(model, [name])
        with pytest.raises(ValueError, match="parallel"):
            with recording(model, [name]):
                pass
    else:
        validate_hooks(model, [name])


def test_greedy_generation_varies(model: LoadedModel) -> None:
    """Not one constant token (an engine test on such a model could not tell right from wrong)."""
    seen = set()
    for prompt in ("The quick brown fox", "In the beginning", "Friends, Romans"):
        ids = torch.tensor([model.tokenizer(prompt).input_ids])  # [1, T]
        start = ids.shape[1]
        with torch.no_grad():  # plain greedy loop: generate()'s per-step overhead is 10x a forward
            for _ in range(12):
                logits = model.fast(ids, use_cache=False).logits[:, -1]  # [1, vocab]
                ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
        generated = ids[0, start:].tolist()
        assert len(set(generated)) >= 2, (prompt, generated)
        seen |= set(generated)
    assert len(seen) >= 8, seen


def test_tokenizer_has_a_bos(model: LoadedModel) -> None:
    bos = model.tokenizer.bos_token_id
    fallback = model.family.bos_fallback
    assert bos is not None or (fallback and fallback in model.tokenizer.get_vocab())
    assert model.tokenizer("Hello").input_ids[0] == model.bos_token_id


def test_readout_reproduces_the_logits(model: LoadedModel, reference: dict) -> None:
    """The linearised final norm + unembedding + soft-cap (what direct effects use) is exact on
    the residual itself: Gemma's (1 + w) norm and soft-cap, LayerNorm's centring and bias."""
    readout = model.family.readout(model.fast)
    x = reference[f"blocks.{model.n_layers - 1}.hook_resid_post"]  # [b, s, d]
    logits = readout.project(x) @ readout.W_U.T / readout.scale(x)[..., None]  # [b, s, vocab]
    bias = getattr(model.family.final_norm_module(model.fast), "bias", None)
    if bias is not None:  # LayerNorm's shift: the same for every direction, so not in project()
        logits = logits + bias @ readout.W_U.T
    torch.testing.assert_close(readout.cap(logits), reference["logits"], **TOL)


def test_explain_forward_reads_the_family(
    model: LoadedModel, tokens: torch.Tensor, reference: dict
) -> None:
    from graphs.explain import run_model  # graphs sits above sae; only this test needs it

    last = model.n_layers - 1
    result = run_model(model, tokens, [0, last])
    for layer in (0, last):
        expected = reference[f"blocks.{layer}.hook_resid_post"]
        torch.testing.assert_close(result.resid[layer], expected, **TOL)
    torch.testing.assert_close(result.logits, reference["logits"], **TOL)
    scale = model.family.readout(model.fast).scale(reference[f"blocks.{last}.hook_resid_post"])
    torch.testing.assert_close(result.final_rms, scale, **TOL)


def _edited_hf_logits(
    model: LoadedModel, tokens: torch.Tensor, point: str, delta: torch.Tensor
) -> torch.Tensor:
    """HF logits with `delta` added at block 0's `point`, edited on the plain modules."""
    hf, family = build_tiny(model.name)[0].eval(), model.family
    block = family.blocks(hf)[0]

    def add_in(module, args, kwargs):
        if args:
            return (args[0] + delta, *args[1:]), kwargs
        first = next(iter(kwargs))
        return args, {**kwargs, first: kwargs[first] + delta}

    def add_out(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + delta, *output[1:])
        return output + delta

    # resid_mid = resid_pre + attn_out, and the block continues from it: editing it is editing
    # attention's contribution.
    module, edit = {
        "hook_resid_pre": (block, "in"),
        "hook_resid_post": (block, "out"),
        "mlp.hook_in": (family.point_module(block, "mlp.hook_in"), "in"),
        "hook_resid_mid": (family.point_module(block, "hook_attn_out"), "out"),
    }.get(point, (None, "out"))
    module = module or family.point_module(block, point)
    if edit == "in":
        handle = module.register_forward_pre_hook(add_in, with_kwargs=True)
    else:
        handle = module.register_forward_hook(add_out)
    with torch.no_grad():
        logits = hf(tokens, use_cache=False).logits
    handle.remove()
    return logits


def test_splice_edits_the_model_like_hf(model: LoadedModel, tokens: torch.Tensor) -> None:
    """What `sae eval` splicing does (sae.hooks.editing) changes the logits exactly as the same
    edit on the plain HF modules, at every point of block 0; so does the bridge, except at
    hook_resid_mid (TransformerLens 4 aliases it to the MLP's input: the residual skip path never
    sees the edit, which is why splicing goes through `editing`)."""
    delta = torch.linspace(-1.0, 1.0, model.d_model)  # [d_model]
    clean = model.fast(tokens, use_cache=False).logits
    for point in model.family.hook_points(model.fast.config):
        name = f"blocks.0.{point}"
        expected = _edited_hf_logits(model, tokens, point, delta)
        assert not torch.allclose(expected, clean, atol=1e-3), point
        with torch.no_grad(), editing(model, name, lambda act: act + delta):
            logits = model.fast(tokens, use_cache=False).logits
        torch.testing.assert_close(logits, expected, **TOL, msg=point)
        if point != "hook_resid_mid":
            logits = model.bridge.run_with_hooks(
                tokens, fwd_hooks=[(name, lambda act, hook: act + delta)], return_type="logits"
            )
            torch.testing.assert_close(logits, expected, **TOL, msg=f"bridge {point}")
