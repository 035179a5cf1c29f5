"""How well a learned latent graph recovers a planted hierarchy (`graphs.eval.planted`).

match_latents(W_dec, dictionary)      decoder rows ↔ true features, one to one, by cosine
edge_recovery(edges, weights, W_dec, hierarchy)
                                      precision / recall of learned edges against the planted
                                      child -> parent edges, next to a shuffled-target null
oracle_stats(hierarchy, codes)        is the planted structure in the data? P(j | i) of true codes
implied_edges(codes)                  what a perfect implication learner reading the true codes
                                      would find (a ceiling for graph SAEs)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from graphs.eval.planted import PlantedHierarchy


class LatentMatch(NamedTuple):
    latent: torch.Tensor  # [n_true] int64: the latent matched to each true feature (-1: none left)
    cos: torch.Tensor  # [n_true] float32: cosine of that pair (-1 where latent is -1)


def match_latents(
    W_dec: torch.Tensor, dictionary: torch.Tensor, one_to_one: bool = True
) -> LatentMatch:
    """Match decoder rows to true features by cosine (signed: codes are non-negative).

    one_to_one: greedy global matching, repeatedly taking the best remaining (feature, latent)
    pair, so two features never share a latent (exact whenever the best matches are clear-cut;
    scipy is not installed for a Hungarian solve). Otherwise each feature takes its argmax latent.
    """
    if W_dec.ndim != 2 or W_dec.shape[1] != dictionary.shape[1]:
        raise ValueError(
            f"W_dec must be [n_latents, {dictionary.shape[1]}], got {list(W_dec.shape)}; "
            "pass the decoder in the dictionary's space ([n_latents, d_model], not its transpose)"
        )
    dictionary = F.normalize(dictionary.detach().float(), dim=-1, eps=1e-12)
    sims = dictionary @ F.normalize(W_dec.detach().float().cpu(), dim=-1, eps=1e-12).T
    if not one_to_one:
        cos, latent = sims.max(dim=1)
        return LatentMatch(latent, cos)
    n_true, n_latents = sims.shape
    latent = torch.full((n_true,), -1, dtype=torch.int64)
    cos = torch.full((n_true,), -1.0)
    for _ in range(min(n_true, n_latents)):
        flat = int(sims.argmax())
        t, j = divmod(flat, n_latents)
        latent[t], cos[t] = j, sims[t, j]
        sims[t, :] = float("-inf")
        sims[:, j] = float("-inf")
    return LatentMatch(latent, cos)


def _edge_scores(
    src: torch.Tensor, dst: torch.Tensor, hierarchy: PlantedHierarchy
) -> dict[str, float]:
    """Precision/recall of true-feature edges (src, dst: [E], -1 = unmatched) vs the planted
    ones."""
    n = hierarchy.n_true
    mapped = (src >= 0) & (dst >= 0) & (src != dst)
    pairs = torch.unique(src[mapped] * n + dst[mapped])  # [E'] distinct true-feature edges
    planted = hierarchy.edge_index[0] * n + hierarchy.edge_index[1]
    tp = int(torch.isin(pairs, planted).sum())
    precision = tp / len(pairs) if len(pairs) else 0.0
    recall = tp / len(planted)
    return {
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if tp else 0.0,
        "n_mapped": float(len(pairs)),
        "reversed": float(
            torch.isin(pairs, hierarchy.edge_index[1] * n + hierarchy.edge_index[0]).sum()
        ),
        "cooc_hits": float(
            torch.isin(pairs, hierarchy.cooc_edge_index[0] * n + hierarchy.cooc_edge_index[1]).sum()
        ),
    }


def edge_recovery(
    learned_edge_index: torch.Tensor,
    learned_weights: torch.Tensor,
    W_dec: torch.Tensor,
    hierarchy: PlantedHierarchy,
    min_cos: float = 0.7,
    min_weight: float = 0.0,
    n_null: int = 20,
    null_seed: int = 0,
) -> dict[str, float]:
    """Score learned latent edges src -> dst against the planted child -> parent edges.

    Latents are matched one-to-one to true features (`match_latents`); a learned edge with weight
    > min_weight maps to a true-feature edge when both ends matched with cos ≥ min_cos (others are
    left out of precision too: nothing is known about them). Keys: precision, recall, f1,
    n_mapped (distinct mapped edges), reversed (parent -> child hits), cooc_hits, n_learned,
    n_matched_features, and null_precision/null_recall/null_f1: the same with the learned
    targets shuffled (n_null seeded permutations, averaged), the level a graph must beat.
    """
    if learned_edge_index.ndim != 2 or learned_edge_index.shape[0] != 2:
        raise ValueError(f"learned_edge_index must be [2, E], got {list(learned_edge_index.shape)}")
    if learned_weights.shape != (learned_edge_index.shape[1],):
        raise ValueError(
            f"learned_weights must be [E] = [{learned_edge_index.shape[1]}], got "
            f"{list(learned_weights.shape)}"
        )
    match = match_latents(W_dec, hierarchy.dictionary)
    good = match.cos >= min_cos  # [n_true]
    true_of = torch.full((W_dec.shape[0],), -1, dtype=torch.int64)  # [n_latents] latent -> feature
    true_of[match.latent[good]] = torch.arange(hierarchy.n_true)[good]
    kept = learned_edge_index.cpu().long()[:, learned_weights.detach().cpu() > min_weight]  # [2, E]
    src, dst = true_of[kept[0]], true_of[kept[1]]
    result = _edge_scores(src, dst, hierarchy)
    g = torch.Generator().manual_seed(null_seed)
    nulls = [
        _edge_scores(src, dst[torch.randperm(len(dst), generator=g)], hierarchy)
        for _ in range(n_null)
    ]
    for key in ("precision", "recall", "f1"):
        result[f"null_{key}"] = sum(r[key] for r in nulls) / max(n_null, 1)
    result.update(n_learned=float(kept.shape[1]), n_matched_features=float(good.sum()))
    return result


class OracleStats(NamedTuple):
    freq: torch.Tensor  # [n_true] P(feature active)
    # [n_true, n_true]: [i, j] = P(j active | i active); nan if i never fired
    conditional: torch.Tensor
    child_to_parent: torch.Tensor  # [P·C] P(parent | child) per planted edge: 1 by construction
    parent_to_child: torch.Tensor  # [P·C] P(child | parent): well below 1, so the edge is directed
    cooc: torch.Tensor  # [2·n_cooc] P(dst | src) per cooc edge


def oracle_stats(hierarchy: PlantedHierarchy, codes: torch.Tensor) -> OracleStats:
    """Co-occurrence statistics of true codes [n, n_true]: is the planted structure in the data?"""
    active = (codes > 0).float()  # [n, n_true]
    counts = active.sum(0)  # [n_true]
    joint = active.T @ active  # [n_true, n_true] tokens where both fire
    conditional = joint / counts[:, None]  # 0/0 -> nan for features that never fired
    src, dst = hierarchy.edge_index
    csrc, cdst = hierarchy.cooc_edge_index
    return OracleStats(
        counts / max(codes.shape[0], 1),
        conditional,
        conditional[src, dst],
        conditional[dst, src],
        conditional[csrc, cdst],
    )


def implied_edges(
    codes: torch.Tensor, min_conditional: float = 0.95, min_count: int = 10
) -> torch.Tensor:
    """Edges i -> j [2, E] with P(j | i) ≥ min_conditional over ≥ min_count firings of i: what a
    perfect implication learner reading the true codes would find (a ceiling for graph SAEs)."""
    active = (codes > 0).float()  # [n, n_true]
    counts = active.sum(0)  # [n_true]
    conditional = (active.T @ active) / counts.clamp_min(1)[:, None]  # [n_true, n_true]
    conditional.fill_diagonal_(0)
    ok = (conditional >= min_conditional) & (counts >= min_count)[:, None]
    return ok.nonzero().T.contiguous()  # [2, E], row-major: sorted by src
