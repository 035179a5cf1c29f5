"""Faithfulness of reasoning paths: check each edge by intervention, and paths against gradients.

Edge test (per explained position t and each of its top paths i → j → y):
    ablate source feature i at layer l on token t (resid_l[t] −= a_ti · d_i, d_i its raw decoder
    row), run the model on, re-encode layer l + Δ at t with the target SAE, and compare:
        edge confirmed   Δa_tj has the sign opposite to the edge's message W_ij s_ti
        path confirmed   Δlogit_y(t) has the sign opposite to the path weight
    null             the same ablations, read at active target features with no edge from i:
                     how often *any* active feature moves "the predicted way" (the base rate)
Attribution test: per position, grad × activation of every active source feature on the predicted
logit, g_t · (a_ti d_i) with g_t = ∂logit_y(t)/∂resid_l[t], correlated (Pearson) with the path score
Σ_j path weights(i → j → y) + direct effect(i → y). This one needs a backward pass; the explanations
themselves never do.
"""

from __future__ import annotations

import torch

from graphs.explain import Explainer, run_model
from graphs.model import locate


@torch.no_grad()
def edge_interventions(
    explainer: Explainer,
    texts: list[str],
    paths_per_token: int = 3,
    batch_size: int = 32,
    seed: int = 0,
) -> dict:
    """Fractions of top-path edges (and paths) confirmed by ablating their source feature."""
    if explainer.transition is None:
        raise ValueError(
            "edge interventions need a transition graph (load the explainer with a transition)"
        )
    generator = torch.Generator().manual_seed(seed)
    counts = {"edges": 0, "edge_ok": 0, "path_ok": 0, "null": 0, "null_ok": 0}
    for text in texts:
        tokens = explainer.tokens(text)
        result, graph_code, target = explainer.codes(tokens)
        predicted, rms = result.logits[0, 1:].argmax(-1), result.final_rms[0, 1:]
        paths = explainer.paths(graph_code.code, target, predicted, rms)
        chosen = _top_per_row(paths["row"], paths["weight"].abs(), paths_per_token)
        for start in range(0, len(chosen), batch_size):
            picked = chosen[start : start + batch_size]
            _ablate_and_score(
                explainer,
                tokens,
                result.logits[0],
                target,
                paths,
                picked,
                predicted,
                counts,
                generator,
            )
    edges = max(counts["edges"], 1)
    return {
        "edges_tested": counts["edges"],
        "edge_confirmed_fraction": counts["edge_ok"] / edges,
        "path_confirmed_fraction": counts["path_ok"] / edges,
        "null_confirmed_fraction": counts["null_ok"] / max(counts["null"], 1),
        "null_tested": counts["null"],
    }


def _top_per_row(rows: torch.Tensor, score: torch.Tensor, top: int) -> torch.Tensor:
    order = torch.argsort(score, descending=True)
    order = order[torch.argsort(rows[order], stable=True)]  # grouped by row, best first within
    counts = torch.bincount(rows[order], minlength=int(rows.max()) + 1 if len(rows) else 0)
    rank = torch.arange(len(order)) - (torch.cumsum(counts, 0) - counts)[rows[order]]
    return order[rank < top]


