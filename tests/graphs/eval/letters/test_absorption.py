"""Absorption, upper bound and Chanin et al.'s (graphs.eval.letters.absorption)."""

from __future__ import annotations

import pytest
import torch

from graphs.eval.letters import (
    absorption_rate,
    chanin_absorption,
    chanin_cos_threshold,
)
from tests.graphs.eval.letters.conftest import (
    ABSORBERS,
    TASK_LETTERS,
    absorbed_codes,
    decoder_rows,
    indicator_codes,
    letter_task,
    spread_absorbed_codes,
)


def test_absorption_is_zero_when_the_main_latent_always_fires() -> None:
    data = letter_task()
    result = absorption_rate(absorbed_codes(data.labels, 0.0), data.x, data.labels, TASK_LETTERS)
    assert result["main_feature"] == {0: 10, 1: 11, 2: 12}
    assert result["absorption"] == 0.0
    assert all(rate == 0.0 for rate in result["per_letter"].values())


def test_absorption_recovers_the_planted_fraction() -> None:
    data = letter_task()
    codes = absorbed_codes(data.labels, 0.3)
    result = absorption_rate(codes, data.x, data.labels, TASK_LETTERS, groups=data.token_ids)
    assert result["main_feature"][0] == 10  # 70% firing still beats the 30% absorber
    assert result["per_letter"][0] == pytest.approx(0.3, abs=0.06)
    assert result["per_letter"][1] == result["per_letter"][2] == 0.0
    assert result["absorption"] == pytest.approx(0.1, abs=0.02)


def test_chanin_absorption_counts_only_absorbers_aligned_with_the_probe() -> None:
    data = letter_task()
    codes = spread_absorbed_codes(data.labels, 0.3)
    kwargs = dict(groups=data.token_ids)
    aligned = chanin_absorption(
        codes, data.x, data.labels, TASK_LETTERS, decoder_rows(data, [10, *ABSORBERS]), **kwargs
    )
    letter = aligned["per_letter"][0]
    assert letter["main_features"] == [10]
    assert letter["full_absorption"] == pytest.approx(0.3, abs=0.06)
    assert letter["absorption_fraction"] == pytest.approx(0.3, abs=0.06)
    assert (
        aligned["per_letter"][1]["full_absorption"]
        == aligned["per_letter"][2]["full_absorption"]
        == 0.0
    )
    # the same codes, but the absorbers barely point along the probe (cos 0.1 < tau_ps): plain false
    # negatives of the main latent, which the upper bound counts and Chanin's measure does not
    weak = decoder_rows(data, [10], weak=ABSORBERS)
    plain = chanin_absorption(codes, data.x, data.labels, TASK_LETTERS, weak, **kwargs)
    assert plain["per_letter"][0]["full_absorption"] == 0.0
    assert plain["per_letter"][0]["absorption_fraction"] == 0.0
    upper = absorption_rate(codes, data.x, data.labels, TASK_LETTERS, **kwargs)["per_letter"][0]
    assert upper == pytest.approx(0.3, abs=0.06)


def test_chanin_main_latents_follow_feature_splitting() -> None:
    """Letter 0 split by token type over latents 10 and 31: two main latents, nothing absorbed,
    where the single-main-latent upper bound reports half the letter absorbed."""
    data = letter_task()
    codes = indicator_codes(data.labels)
    second = (data.labels == 0) & (data.token_ids % 12 == 6)  # half of letter 0's token types
    codes[second, 31] = codes[second, 10]
    codes[second, 10] = 0.0
    decoder = decoder_rows(data, [10, 31])
    result = chanin_absorption(codes, data.x, data.labels, [0], decoder, groups=data.token_ids)
    letter = result["per_letter"][0]
    assert sorted(letter["main_features"]) == [10, 31]
    assert letter["full_absorption"] == letter["absorption_fraction"] == 0.0
    upper = absorption_rate(codes, data.x, data.labels, [0], groups=data.token_ids)["per_letter"][0]
    assert upper > 0.3


def test_chanin_threshold_keeps_the_share_of_random_cosines() -> None:
    assert chanin_cos_threshold(2304) == pytest.approx(0.025)
    g = torch.Generator().manual_seed(0)
    shares = []
    for d in (64, 576, 2304):
        a, b = torch.randn(20_000, d, generator=g), torch.randn(20_000, d, generator=g)
        cos = torch.nn.functional.cosine_similarity(a, b)
        shares.append(float((cos >= chanin_cos_threshold(d)).float().mean()))
    assert max(shares) - min(shares) < 0.02, shares
    assert 0.08 < shares[0] < 0.16
