"""Cross-layer transition and reasoning paths, on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from graphs.crosslayer import TransitionGraph
from graphs.eval.faithfulness import attribution_correlation, edge_interventions
from graphs.explain import load_explainer, run_model
from sae.hooks import capture
from sae.models import LoadedModel
from sae.sae import SparseCode
from tests.graphs.conftest import SOURCE_HOOK, TARGET_HOOK, TinyGraph

TEXTS = ["the king said to his son", "and it was good in the land"]


def test_transition_forward_equals_dense_reference() -> None:
    torch.manual_seed(0)
    n_s, n_t, rows = 20, 15, 6
    edges = torch.unique(torch.randint(0, 15, (2, 60)), dim=1)
    graph = TransitionGraph(edges, n_s, n_t)
    with torch.no_grad():
        graph.weight.normal_()
        graph.bias.normal_(0, 0.1)
    dense_source = torch.rand(rows, n_s) * (torch.rand(rows, n_s) < 0.3)
    r, c = dense_source.nonzero(as_tuple=True)
    predicted = graph(SparseCode(dense_source[r, c], c, r, rows))
    W = torch.zeros(n_s, n_t).index_put(
        (graph.edge_index[0], graph.edge_index[1]), graph.weight.detach()
    )
    assert torch.allclose(predicted, (dense_source @ W + graph.bias).relu(), atol=1e-6)


def test_fitted_transition_predicts_target_codes(tiny_graph: TinyGraph) -> None:
    graph, meta = TransitionGraph.load(tiny_graph.transition)
    assert meta["source_hook"] == SOURCE_HOOK and meta["target_hook"] == TARGET_HOOK
    assert meta["code_fvu"] < 0.9  # better than predicting each target's mean
    # top-m per target
    assert torch.bincount(graph.edge_index[1], minlength=graph.n_target).max() <= 8
    assert 0 < meta["n_nonzero"] <= meta["n_candidates"]


def test_run_model_captures_what_the_harvest_captures(tiny: LoadedModel) -> None:
    tokens = torch.tensor([[tiny.tokenizer.bos_token_id, 5, 77, 300, 12]])
    result = run_model(tiny, tokens, [0, 1])
    captured = capture(tiny, tokens, [SOURCE_HOOK, TARGET_HOOK])
    assert torch.allclose(result.resid[0], captured[SOURCE_HOOK]) and torch.allclose(
        result.resid[1], captured[TARGET_HOOK]
    )
    assert torch.allclose(result.logits, tiny.fast(tokens).logits.float(), atol=1e-5)


def test_explain_paths_are_messages_times_logit_effects(
    tiny: LoadedModel, tiny_graph: TinyGraph
) -> None:
    explainer = load_explainer(tiny, str(tiny_graph.graph), str(tiny_graph.transition))
    out = explainer.explain(TEXTS[0], top_features=4, top_paths=3)
    json.dumps(out)  # serialisable
    positions = out["positions"]
    assert len(positions) == len(explainer.tokens(TEXTS[0])[0]) - 1
    assert any(p["paths"] for p in positions) and all(
        p["l0"] >= p["l0_evidence"] for p in positions
    )
    # recompute one path weight by hand
    tokens = explainer.tokens(TEXTS[0])
    result, _, _ = explainer.codes(tokens)
    t = next(i for i, p in enumerate(positions) if p["paths"])
    path = positions[t]["paths"][0]
    y = int(result.logits[0, t + 1].argmax())
    target = explainer.target
    g, W_U = tiny.fast.model.norm.weight, tiny.fast.lm_head.weight
    with torch.no_grad():
        effect = float(
            (target.W_dec[path["target"]] / target.cfg.input_scale * g)
            @ W_U[y]
            / result.final_rms[0, t + 1]
        )
    assert path["logit_effect"] == pytest.approx(effect, rel=1e-3, abs=1e-5)
    assert path["weight"] == pytest.approx(
        path["message"] * path["logit_effect"], rel=1e-2, abs=1e-5
    )
    assert all(p.grad is None for p in explainer.source.parameters())  # no backward pass


def test_explainer_refuses_bad_input(tiny: LoadedModel, tiny_graph: TinyGraph, tmp_path) -> None:
    explainer = load_explainer(tiny, str(tiny_graph.graph))
    with pytest.raises(ValueError, match="non-empty"):
        explainer.explain("   ")
    with pytest.raises(ValueError, match="transition graph"):
        edge_interventions(explainer, TEXTS)
    with pytest.raises(FileNotFoundError, match="graphs transition"):
        load_explainer(tiny, str(tiny_graph.graph), str(tmp_path))


def test_top_logits_match_the_full_product(tiny: LoadedModel, tiny_graph: TinyGraph) -> None:
    from graphs.explain import top_logits
    from sae.io import load_sae

    sae = load_sae(tiny_graph.sae_dirs / SOURCE_HOOK)
    features = torch.tensor([0, 5, 17])
    result = top_logits(tiny, sae, features, k=4, chunk=2)  # chunks of 2: the chunking is exercised
    # [3, vocab]
    full = (sae.W_dec[features] * tiny.fast.model.norm.weight) @ tiny.fast.lm_head.weight.T
    assert torch.allclose(result["top"][0], full.topk(4, dim=1).values, atol=1e-5)
    assert torch.equal(result["bottom"][1], (-full).topk(4, dim=1).indices)


def test_a_plain_topk_sae_explains_as_a_graph_without_edges(
    tiny: LoadedModel, tiny_graph: TinyGraph
) -> None:
    from graphs.explain import Explainer
    from sae.io import load_sae

    transition, meta = TransitionGraph.load(tiny_graph.transition)
    topk = load_sae(tiny_graph.sae_dirs / SOURCE_HOOK)  # TopK codes are unsorted within a row
    explainer = Explainer(tiny, topk, load_sae(meta["target"]), transition)
    out = explainer.explain(TEXTS[1])
    assert all(p["implied"] == [] and p["l0"] == topk.cfg.k for p in out["positions"])
    correlation = attribution_correlation(explainer, TEXTS)
    assert correlation["pairs"] == sum(len(explainer.tokens(t)[0]) - 1 for t in TEXTS) * topk.cfg.k
