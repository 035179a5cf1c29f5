"""Files of a graph autoencoder directory (format_version 1):

    cfg.json            the evidence SAE's config (a batchtopk SAE: `sae.io.load_sae` reads it
                        alone)
    sae.safetensors     the evidence SAE's weights (W_enc, b_enc, W_dec, b_dec, threshold θ)
    graph.safetensors   edge_index [2, E] (src → dst, all candidates), weight [E] (w ≥ 0),
                        gate [E] (deterministic hard-concrete gate z), strength [E]
                        (w·z, 0 = pruned), weight_raw [E], log_alpha [E] (the trainable
                        parameters), evidence_k []
    graph.json          GraphConfig, hook, model, weights sha, n_active_edges, where it came from

`load_graph(dir)` gives the active edges as a `torch_geometric.data.Data` (num_nodes = n_latents,
edge_index, edge_weight = strength), the form PyG tools and the release exporter use.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch_geometric.data import Data

from graphs.model import GraphConfig, SparseGraphAutoencoder
from sae.io import load_sae, save_sae

GRAPH_FILE, GRAPH_JSON = "graph.safetensors", "graph.json"


def save_graph_sae(
    model: SparseGraphAutoencoder, directory: str | Path, source: dict | None = None
) -> Path:
    directory = Path(directory)
    save_sae(model.sae, directory)
    model.cfg.evidence_k = float(model.evidence_k)
    with torch.no_grad():
        tensors = {
            "edge_index": model.edge_index,
            "weight": model.edge_weight(),
            "gate": model.gates(sample=False),
            "strength": model.strengths(sample=False),
            "weight_raw": model.weight_raw,
            "log_alpha": model.log_alpha,
            "evidence_k": model.evidence_k,
        }
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(tensors, directory / f".{GRAPH_FILE}.tmp")
    (directory / f".{GRAPH_FILE}.tmp").replace(directory / GRAPH_FILE)
    meta = {
        **asdict(model.cfg),
        "hook": model.sae.cfg.hook,
        "model": model.sae.cfg.model,
        "weights_sha256": model.sae.cfg.weights_sha256,
        "n_active_edges": int((tensors["strength"] > 0).sum()),
        "source": source or {},
    }
    (directory / GRAPH_JSON).write_text(json.dumps(meta, indent=2))
    return directory


def load_graph_sae(
    directory: str | Path, device: str | torch.device = "cpu"
) -> SparseGraphAutoencoder:
    directory = Path(directory)
    meta = _read_meta(directory)
    tensors = load_file(directory / GRAPH_FILE)
    known = {k: meta[k] for k in GraphConfig.__dataclass_fields__}
    model = SparseGraphAutoencoder(load_sae(directory), tensors["edge_index"], GraphConfig(**known))
    with torch.no_grad():
        model.weight_raw.copy_(tensors["weight_raw"])
        model.log_alpha.copy_(tensors["log_alpha"])
        model.evidence_k.copy_(tensors["evidence_k"])
    return model.to(device)


def load_graph(directory: str | Path) -> Data:
    """The active feature graph as `torch_geometric.data.Data` (edge_weight = w·z > 0)."""
    directory = Path(directory)
    meta = _read_meta(directory)
    tensors = load_file(directory / GRAPH_FILE)
    keep = tensors["strength"] > 0
    return Data(
        edge_index=tensors["edge_index"][:, keep],
        edge_weight=tensors["strength"][keep],
        num_nodes=meta["n_latents"],
        hook=meta["hook"],
    )


def _read_meta(directory: Path) -> dict:
    if not (directory / GRAPH_JSON).exists():
        raise FileNotFoundError(
            f"{directory} holds no {GRAPH_JSON}: not a graph autoencoder (train one with "
            "`python -m graphs train`)"
        )
    meta = json.loads((directory / GRAPH_JSON).read_text())
    if meta.get("format_version") != 1:
        raise ValueError(
            f"{directory / GRAPH_JSON} has format_version {meta.get('format_version')}, expected 1"
        )
    return meta
