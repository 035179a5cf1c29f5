"""Feature absorption on the first-letter task, two ways.

- Upper bound (`absorption_rate`), simplified from Chanin et al. 2024 ("A is for Absorption"):
  the main latent of L has the largest *signed* mean difference (it fires more on L; with |.| a
  latent for the other letters could win). Among positive test tokens the dense probe gets right
  (the residual does carry "starts with L"), the rate is the fraction on which the main latent
  stays silent (activation <= 0). Chanin et al. also require an absorbing latent aligned with the
  probe direction; counting every silent case makes this an upper bound on theirs (it includes
  plain false negatives).
- As Chanin et al. measure it (`chanin_absorption`), which needs the decoder rows:
  * main latents: the latents that fire for L, by signed mean difference, are added one at a time
    while the next one raises the k-sparse probe's train F1 by more than 0.03 (their
    feature-splitting rule, tau_fs): a letter split over two latents has two main latents;
  * full absorption: among the same probe-correct test positives, the fraction on which every
    main latent is silent *and* the active latent that adds most to the probe's logit
    (a_i d_i . p, p the dense probe's direction in x's space; for a linear probe that is the
    ablation effect they compute) points along the probe, cos(d_i, p) >= tau_ps;
  * absorption fraction (after SAEBench's partial absorption): per probe-correct positive, the
    share of the positive logit contributions carried by non-main latents with cos >= tau_ps.
  tau_ps is theirs, 0.025 at d_model 2304, scaled by sqrt(2304 / d_model) so that it passes the
  same share of random directions (~12%) at any width: 0.05 at d_model 576. Unscaled, 0.025
  would pass 27% of random directions there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from graphs.eval.letters.codes import (
    Codes,
    active_entries,
    check_decoder,
    check_task,
    gather,
    mean_difference,
    nanmean,
)
from graphs.eval.letters.probing import dense_probe, fit_dense, fit_probe, sparse_probe
from graphs.eval.letters.splits import Split, letter_split
from graphs.logistic import Logistic

SPLIT_F1_GAIN = 0.03  # Chanin et al.'s tau_fs: a further main latent must add this much train F1
MAX_MAIN_LATENTS = 5  # ... and at most this many main latents per letter


def absorption(codes: Codes, split: Split, main: int, dense_pred: Tensor) -> float:
    """Fraction of test positives the dense probe gets right on which the main latent is 0."""
    known = split.test[split.y_test & dense_pred]  # [n_known] rows
    if len(known) == 0:
        return float("nan")  # the residual does not carry the letter here: nothing to absorb
    return float((gather(codes, known, torch.tensor([main]))[:, 0] <= 0).float().mean())


def absorption_rate(
    codes: Codes,
    x: Tensor,
    labels: Tensor,
    letters: Sequence[int],
    seed: int = 0,
    train_frac: float = 0.7,
    groups: Tensor | None = None,
) -> dict:
    """{"absorption": mean over letters, "per_letter": {L: rate}, "main_feature": {L: latent}}.

    A letter whose dense probe gets no test positive right has rate NaN, left out of the mean."""
    check_task(codes, labels, letters, x=x)
    per_letter, main_feature = {}, {}
    for L in letters:
        split = letter_split(labels, L, train_frac, seed, groups)
        _, main_feature[L] = sparse_probe(codes, split, (1,))
        per_letter[L] = absorption(codes, split, main_feature[L], dense_probe(x, split))
    rates = list(per_letter.values())
    return {"absorption": nanmean(rates), "per_letter": per_letter, "main_feature": main_feature}


def chanin_cos_threshold(d_model: int) -> float:
    """tau_ps: Chanin et al.'s 0.025 at d_model 2304, scaled to keep its share of random cosines."""
    return 0.025 * math.sqrt(2304 / d_model)


def _f1(pred: Tensor, y: Tensor) -> float:
    tp = int((pred & y).sum())
    return 2 * tp / max(int(pred.sum()) + int(y.sum()), 1)


