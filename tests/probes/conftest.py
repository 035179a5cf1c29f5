"""Probe fixtures on the tiny model: a marker-word task, its activations, a random SAE on disk."""

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
