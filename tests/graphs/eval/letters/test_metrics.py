"""letter_metrics (graphs.eval.letters.metrics): one pass equals the single metrics; bad input fails
before any work."""

from __future__ import annotations

import pytest
import torch

from graphs.eval.letters import (
    absorption_rate,
    chanin_absorption,
    dense_probe_accuracy,
    letter_metrics,
    sparse_probe_accuracy,
)
from tests.graphs.eval.letters.conftest import (
    N_LATENTS,
    N_LETTERS,
    TASK_LETTERS,
    D,
    absorbed_codes,
    decoder_rows,
    letter_task,
    noise_codes,
)


def test_bad_inputs_fail_early() -> None:
    data = letter_task()
    with pytest.raises(ValueError, match="post-activation"):
        sparse_probe_accuracy(-noise_codes(), data.labels, TASK_LETTERS)
    with pytest.raises(ValueError, match="rows"):
        sparse_probe_accuracy(noise_codes()[:-1], data.labels, TASK_LETTERS)
    with pytest.raises(ValueError, match="0..25"):
        dense_probe_accuracy(data.x, data.labels, [26])
    with pytest.raises(ValueError, match="split needs 2"):
        dense_probe_accuracy(data.x, data.labels, [N_LETTERS])  # a letter with no tokens at all
    with pytest.raises(ValueError, match="rows in x's space"):
        chanin_absorption(
            noise_codes(), data.x, data.labels, TASK_LETTERS, torch.randn(N_LATENTS, D + 1)
        )
    with pytest.raises(ValueError, match="same SAE"):
        chanin_absorption(
            noise_codes(), data.x, data.labels, TASK_LETTERS, torch.randn(N_LATENTS - 1, D)
        )

    def encode(x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("a bad decoder must fail before the encoding pass")

    with pytest.raises(ValueError, match="rows in x's space"):
        letter_metrics(encode, data, letters=TASK_LETTERS, decoder=torch.randn(N_LATENTS, D + 1))


def test_letter_metrics_matches_the_single_metrics() -> None:
    data = letter_task()
    codes = absorbed_codes(data.labels, 0.3)
    weight = torch.randn(D, N_LATENTS)
    lookup = {tuple(row.tolist()): i for i, row in enumerate(data.x)}

    def encode(x: torch.Tensor) -> torch.Tensor:  # the planted code, found by row lookup
        return codes[[lookup[tuple(row.tolist())] for row in x]] + 0 * (x @ weight)

    result = letter_metrics(encode, data, letters=TASK_LETTERS, batch_size=1000)
    kwargs = dict(groups=data.token_ids)
    assert result["letters"] == TASK_LETTERS
    assert result["sparse_probe"] == sparse_probe_accuracy(
        codes, data.labels, TASK_LETTERS, **kwargs
    )
    assert result["dense_probe"] == dense_probe_accuracy(
        data.x, data.labels, TASK_LETTERS, **kwargs
    )
    expected = absorption_rate(codes, data.x, data.labels, TASK_LETTERS, **kwargs)
    assert result["absorption"] == pytest.approx(expected["absorption"])
    assert result["per_letter"][0]["main_feature"] == 10
    assert "full_absorption" not in result  # needs the decoder
    decoder = decoder_rows(data, [10, 30])
    with_decoder = letter_metrics(
        encode, data, letters=TASK_LETTERS, batch_size=1000, decoder=decoder
    )
    chanin = chanin_absorption(codes, data.x, data.labels, TASK_LETTERS, decoder, **kwargs)
    for key in ("full_absorption", "absorption_fraction"):
        assert with_decoder[key] == pytest.approx(chanin[key])
    # one latent on 30% of the letter adds > 0.03 F1: by Chanin's rule a split, not an absorber
    assert with_decoder["per_letter"][0]["main_features"] == [10, 30]
    assert with_decoder["full_absorption"] == 0.0
    assert with_decoder["absorption"] == result["absorption"]
    assert sorted(letter_metrics(encode, data)["letters"]) == list(range(N_LETTERS))  # all 50+
