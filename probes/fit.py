"""Fitting each probe kind, threshold calibration, and the two scores every table reports.

    fit_pooled_logistic(u, y, aggregation, l2)  w, b minimising BCE(pool(u·w + b), y) + l2‖w‖²
    choose_l2(u, y, aggregation)                l2 by k-fold cross-validated log-loss
    mean_difference(acts, y, aggregation)       μ₊ − μ₋ of the pooled activations
    pooled_code(code, offsets, aggregation)     [n_texts, n_latents] pooled SAE code (selection)
    select_features(pooled, y, k)               the k latents with the largest |μ₊ − μ₋|
    graph_neighbourhoods(pooled, y, edges)      feature sets worth testing: top features + edges
    running_pool(scores, aggregation)           the pooled score after each token (what
                                                `Lens.monitor` compares to the threshold)
    peak_running(scores, aggregation, min_tokens)  each text's highest running pooled score
    calibrate(negative_scores, fpr)             threshold with at most fpr of negatives above it
    auroc(scores, y), accuracy(scores, y)

Logistic fits are `graphs.logistic.fit_logistic` (standardise, L-BFGS, fold the scaling back into
w and b, so the stored probe reads raw activations). For mean and last pooling the score is linear
in the pooled input, so the fit runs on [n_texts, m] rather than on every token; max pooling fits
through the max.
"""

from __future__ import annotations

import torch
from torch import Tensor

from graphs.logistic import fit_logistic
from probes.activations import Aggregation, Ragged, pool
from sae.sae import SparseCode

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def fit_pooled_logistic(
    u: Ragged, y: Tensor, aggregation: Aggregation, l2: float, max_iter: int = 100
) -> tuple[Tensor, float]:
    """w [m], b for the per-token score u_t · w + b, pooled per text, fit to labels y [n_texts].

    The fit is `graphs.logistic.fit_logistic` in float64 with the population std, folded back so
    the probe reads raw activations."""
    if aggregation in ("mean", "last"):  # the score is linear in the pooled input: fit on that
        fit = fit_logistic(pool(u, aggregation).double(), y, l2, max_iter)
    else:  # max pooling: fit every token, through the max over each text's token logits
        offsets = u.offsets

        def max_pool(token_logits: Tensor) -> Tensor:  # [n_tokens] -> [n_texts]
            return pool(Ragged(token_logits, offsets), "max")

        fit = fit_logistic(u.values.double(), y, l2, max_iter, pool=max_pool)
    w_raw, b_raw = fit.folded()
    return w_raw.float(), float(b_raw)


def _logistic_scores(u: Ragged, w: Tensor, b: float, aggregation: Aggregation) -> Tensor:
    return pool(Ragged(u.values.float() @ w + b, u.offsets), aggregation)


