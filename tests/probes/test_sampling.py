"""The one sampler: greedy, top-k, top-p, and seeded draws from softmax(logits / temperature)."""

from __future__ import annotations

import torch

from probes.sampling import sample_token


def test_sample_filters():
    logits = torch.tensor([0.0, 5.0, 4.9, -2.0])
    g = torch.Generator().manual_seed(0)
    assert {sample_token(logits, g, temperature=1.0, top_k=2) for _ in range(200)} == {1, 2}
    assert {sample_token(logits, g, temperature=1.0, top_p=0.3) for _ in range(50)} == {1}
    assert sample_token(logits, g) == 1


def test_unfiltered_draws_are_a_seeded_multinomial_over_the_softmax():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(1))
    ours, theirs = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for temperature in (0.5, 1.0, 2.0):
        probs = torch.softmax(logits / temperature, dim=-1)
        for _ in range(20):
            expected = int(torch.multinomial(probs, 1, generator=theirs))
            assert sample_token(logits, ours, temperature=temperature) == expected