def _ablate_and_score(
    explainer, tokens, clean_logits, target_code, paths, picked, predicted, counts, generator
) -> None:
    """One batched forward: copy b removes its path's source feature at its row.
    clean_logits: [seq, vocab]."""
    rows, sources = paths["row"][picked], paths["source"][picked]
    sae_s = explainer.source_sae
    # [B, d]
    deltas = paths["source_act"][picked, None] * sae_s.W_dec[sources] / sae_s.cfg.input_scale
    batch = tokens.repeat(len(picked), 1)
    positions = rows + 1  # BOS comes first

    def ablate(hidden: torch.Tensor) -> torch.Tensor:  # [B, seq, d]
        hidden = hidden.clone()
        hidden[torch.arange(len(picked)), positions] -= deltas.to(hidden.dtype)
        return hidden

    layer_t = explainer.target_layer
    result = run_model(explainer.model, batch, [layer_t], edits={explainer.source_layer: ablate})
    resid = result.resid[layer_t][torch.arange(len(picked)), positions]  # [B, d]
    after = explainer.target.encode(resid).to_dense(explainer.target.cfg.n_latents)  # [B, n_t]
    before = target_code.to_dense(explainer.target.cfg.n_latents)[rows]  # [B, n_t]
    targets = paths["target"][picked]
    change = after[torch.arange(len(picked)), targets] - before[torch.arange(len(picked)), targets]
    counts["edges"] += len(picked)
    counts["edge_ok"] += int((change * paths["message"][picked] < 0).sum())
    clean_logit = clean_logits[positions, predicted[rows]]
    ablated_logit = result.logits[torch.arange(len(picked)), positions, predicted[rows]]
    counts["path_ok"] += int(((ablated_logit - clean_logit) * paths["weight"][picked] < 0).sum())
    _null(explainer, paths, picked, before, after, counts, generator)


def _null(explainer, paths, picked, before, after, counts, generator) -> None:
    """For each ablation, one random active target feature with no edge from the source: does it
    drop?"""
    src, dst = explainer.transition.edge_index
    for b, p in enumerate(picked.tolist()):
        active = before[b].nonzero().squeeze(1)
        linked = dst[src == paths["source"][p]]
        free = active[~torch.isin(active, linked)]
        if len(free) == 0:
            continue
        j = free[torch.randint(len(free), (1,), generator=generator)]
        counts["null"] += 1
        counts["null_ok"] += int(float(after[b, j] - before[b, j]) < 0)


def attribution_correlation(explainer: Explainer, texts: list[str]) -> dict:
    """Pearson r between path scores and grad × activation of active source features."""
    path_scores, attributions = [], []
    for text in texts:
        tokens = explainer.tokens(text)
        with torch.no_grad():
            result, graph_code, target = explainer.codes(tokens)
            predicted, rms = result.logits[0, 1:].argmax(-1), result.final_rms[0, 1:]
            code = graph_code.code
            score = explainer.direct(code, predicted, rms)  # [nnz]
            if target is not None:
                paths = explainer.paths(code, target, predicted, rms)
                entry = _entry_of(code, paths["row"], paths["source"])
                score = score.index_add(0, entry, paths["weight"])
        grads = _logit_grads(explainer, tokens, predicted)  # [T, d]
        sae = explainer.source_sae
        # [nnz, d]
        contribution = code.values[:, None] * sae.W_dec[code.cols].detach() / sae.cfg.input_scale
        attributions.append((grads[code.rows] * contribution).sum(1))
        path_scores.append(score)
    a, s = torch.cat(attributions).double(), torch.cat(path_scores).double()
    r = torch.corrcoef(torch.stack([a, s]))[0, 1]
    return {"attribution_pearson": float(r), "pairs": len(a)}


def _entry_of(code, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Index into code's entries of each (row, col) pair (all present). TopK codes are not sorted
    by column within a row, so look up in sorted order."""
    n = int(torch.cat([code.cols, cols]).max()) + 1 if len(cols) else 1
    keys = code.rows * n + code.cols
    order = torch.argsort(keys)
    return order[locate(keys[order], rows * n + cols)[0]]


def _logit_grads(
    explainer: Explainer, tokens: torch.Tensor, predicted: torch.Tensor
) -> torch.Tensor:
    """[T, d]: ∂ logit_{y_t}(t) / ∂ resid_l[t] for every position t after BOS."""
    leaf = {}

    def capture(hidden: torch.Tensor) -> torch.Tensor:
        leaf["h"] = hidden.detach().requires_grad_(True)
        return leaf["h"]

    result = run_model(
        explainer.model, tokens, [], edits={explainer.source_layer: capture}, grad=True
    )
    grads = []
    for t in range(len(predicted)):
        (g,) = torch.autograd.grad(
            result.logits[0, t + 1, predicted[t]], leaf["h"], retain_graph=t + 1 < len(predicted)
        )
        grads.append(g[0, t + 1])
    return torch.stack(grads)
