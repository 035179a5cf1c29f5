"""Reconstruction of a graph autoencoder at post-propagation L0, and the size of its graph.

    graph_metrics(model, store)    FVU, L0 before / after the graph step, implied features per
                                   token, dead fraction, active edges, mean out-degree
    without_edges(model)           the same model with every gate shut: what the edges add
    edge_jaccard(a, b, n)          overlap of two edge sets (stability across seeds)

All definitions (FVU, L0, dead) are `sae.metrics`'s. CE loss recovered comes from splicing
`graphs.coders.AsSAE(model)` into the model with `sae.evaluate.splice_metrics`.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from graphs.model import SparseGraphAutoencoder
from sae import metrics
from sae.store import ActivationStore


@torch.no_grad()
def graph_metrics(
    model: SparseGraphAutoencoder,
    store: ActivationStore,
    max_tokens: int | None = None,
    batch_size: int = 4096,
) -> dict:
    hook, n = model.sae.cfg.hook, model.n_latents
    if hook not in store.hooks:
        raise ValueError(f"the store has no {hook} (it holds {', '.join(store.hooks)})")
    store.check_model(model.sae.cfg.model, model.sae.cfg.weights_sha256, model.sae.cfg.d_in)
    n_tokens = min(len(store), max_tokens or len(store))
    accumulator = metrics.FVUAccumulator(model.sae.cfg.d_in)
    fired = torch.zeros(n, dtype=torch.int64)
    evidence_total = implied_total = edges_fired = scored = 0
    for start in tqdm(range(0, n_tokens, batch_size), desc="eval graph", unit="batch"):
        x = store.rows(torch.arange(start, min(start + batch_size, n_tokens)), hooks=[hook])[hook]
        x = x[~model.sae.passthrough(x)]
        graph_code = model.encode(x)
        code = graph_code.code
        active = code.values > 0
        accumulator.update(x, model.decode_n(code) / model.sae.cfg.input_scale, int(active.sum()))
        fired += torch.bincount(code.cols[active], minlength=n)
        evidence_total += int((graph_code.evidence.values > 0).sum())
        implied_total += int((~graph_code.from_evidence & active).sum())
        edges_fired += len(graph_code.edge_id)
        scored += x.shape[0]
    result = accumulator.result()
    edges, _ = model.active_edges()
    result.update(
        {
            "l0_evidence": evidence_total / scored,
            "implied_per_token": implied_total / scored,
            "token_edges_per_token": edges_fired / scored,
            "active_edges": edges.shape[1],
            "mean_degree": edges.shape[1] / n,
            "candidate_edges": model.edge_index.shape[1],
            "dead_fraction": metrics.dead_fraction(
                torch.where(fired == 0, scored, 0), window=scored
            ),
            "tokens": scored,
        }
    )
    return result


def without_edges(model: SparseGraphAutoencoder) -> SparseGraphAutoencoder:
    """The graph autoencoder with every gate shut (in place): its evidence SAE alone, to see what
    the edges add."""
    with torch.no_grad():
        model.log_alpha.fill_(-1e4)
    return model


def edge_jaccard(a: torch.Tensor, b: torch.Tensor, n_nodes: int) -> float:
    """|A ∩ B| / |A ∪ B| of two directed edge sets given as [2, E] index tensors."""
    keys_a, keys_b = torch.unique(a[0] * n_nodes + a[1]), torch.unique(b[0] * n_nodes + b[1])
    union = len(torch.unique(torch.cat([keys_a, keys_b])))
    return float(torch.isin(keys_a, keys_b).sum()) / union if union else 0.0
