"""Cross-layer transition graph: which features at layer l predict which features at layer l + Δ.

    t̂_tj = ReLU(b_j + Σ_{i → j} W_ij s_ti)     s: source code (layer l), t̂: target code (layer l+Δ)

W is sparse twice over: each target keeps only its top-m source candidates by cross-layer
co-activation (computed like the within-layer statistics, over (source, target) pairs of the same
token), and an L1 penalty drives most of the remaining weights to zero. Fitting streams a store that
holds both hooks; each batch is encoded by both SAEs. The message passing is the same bipartite
`ImplicationConv` as the graph autoencoder's: O(k·m) per token.

Files: `transition.safetensors` (edge_index [2, E] source → target, weight [E], bias [n_target]) +
`transition.json` (hooks, SAE directories, fit statistics).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from graphs.coactivation_scores import CoactivationStats
from graphs.io import GRAPH_JSON, load_graph_sae
from graphs.model import ImplicationConv, SparseGraphAutoencoder, expand_out_edges
from graphs.pair_counter import CoactivationCounter
from sae.hooks import hook_layer
from sae.io import load_sae
from sae.sae import SAE, SparseCode
from sae.store import ActivationStore

TRANSITION_FILE, TRANSITION_JSON = "transition.safetensors", "transition.json"


class TransitionGraph(nn.Module):
    def __init__(self, edge_index: torch.Tensor, n_source: int, n_target: int) -> None:
        super().__init__()
        order = torch.argsort(edge_index[0] * n_target + edge_index[1])  # CSR by source
        self.register_buffer("edge_index", edge_index[:, order].contiguous())  # [2, E]
        self.n_source, self.n_target = n_source, n_target
        # small positive start: with W = 0 every prediction sits at the ReLU's kink and gets no
        # gradient
        self.weight = nn.Parameter(torch.full((edge_index.shape[1],), 0.01))
        self.bias = nn.Parameter(torch.zeros(n_target))
        self.conv = ImplicationConv()

    def token_edges(
        self, source: SparseCode
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every edge leaving an active source entry: (entry [T], edge_id [T], target key
        t·n_target + j [T], message W_ij s_ti [T]). Only the out-edges of active features
        are touched."""
        src, dst = self.edge_index
        entry, edge_id = expand_out_edges(src, self.n_source, source.cols)
        target_key = source.rows[entry] * self.n_target + dst[edge_id]
        return (
            entry,
            edge_id,
            target_key,
            self.weight.index_select(0, edge_id) * source.values[entry],
        )

    def forward(self, source: SparseCode) -> torch.Tensor:
        """Predicted target code, dense [N, n_target], from a source code."""
        entry, edge_id, target_key, _ = self.token_edges(source)
        weight = self.weight.index_select(0, edge_id)
        messages = self.conv(
            source.values.unsqueeze(1),
            torch.stack([entry, target_key]),
            weight,
            size=(len(source.values), source.n_rows * self.n_target),
        )
        return (messages.view(source.n_rows, self.n_target) + self.bias).relu()

    def save(self, directory: str | Path, meta: dict) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            "edge_index": self.edge_index,
            "weight": self.weight.detach(),
            "bias": self.bias.detach(),
        }
        save_file(
            {k: v.cpu().contiguous() for k, v in tensors.items()},
            directory / f".{TRANSITION_FILE}.tmp",
        )
        (directory / f".{TRANSITION_FILE}.tmp").replace(directory / TRANSITION_FILE)
        meta = {**meta, "n_source": self.n_source, "n_target": self.n_target, "format_version": 1}
        (directory / TRANSITION_JSON).write_text(json.dumps(meta, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> tuple[TransitionGraph, dict]:
        directory = Path(directory)
        if not (directory / TRANSITION_JSON).exists():
            raise FileNotFoundError(
                f"{directory} holds no {TRANSITION_JSON}; fit one with `python -m graphs "
                "transition`"
            )
        meta = json.loads((directory / TRANSITION_JSON).read_text())
        tensors = load_file(directory / TRANSITION_FILE)
        graph = cls(tensors["edge_index"], meta["n_source"], meta["n_target"])
        with torch.no_grad():
            graph.weight.copy_(tensors["weight"])
            graph.bias.copy_(tensors["bias"])
        return graph, meta


@dataclass
class TransitionConfig:
    store: str = ""
    """Activation store holding both the source and the target hook (one harvest, two hooks)."""
    source: str = ""
    """Source model at layer l: a graph autoencoder directory (`python -m graphs train`) or an SAE
    directory."""
    target: str = ""
    """Target SAE directory at layer l + Δ."""
    out: str = ""
    """Output directory (transition.safetensors + transition.json)."""
    m: int = 32
    """Candidate source features per target feature (top by cross-layer NPMI)."""
    min_count: int = 5
    """(source, target) pairs that co-fire on fewer tokens are never candidates."""
    tokens: int = 0
    """Tokens to use, the first ones in store order (0: the whole store)."""
    batch_size: int = 4096
    """Tokens per batch."""
    epochs: int = 3
    """Passes of the fit over the (cached) codes."""
    lr: float = 0.01
    """Adam learning rate of the weights and biases."""
    l1: float = 1e-4
    """L1 on the weights (proximal step: weights reach exactly 0)."""
    seed: int = 0
    """Seed of the batch order."""


def fit_transition(cfg: TransitionConfig) -> tuple[TransitionGraph, dict]:
    """Cache both codes over the store, pick candidates by co-activation, fit W by Adam + L1
    prox."""
    source, target, store = _check_transition_inputs(cfg)
    codes = _cached_codes(source, target, store, cfg)
    n_s, n_t = _n_latents(source), target.cfg.n_latents
    edge_index = _cross_candidates(codes, n_s, n_t, cfg)
    graph = TransitionGraph(edge_index, n_s, n_t)
    optimizer = torch.optim.Adam(graph.parameters(), lr=cfg.lr)
    generator = torch.Generator().manual_seed(cfg.seed)
    for _ in tqdm(range(cfg.epochs), desc="fit transition", unit="epoch"):
        for b in torch.randperm(len(codes), generator=generator).tolist():
            s, t = codes[b]
            loss = _code_fvu(graph(s), t.to_dense(n_t))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():  # proximal L1: shrink toward 0 and stop there
                graph.weight.copy_(
                    graph.weight.sign() * (graph.weight.abs() - cfg.lr * cfg.l1).clamp_min(0)
                )
    with torch.no_grad():
        fvu = sum(_code_fvu(graph(s), t.to_dense(n_t)).item() for s, t in codes) / len(codes)
    meta = {
        "config": asdict(cfg),
        "source_hook": _hook(source),
        "target_hook": target.cfg.hook,
        "source": cfg.source,
        "target": cfg.target,
        "code_fvu": fvu,
        "n_candidates": edge_index.shape[1],
        "n_nonzero": int((graph.weight != 0).sum()),
    }
    graph.save(cfg.out, meta)
    return graph, meta


def load_coder(directory: str | Path) -> SparseGraphAutoencoder | SAE:
    """A graph autoencoder if the directory holds graph.json, else a plain SAE."""
    return (
        load_graph_sae(directory)
        if (Path(directory) / GRAPH_JSON).exists()
        else load_sae(directory)
    )


def sparse_code(coder: SparseGraphAutoencoder | SAE, x: torch.Tensor) -> SparseCode:
    """The code a coder gives raw x: post-propagation for a graph autoencoder."""
    return coder.encode(x).code if isinstance(coder, SparseGraphAutoencoder) else coder.encode(x)


def _hook(coder) -> str:
    return coder.sae.cfg.hook if isinstance(coder, SparseGraphAutoencoder) else coder.cfg.hook


def _n_latents(coder) -> int:
    return (
        coder.sae.cfg.n_latents
        if isinstance(coder, SparseGraphAutoencoder)
        else coder.cfg.n_latents
    )


def _check_transition_inputs(cfg: TransitionConfig):
    if not (cfg.store and cfg.source and cfg.target and cfg.out):
        raise ValueError("pass --store, --source (graph or SAE dir), --target (SAE dir) and --out")
    store, source, target = ActivationStore(cfg.store), load_coder(cfg.source), load_sae(cfg.target)
    for name, hook in (("source", _hook(source)), ("target", target.cfg.hook)):
        if hook not in store.hooks:
            raise ValueError(
                f"the {name} reads {hook}; the store holds {', '.join(store.hooks)}: harvest both "
                "hooks"
            )
    if hook_layer(target.cfg.hook) <= hook_layer(_hook(source)):
        raise ValueError(
            f"the target ({target.cfg.hook}) must be at a later layer than the source "
            f"({_hook(source)})"
        )
    return source, target, store


@torch.no_grad()
def _cached_codes(
    source, target, store: ActivationStore, cfg: TransitionConfig
) -> list[tuple[SparseCode, SparseCode]]:
    """Both codes of every batch (rows passed through by either coder are dropped)."""
    n_tokens = min(len(store), cfg.tokens or len(store))
    hooks, codes = [_hook(source), target.cfg.hook], []
    for start in tqdm(range(0, n_tokens, cfg.batch_size), desc="encode both layers", unit="batch"):
        rows = store.rows(torch.arange(start, min(start + cfg.batch_size, n_tokens)), hooks=hooks)
        x_s, x_t = rows[hooks[0]].float(), rows[hooks[1]].float()
        sae_s = source.sae if isinstance(source, SparseGraphAutoencoder) else source
        keep = ~(sae_s.passthrough(x_s) | target.passthrough(x_t))
        codes.append((sparse_code(source, x_s[keep]), target.encode(x_t[keep])))
    return codes


def _cross_candidates(codes, n_s: int, n_t: int, cfg: TransitionConfig) -> torch.Tensor:
    """Top-m sources per target by NPMI of (source i, target j) co-firing on the same token.

    Both codes are counted as one code over n_s + n_t latents (target ids shifted by n_s); the
    pairs straddling the two ranges are the cross-layer ones.
    """
    counter = CoactivationCounter(n_s + n_t)
    for s, t in tqdm(codes, desc="cross-layer co-activation", unit="batch"):
        joint = torch.cat([s.rows * (n_s + n_t) + s.cols, t.rows * (n_s + n_t) + t.cols + n_s])
        joint_values = torch.cat([s.values, t.values])
        order = torch.argsort(joint)
        counter.add(
            SparseCode(
                joint_values[order],
                joint[order] % (n_s + n_t),
                joint[order] // (n_s + n_t),
                s.n_rows,
            )
        )
    stats = counter.stats()
    cross = (stats.pair_index[0] < n_s) & (stats.pair_index[1] >= n_s)
    stats = CoactivationStats(
        n_s + n_t,
        stats.n_tokens,
        stats.feature_counts,
        stats.pair_index[:, cross],
        stats.pair_counts[cross],
    )
    keep = (stats.pair_counts >= cfg.min_count) & (stats.pmi() > 0)
    src, dst, score = stats.pair_index[0, keep], stats.pair_index[1, keep] - n_s, stats.npmi()[keep]
    # by target, best first
    order = torch.from_numpy(np.lexsort((src.numpy(), -score.numpy(), dst.numpy())))
    src, dst = src[order], dst[order]
    per_target = torch.bincount(dst, minlength=n_t)
    rank = torch.arange(len(dst)) - (torch.cumsum(per_target, 0) - per_target)[dst]
    top = rank < cfg.m
    if not bool(top.any()):
        raise ValueError(
            f"no (source, target) pair co-fired {cfg.min_count}+ times; use more tokens or lower "
            "--min-count"
        )
    return torch.stack([src[top], dst[top]])


def _code_fvu(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Σ(t̂ − t)² / Σ(t − mean t)² over a batch of dense target codes [N, n_t]."""
    return (predicted - target).pow(2).sum() / (target - target.mean(0)).pow(2).sum().clamp_min(
        1e-12
    )
