"""Planted first-letter tasks and codes the letter tests share: tokens of N_TYPES types whose
letter is a property of the type, indicator latents, absorbers and decoders."""

from __future__ import annotations

import torch

from graphs.eval.letters import (
    LetterTaskData,
)
from graphs.eval.letters.probing import fit_probe
from graphs.eval.letters.splits import letter_split
from sae.sae import SparseCode

HOOK = "blocks.1.hook_resid_post"
N, N_LETTERS, D, N_TYPES, N_LATENTS = 6000, 6, 16, 120, 40


TASK_LETTERS = [0, 1, 2]


def letter_task(seed: int = 0, separation: float = 3.0) -> LetterTaskData:
    """Tokens of N_TYPES types, each type with a fixed first letter; x clusters by letter."""
    g = torch.Generator().manual_seed(seed)
    token_ids = torch.randint(0, N_TYPES, (N,), generator=g)
    labels = token_ids % N_LETTERS  # [N] the letter is a property of the token, as in real text
    means = separation * torch.randn(N_LETTERS, D, generator=g)
    x = means[labels] + torch.randn(N, D, generator=g)  # [N, D]
    return LetterTaskData(x, labels, token_ids)


def noise_codes(seed: int = 1) -> torch.Tensor:
    """[N, N_LATENTS] non-negative codes, ~20% active, unrelated to any label."""
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(N, N_LATENTS, generator=g)
    return values * (torch.rand(N, N_LATENTS, generator=g) < 0.2)


def indicator_codes(labels: torch.Tensor) -> torch.Tensor:
    """Noise codes plus latent 10 + L firing exactly on letter L (for each letter L), and a
    strong always-on latent 39 that carries no label (a selection rule must not pick it)."""
    codes = noise_codes()
    codes[:, 39] = 3.0 + torch.rand(N, generator=torch.Generator().manual_seed(2))
    for letter in range(N_LETTERS):
        codes[:, 10 + letter] = (labels == letter).float() * (1.0 + torch.rand(N))
    return codes


def to_sparse(dense: torch.Tensor) -> SparseCode:
    rows, cols = dense.nonzero(as_tuple=True)
    return SparseCode(dense[rows, cols], cols, rows, dense.shape[0])


def absorbed_codes(labels: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indicator codes where, on `fraction` of letter-0 tokens, latent 30 fires instead of 10."""
    codes = indicator_codes(labels)
    pos = (labels == 0).nonzero().squeeze(1)
    taken = pos[torch.randperm(len(pos), generator=torch.Generator().manual_seed(3))]
    taken = taken[: round(fraction * len(pos))]
    codes[taken, 30] = codes[taken, 10]
    codes[taken, 10] = 0.0
    return codes


def probe_direction(data: LetterTaskData, letter: int) -> torch.Tensor:
    """The unit direction in x's space of the dense probe the metric fits for this letter."""
    split = letter_split(data.labels, letter, 0.7, seed=0, groups=data.token_ids)
    probe = fit_probe(data.x[split.train], split.y_train)
    direction = probe.w / probe.std
    return direction / direction.norm()


def decoder_rows(
    data: LetterTaskData, aligned: list[int], weak: list[int] | None = None
) -> torch.Tensor:
    """[N_LATENTS, D] unit rows: the `aligned` latents point along letter 0's probe, the `weak`
    ones have cos 0.1 with it (below tau_ps = 0.3 at D = 16), every other row is orthogonal to it
    (so only the planted latents can carry the letter)."""
    p = probe_direction(data, 0)
    rows = torch.randn(N_LATENTS, D, generator=torch.Generator().manual_seed(5))
    rows -= (rows @ p)[:, None] * p
    rows = rows / rows.norm(dim=1, keepdim=True)
    weak = weak or []
    rows[weak] = 0.1 * p + (1 - 0.1**2) ** 0.5 * rows[weak]
    rows[aligned] = p
    return rows


ABSORBERS = list(range(20, 36))


def spread_absorbed_codes(labels: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indicator codes where, on `fraction` of letter-0 tokens, one of 16 absorbing latents (each
    on ~2% of the letter, like token-specific latents) fires instead of main latent 10."""
    codes = indicator_codes(labels)
    codes[:, ABSORBERS] = 0.0  # silent elsewhere, so they carry the letter only where they absorb
    g = torch.Generator().manual_seed(3)
    pos = (labels == 0).nonzero().squeeze(1)
    taken = pos[torch.randperm(len(pos), generator=g)][: round(fraction * len(pos))]
    absorber = torch.tensor(ABSORBERS)[torch.randint(0, len(ABSORBERS), (len(taken),), generator=g)]
    codes[taken, absorber] = codes[taken, 10]
    codes[taken, 10] = 0.0
    return codes