def choose_l2(
    u: Ragged, y: Tensor, aggregation: Aggregation, folds: int = 4, seed: int = 0
) -> float:
    """The L2 strength in L2_GRID with the lowest cross-validated log-loss (folds stratified by
    class)."""
    folds = min(folds, int(min((y == 0).sum(), (y == 1).sum())))
    if folds < 2:
        return L2_GRID[len(L2_GRID) // 2]
    generator = torch.Generator().manual_seed(seed)
    fold_of = torch.empty_like(y)
    for label in (0, 1):
        members = (y == label).nonzero().squeeze(1)
        members = members[torch.randperm(members.numel(), generator=generator)]
        fold_of[members] = torch.arange(members.numel()) % folds
    losses = []
    for l2 in L2_GRID:
        total = 0.0
        for fold in range(folds):
            train, held = (
                (fold_of != fold).nonzero().squeeze(1),
                (fold_of == fold).nonzero().squeeze(1),
            )
            w, b = fit_pooled_logistic(u.select(train), y[train], aggregation, l2)
            logits = _logistic_scores(u.select(held), w, b, aggregation)
            total += float(
                torch.nn.functional.binary_cross_entropy_with_logits(
                    logits, y[held].float(), reduction="sum"
                )
            )
        losses.append(total)
    return L2_GRID[int(torch.tensor(losses).argmin())]


def mean_difference(acts: Ragged, y: Tensor, aggregation: Aggregation) -> Tensor:
    """μ₊ − μ₋ of the pooled activations: [d_model]."""
    pooled = pool(acts, aggregation).float()
    return pooled[y == 1].mean(0) - pooled[y == 0].mean(0)


# --------------------------------------------------------------------------- SAE features


def pooled_code(
    code: SparseCode, offsets: Tensor, n_latents: int, aggregation: Aggregation
) -> Tensor:
    """[n_texts, n_latents]: each latent's mean / max / last-token activation per text."""
    n_texts = offsets.numel() - 1
    segment = torch.searchsorted(offsets, code.rows, right=True) - 1  # [nnz] text of each entry
    flat = segment * n_latents + code.cols
    out = code.values.new_zeros(n_texts * n_latents)
    if aggregation == "mean":
        out.index_add_(0, flat, code.values / offsets.diff()[segment].to(code.values.dtype))
    elif aggregation == "max":
        out.scatter_reduce_(0, flat, code.values, "amax", include_self=True)  # codes are ≥ 0
    else:
        last = code.rows == offsets[segment + 1] - 1
        out.index_add_(0, flat[last], code.values[last])
    return out.view(n_texts, n_latents)


def _class_difference(pooled: Tensor, y: Tensor) -> Tensor:  # [n_latents] μ₊ − μ₋
    return pooled[y == 1].mean(0) - pooled[y == 0].mean(0)


def select_features(pooled: Tensor, y: Tensor, k: int) -> Tensor:
    """The k latents whose pooled activation differs most between the classes (|μ₊ − μ₋|)."""
    if not 0 < k <= pooled.shape[1]:
        raise ValueError(f"k must be in 1..{pooled.shape[1]} (the SAE's width), got {k}")
    return _class_difference(pooled, y).abs().topk(k).indices.sort().values


def graph_neighbourhoods(
    pooled: Tensor, y: Tensor, edges: Tensor, n_candidates: int = 16
) -> list[tuple[int, list[int]]]:
    """The n_candidates latents most raised by the positive class, each with its graph neighbours
    (j with an edge i → j or j → i): the queries a graph probe tries are {i} and each {i, j}."""
    difference = _class_difference(pooled, y)
    candidates = difference.topk(min(n_candidates, difference.numel())).indices.tolist()
    out = []
    for i in candidates:
        around = edges[1, edges[0] == i].tolist() + edges[0, edges[1] == i].tolist()
        out.append((i, [j for j in dict.fromkeys(around) if j != i]))
    return out


# --------------------------------------------------------------------------- calibration, scores


def running_pool(scores: Ragged, aggregation: Aggregation) -> Ragged:
    """Token scores s_t [n_tokens] -> the text's pooled score over s_1..s_t after each token
    [n_tokens], the rule `Lens.monitor` applies while it generates (an independent re-statement of
    its incremental update, pinned against it by a test)."""
    out = []
    for start, end in zip(scores.offsets[:-1].tolist(), scores.offsets[1:].tolist(), strict=True):
        s = scores.values[start:end].double()  # [T]
        if aggregation == "mean":
            out.append(s.cumsum(0) / torch.arange(1, s.numel() + 1, dtype=s.dtype))
        elif aggregation == "max":
            out.append(s.cummax(0).values)
        else:  # last: the newest token's score
            out.append(s)
    values = torch.cat(out) if out else scores.values.double()
    return Ragged(values.to(scores.values.dtype), scores.offsets)


def peak_running(scores: Ragged, aggregation: Aggregation, min_tokens: int = 1) -> Tensor:
    """[n_texts]: the highest running pooled score of each text once it has min_tokens tokens
    (the whole text's pooled score when it is shorter). A monitor that checks the running score
    after every token fires on a text exactly when this peak is above its threshold."""
    if min_tokens < 1:
        raise ValueError(f"min_tokens must be at least 1, got {min_tokens}")
    running = running_pool(scores, aggregation)
    peaks = []
    for start, end in zip(scores.offsets[:-1].tolist(), scores.offsets[1:].tolist(), strict=True):
        first = min(start + min_tokens - 1, end - 1)  # a text shorter than min_tokens: its end
        peaks.append(running.values[first:end].max())
    return torch.stack(peaks)


def calibrate(negative_scores: Tensor, fpr: float) -> tuple[float, dict]:
    """The threshold t with #(negatives > t) ≤ floor(fpr·n): t is the (floor(fpr·n)+1)-th
    largest."""
    n = negative_scores.numel()
    if n == 0:
        raise ValueError("calibration needs held-out negatives; the calibration split has none")
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"target false-positive rate must be in [0, 1), got {fpr}")
    allowed = int(fpr * n)
    threshold = float(negative_scores.sort(descending=True).values[allowed])
    observed = float((negative_scores > threshold).float().mean())
    return threshold, {"target_fpr": fpr, "n_negatives": n, "fpr": observed, "resolution": 1.0 / n}


def auroc(scores: Tensor, y: Tensor) -> float:
    """Area under the ROC curve: P(score of a random positive > a random negative), ties count ½."""
    pos, neg = scores[y == 1].double(), scores[y == 0].double()
    if pos.numel() == 0 or neg.numel() == 0:
        raise ValueError("AUROC needs both classes among the labels")
    ranks = _average_ranks(torch.cat([pos, neg]))
    return float(
        (ranks[: pos.numel()].sum() - pos.numel() * (pos.numel() + 1) / 2)
        / (pos.numel() * neg.numel())
    )


def _average_ranks(x: Tensor) -> Tensor:  # 1-based ranks, ties share their mean rank
    order = x.argsort()
    sorted_x = x[order]
    first = torch.ones_like(sorted_x, dtype=torch.bool)
    first[1:] = sorted_x[1:] != sorted_x[:-1]
    group = first.cumsum(0) - 1
    positions = torch.arange(1, x.numel() + 1, dtype=torch.float64)
    n_groups = int(group.max()) + 1
    sums = torch.zeros(n_groups, dtype=torch.float64).index_add(0, group, positions)
    mean_rank = sums / torch.bincount(group, minlength=n_groups)
    ranks = torch.empty_like(positions)
    ranks[order] = mean_rank[group]
    return ranks


def accuracy(scores: Tensor, y: Tensor, threshold: float = 0.0) -> float:
    return float(((scores > threshold).long() == y).float().mean())