def main_latents(codes: Codes, split: Split) -> Tensor:
    """[k] the letter's main latents by Chanin et al.'s feature-splitting rule: candidates in order
    of signed mean difference (latents that fire *for* the letter), added while the next one
    raises the k-sparse probe's train F1 by more than SPLIT_F1_GAIN."""
    diff = mean_difference(codes, split.train, split.y_train)
    order = torch.sort(diff, descending=True, stable=True).indices[:MAX_MAIN_LATENTS]
    train_x = gather(codes, split.train, order)  # [n_train, MAX_MAIN_LATENTS]
    f1 = [
        _f1(fit_probe(train_x[:, :k], split.y_train).predict(train_x[:, :k]), split.y_train)
        for k in range(1, len(order) + 1)
    ]
    k = 1
    while k < len(order) and f1[k] - f1[k - 1] > SPLIT_F1_GAIN:
        k += 1
    return order[:k]


def _chanin_rates(
    codes: Codes, mains: Tensor, probe: Logistic, known: Tensor, decoder: Tensor, cos_min: float
) -> tuple[float, float]:
    """(full absorption, absorption fraction) of one letter over its probe-correct positives
    `known`; decoder: [n_latents, d_model] rows in x's space (any common scale)."""
    if len(known) == 0:
        return float("nan"), float("nan")
    direction = probe.w / probe.std  # the probe's logit is direction . x + const
    direction = direction / direction.norm()
    active = active_entries(codes, known)
    rows_dec = decoder.float().index_select(0, active.cols)  # [nnz, d]
    along = rows_dec @ direction  # [nnz] d_i . p
    cos = along / rows_dec.norm(dim=1).clamp_min(1e-12)
    contrib = active.values * along  # [nnz] what each active latent adds to the probe's logit
    is_main = torch.isin(active.cols, mains)
    n = len(known)
    main_fires = torch.zeros(n, dtype=torch.bool).index_fill_(0, active.rows[is_main], True)
    # the top contributor of each row (Chanin: the latent whose ablation moves the probe most)
    best = torch.full((n,), -float("inf")).scatter_reduce(0, active.rows, contrib, "amax")
    top = contrib == best[active.rows]
    aligned_top = torch.zeros(n, dtype=torch.bool).index_fill_(
        0, active.rows[top & (cos >= cos_min) & (contrib > 0)], True
    )
    full = float((~main_fires & aligned_top).float().mean())
    positive = contrib.clamp_min(0)
    absorbing = positive * (~is_main & (cos >= cos_min))
    total = torch.zeros(n).index_add_(0, active.rows, positive)
    carried = torch.zeros(n).index_add_(0, active.rows, absorbing)
    fraction = float(torch.where(total > 0, carried / total.clamp_min(1e-12), 0.0).mean())
    return full, fraction


def chanin_letter(
    codes: Codes,
    x: Tensor,
    split: Split,
    decoder: Tensor,
    cos_min: float,
    probe: Logistic | None = None,
) -> dict:
    """{"full_absorption", "absorption_fraction", "main_features"} of one letter's split."""
    probe = probe or fit_dense(x, split)
    known = split.test[split.y_test & probe.predict(x[split.test].float())]
    mains = main_latents(codes, split)
    full, fraction = _chanin_rates(codes, mains, probe, known, decoder, cos_min)
    return {
        "full_absorption": full,
        "absorption_fraction": fraction,
        "main_features": mains.tolist(),
    }


def chanin_absorption(
    codes: Codes,
    x: Tensor,
    labels: Tensor,
    letters: Sequence[int],
    decoder: Tensor,
    seed: int = 0,
    train_frac: float = 0.7,
    groups: Tensor | None = None,
    cos_min: float | None = None,
) -> dict:
    """{"full_absorption", "absorption_fraction": means over letters, "per_letter": {L: {...}}}.

    Absorption as Chanin et al. measure it (module docstring); decoder: [n_latents, d_model] rows
    in x's space; cos_min: tau_ps (default `chanin_cos_threshold(d_model)`)."""
    check_task(codes, labels, letters, x=x)
    check_decoder(decoder, x.shape[1], codes)
    cos_min = chanin_cos_threshold(x.shape[1]) if cos_min is None else cos_min
    per_letter = {
        L: chanin_letter(
            codes, x, letter_split(labels, L, train_frac, seed, groups), decoder, cos_min
        )
        for L in letters
    }
    return {
        "full_absorption": nanmean([p["full_absorption"] for p in per_letter.values()]),
        "absorption_fraction": nanmean([p["absorption_fraction"] for p in per_letter.values()]),
        "per_letter": per_letter,
    }
