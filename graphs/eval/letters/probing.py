"""Sparse probing (k-sparse probes, Gurnee et al. 2023; SAEBench's selection rule) and its ceiling.

Per letter, on the balanced task of `splits`: pick the k latents with the largest |class-mean
difference| on the train split, fit a logistic regression on those k alone, score it on the
held-out split. `dense_probe_accuracy` is the same probe on the whole residual: the ceiling.
Every probe is `graphs.logistic.fit_logistic` on float32 features with the sample std.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from graphs.eval.letters.codes import Codes, check_task, gather, mean_difference
from graphs.eval.letters.splits import Split, letter_split
from graphs.logistic import Logistic, fit_logistic

PROBE_L2 = 5e-4  # L2 strength of every letter probe: keeps separable tasks finite


def fit_probe(x: Tensor, y: Tensor) -> Logistic:
    """A letter probe on float32 features x [n, f] for labels y [n]."""
    return fit_logistic(x, y, PROBE_L2, correction=1)


def accuracy(pred: Tensor, y: Tensor) -> float:
    return float((pred == y).float().mean())


def sparse_probe(codes: Codes, split: Split, ks: Sequence[int]) -> tuple[dict[int, float], int]:
    """Held-out accuracy of the k-sparse probe for each k, and the main latent (largest signed
    mean difference: the one that fires *for* the letter)."""
    diff = mean_difference(codes, split.train, split.y_train)  # [n_latents]
    diff = F.pad(diff, (0, max(max(ks) - len(diff), 0)))  # silent tail latents of a SparseCode
    top = torch.sort(diff.abs(), descending=True, stable=True).indices[: max(ks)]  # nested sets
    train_x, test_x = gather(codes, split.train, top), gather(codes, split.test, top)  # [n, k]
    accuracies = {}
    for k in ks:
        probe = fit_probe(train_x[:, :k], split.y_train)
        accuracies[k] = accuracy(probe.predict(test_x[:, :k]), split.y_test)
    return accuracies, int(torch.argmax(diff))


def fit_dense(x: Tensor, split: Split) -> Logistic:
    """The dense probe: a logistic regression on the whole residual, fitted on the train rows."""
    return fit_probe(x[split.train].float(), split.y_train)


def dense_probe(x: Tensor, split: Split) -> Tensor:
    """[n_test] bool: the dense probe's predictions on the test rows."""
    return fit_dense(x, split).predict(x[split.test].float())


def sparse_probe_accuracy(
    codes: Codes,
    labels: Tensor,
    letters: Sequence[int],
    ks: Sequence[int] = (1, 2, 5),
    train_frac: float = 0.7,
    seed: int = 0,
    groups: Tensor | None = None,
) -> dict[int, float]:
    """Mean over letters of the balanced held-out accuracy of a k-sparse probe, for each k."""
    check_task(codes, labels, letters, ks)
    splits = [letter_split(labels, L, train_frac, seed, groups) for L in letters]
    per_letter = [sparse_probe(codes, split, ks)[0] for split in splits]
    return {k: sum(a[k] for a in per_letter) / len(per_letter) for k in ks}


def dense_probe_accuracy(
    x: Tensor,
    labels: Tensor,
    letters: Sequence[int],
    train_frac: float = 0.7,
    seed: int = 0,
    groups: Tensor | None = None,
) -> float:
    """Mean over letters of the balanced held-out accuracy of a logistic probe on the residual."""
    check_task(None, labels, letters, x=x)
    accuracies = []
    for L in letters:
        split = letter_split(labels, L, train_frac, seed, groups)
        accuracies.append(accuracy(dense_probe(x, split), split.y_test))
    return sum(accuracies) / len(accuracies)
