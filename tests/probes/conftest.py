"""Probe fixtures on the tiny model: a marker-word task, its activations, a random SAE on disk and
one with latents planted on the marker word."""

from __future__ import annotations

import random

import pytest
import torch

from probes.activations import Features, collect, encode, load_encoder
from sae.io import save_sae
from sae.sae import SAE, SAEConfig

HOOK = "blocks.1.hook_resid_post"
WORDS = "the a king of land river stone light house green over under with and then was".split()


def marker_texts(n: int, seed: int = 0) -> tuple[list[str], torch.Tensor]:
    """Half the texts contain the marker word 'zebra' somewhere (label 1), half do not."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 10))]
        if i % 2:
            words.insert(rng.randrange(len(words)), "zebra")
        texts.append(" ".join(words))
        labels.append(i % 2)
    return texts, torch.tensor(labels)


@pytest.fixture(scope="session")
def tiny_sae_dir(tiny, tmp_path_factory):
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=tiny.d_model, n_latents=128, k=8, hook=HOOK, model="tiny"))
    return save_sae(sae, tmp_path_factory.mktemp("sae") / HOOK)


@pytest.fixture(scope="session")
def marker_task(tiny, tiny_sae_dir):
    """(texts, labels, Features with the random SAE's code) for 80 training texts."""
    texts, y = marker_texts(80)
    acts, _ = collect(tiny, texts, [HOOK], max_tokens=32, progress=False)
    encoder = load_encoder(tiny_sae_dir)
    code, n_latents = encode(encoder, acts[HOOK])
    return texts, y, Features(acts[HOOK], code, n_latents)


PLANTED = (
    3,
    5,
)  # latents of `planted_sae_dir` that fire on the marker word's tokens, and only there


@pytest.fixture(scope="session")
def planted_sae_dir(tiny, tmp_path_factory):
    """The random SAE with latents 3 and 5 planted: both read the direction from the mean residual
    of other tokens to that of the tokens only 'zebra' has, with a bias halfway between the two
    sets' projections, so they fire on those tokens and nowhere else (5 twice as strongly, so that
    it alone separates the classes best)."""
    texts, _ = marker_texts(200, seed=11)
    acts, token_ids = collect(tiny, texts, [HOOK], max_tokens=32, progress=False)
    x, ids = acts[HOOK].values, torch.cat(token_ids)  # [n_tokens, d_model], [n_tokens]
    zebra_texts = [ids for text, ids in zip(texts, token_ids, strict=True) if "zebra" in text]
    other_ids = torch.cat(
        [ids for text, ids in zip(texts, token_ids, strict=True) if "zebra" not in text]
    )
    marker_ids = torch.tensor(
        sorted(set(torch.cat(zebra_texts).tolist()) - set(other_ids.tolist()))
    )
    on_marker = torch.isin(ids, marker_ids)  # [n_tokens]
    direction = x[on_marker].mean(0) - x[~on_marker].mean(0)
    unit = direction / direction.norm()
    projection = x @ unit  # [n_tokens]
    low, high = float(projection[~on_marker].max()), float(projection[on_marker].min())
    assert low < high, "the marker tokens are not separable on the tiny model's residual"
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=tiny.d_model, n_latents=128, k=8, hook=HOOK, model="tiny"))
    with torch.no_grad():
        for latent, scale in ((3, 5_000.0), (5, 10_000.0)):
            sae.W_enc[latent] = unit * scale
            sae.b_enc[latent] = -scale * (low + high) / 2
    return save_sae(sae, tmp_path_factory.mktemp("planted") / HOOK)
