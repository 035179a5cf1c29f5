"""Synthetic ground truth for graph SAEs: planted child ⇒ parent features, written as a store.

The generative model (`PlantedHierarchyConfig`, defaults in brackets):

    true features   parents [0, P) | children [P, P + P·C) | free [P + P·C, n_true)
                    child j of parent p is feature P + p·C + j
    parent p        fires with parent_prob                                    [P = 32, 0.05]
    its children    only if p fires: k ~ Binomial(max_active_children, child_prob_given_parent)
                    distinct children, chosen uniformly                       [C = 3, 1, 0.7]
    free feature    fires on its own with free_prob                           [F = 64, 0.02]
    cooc pair (a,b) n_cooc disjoint pairs of free features; when one fires on its own, the other
                    joins with cooc_prob (symmetric)                          [8, 0.8]
    magnitude       a = magnitude_median · exp(magnitude_log_std · N(0,1)) > 0  [1.0, 0.3]
    x               = Σ_i a_i D_i + N(0, noise_std² I)                          [0.02]

So a child never fires without its parent (P(parent | child) = 1 exactly), while P(child | parent)
≈ max_active_children · child_prob_given_parent / C (0.23): the ideal graph has the edge
child → parent ("src active implies dst active") and not the reverse. Planting a child direction
partly along its parent's (`parent_child_cos`) makes feature absorption tempting for a plain SAE.

D is unit-norm [n_true, d_model], made incoherent by a few hundred steps of repulsion (gradient
descent on Σ cos⁸ between rows, then the children are rebuilt from their parents). With the
defaults (192 features in 64 dimensions) the largest |cos| between features that are not a
child/parent pair is 0.16 (random unit vectors give ≈ 0.5; the Welch bound is 0.10); with
parent_child_cos = 0.5 it is 0.35, as siblings share parent_child_cos² through their parent.
`PlantedHierarchy.max_cosine()` reports it.

`write_store` saves samples as an ordinary activation store (model "synthetic"), so
`python -m sae train --store DIR ...` trains on it; `graphs.eval.recovery.edge_recovery` then
scores a learned latent graph against the planted edges through a decoder ↔ dictionary matching,
next to a shuffled null (`python -m graphs eval --planted` on such a store).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sae.store import DTYPES, ActivationStore, StoreError, StoreManifest, StoreWriter

DEFAULT_HOOK = "blocks.0.hook_resid_post"
CORPUS_PREFIX = "synthetic:planted_hierarchy:"  # manifest.corpus = prefix + the config as JSON


@dataclass
class PlantedHierarchyConfig:
    d_model: int = 64
    n_parents: int = 32
    children_per_parent: int = 3
    n_free: int = 64
    parent_prob: float = 0.05
    child_prob_given_parent: float = 0.7  # chance for each of the max_active_children draws
    max_active_children: int = 1  # at most this many children of one parent fire together
    free_prob: float = 0.02
    n_cooc: int = 8  # disjoint pairs of free features that tend to fire together
    cooc_prob: float = 0.8
    magnitude_median: float = 1.0
    magnitude_log_std: float = 0.3  # 0: every active feature has magnitude_median
    noise_std: float = 0.02
    parent_child_cos: float = 0.0  # cos(D_child, D_parent); > 0 invites absorption
    decorrelate_steps: int = 300  # repulsion steps that make D incoherent (0: plain random)
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= self.max_active_children <= self.children_per_parent:
            problems.append("max_active_children must be in 1..children_per_parent")
        if 2 * self.n_cooc > self.n_free:
            problems.append(
                f"n_cooc pairs need 2·n_cooc = {2 * self.n_cooc} ≤ n_free = {self.n_free}"
            )
        if not 0.0 <= self.parent_child_cos < 1.0:
            problems.append("parent_child_cos must be in [0, 1)")
        probs = ("parent_prob", "child_prob_given_parent", "free_prob", "cooc_prob")
        problems += [
            f"{p} must be a probability in [0, 1]" for p in probs if not 0 <= getattr(self, p) <= 1
        ]
        if min(self.d_model, self.n_parents, self.children_per_parent) < 1 or self.n_free < 0:
            problems.append("d_model, n_parents, children_per_parent must be ≥ 1 and n_free ≥ 0")
        if problems:
            raise ValueError("bad PlantedHierarchyConfig: " + "; ".join(problems))

    @property
    def n_true(self) -> int:
        return self.n_parents * (1 + self.children_per_parent) + self.n_free


@dataclass
class PlantedHierarchy:
    """The planted ground truth. Build it with `PlantedHierarchy.build(cfg)` (a pure function of
    cfg)."""

    config: PlantedHierarchyConfig
    dictionary: torch.Tensor  # [n_true, d_model] float32, unit-norm rows
    parent_of: torch.Tensor  # [n_true] int64, -1 for parents and free features
    edge_index: torch.Tensor  # [2, P·C] int64, child -> parent (the planted implications)
    cooc_edge_index: torch.Tensor  # [2, 2·n_cooc] int64, a -> b then b -> a for every pair

    @classmethod
    def build(cls, cfg: PlantedHierarchyConfig) -> PlantedHierarchy:
        g = torch.Generator().manual_seed(cfg.seed)
        P, C = cfg.n_parents, cfg.children_per_parent
        children = torch.arange(P, P + P * C)  # [P·C]
        parents = torch.arange(P).repeat_interleave(C)  # [P·C], parent of each child
        parent_of = torch.full((cfg.n_true,), -1, dtype=torch.int64)
        parent_of[children] = parents
        dictionary = _dictionary(cfg, children, parents, g)
        free = P + P * C + torch.randperm(cfg.n_free, generator=g)[: 2 * cfg.n_cooc]
        a, b = free[0::2], free[1::2]  # [n_cooc] each
        cooc = torch.stack([torch.cat([a, b]), torch.cat([b, a])])
        return cls(cfg, dictionary, parent_of, torch.stack([children, parents]), cooc)

    @property
    def n_true(self) -> int:
        return self.config.n_true

    def weights_sha256(self) -> str:
        """Identity of this ground truth, used as the store's model weights hash."""
        return hashlib.sha256(self.dictionary.contiguous().numpy().tobytes()).hexdigest()

    def max_cosine(self) -> float:
        """Largest |cos| between dictionary rows that are not a planted child/parent pair."""
        gram = (self.dictionary @ self.dictionary.T).abs()  # [n_true, n_true]
        gram.fill_diagonal_(0)
        gram[self.edge_index[0], self.edge_index[1]] = 0
        gram[self.edge_index[1], self.edge_index[0]] = 0
        return float(gram.max())

    def sample(
        self, n_tokens: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [n_tokens, d_model], codes [n_tokens, n_true]), both float32; codes ≥ 0.

        Without a generator, one seeded by config.seed is used, so the call is reproducible.
        """
        cfg = self.config
        g = generator if generator is not None else torch.Generator().manual_seed(cfg.seed)
        active = self._sample_active(n_tokens, g)  # [n, n_true] bool
        log_mag = cfg.magnitude_log_std * torch.randn(active.shape, generator=g)
        codes = active * (cfg.magnitude_median * log_mag.exp())  # [n, n_true]
        noise = cfg.noise_std * torch.randn(n_tokens, cfg.d_model, generator=g)
        return codes @ self.dictionary + noise, codes

    def _sample_active(self, n: int, g: torch.Generator) -> torch.Tensor:
        cfg = self.config
        P, C = cfg.n_parents, cfg.children_per_parent
        parents = torch.rand(n, P, generator=g) < cfg.parent_prob  # [n, P]
        draws = torch.rand(n, P, cfg.max_active_children, generator=g) < cfg.child_prob_given_parent
        n_kids = draws.sum(-1) * parents  # [n, P]: 0 whenever the parent is silent
        # n_kids distinct uniform children: the first n_kids of a random order of the C children
        order = torch.rand(n, P, C, generator=g).argsort(-1)  # [n, P, C] child at each rank
        chosen = torch.arange(C) < n_kids[..., None]  # [n, P, C] is rank r among the first n_kids
        children = (
            torch.zeros(n, P, C, dtype=torch.bool).scatter_(-1, order, chosen).reshape(n, P * C)
        )
        own = torch.rand(n, cfg.n_free, generator=g) < cfg.free_prob  # [n, F]
        free = own.clone()
        a, b = self.cooc_edge_index[:, : cfg.n_cooc] - P * (1 + C)  # [n_cooc] free-local indices
        join = torch.rand(n, cfg.n_cooc, 2, generator=g) < cfg.cooc_prob
        free[:, b] |= own[:, a] & join[..., 0]
        free[:, a] |= own[:, b] & join[..., 1]
        return torch.cat([parents, children, free], dim=1)


def _unit(m: torch.Tensor) -> torch.Tensor:
    return m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _dictionary(
    cfg: PlantedHierarchyConfig, children: torch.Tensor, parents: torch.Tensor, g: torch.Generator
) -> torch.Tensor:
    """Unit rows [n_true, d]: repelled random directions, children then tilted towards parents."""
    d = _unit(torch.randn(cfg.n_true, cfg.d_model, generator=g, dtype=torch.float64))
    # One thread: the matrices are tiny (threads only add overhead), and a BLAS may sum in another
    # order with more threads, which would change the dictionary's hash that identifies a store.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # descent on Σ cos⁸: pushes hardest on the worst pairs
        for _ in range(cfg.decorrelate_steps):
            gram = d @ d.T  # [n_true, n_true]
            gram.fill_diagonal_(0)
            step = gram.pow(7) @ d  # [n_true, d]
            d = _unit(d - 0.05 * step / step.norm(dim=1).max().clamp_min(1e-12))
    finally:
        torch.set_num_threads(threads)
    own = _unit(d[children] - (d[children] * d[parents]).sum(1, keepdim=True) * d[parents])
    c = cfg.parent_child_cos
    d[children] = c * d[parents] + math.sqrt(1 - c * c) * own  # unit: own ⟂ parent
    return d.float()


# ---------------------------------------------------------------------------------- store


def shard_seed(seed: int, index: int) -> int:
    """Seed of the generator that made shard `index` of a store written with `seed`."""
    return seed * 1_000_003 + index


def write_store(
    hierarchy: PlantedHierarchy,
    out_dir: str | Path,
    n_tokens: int,
    seed: int = 0,
    hook: str = DEFAULT_HOOK,
    shard_tokens: int = 8192,
    context_size: int = 128,
    dtype: str = "float32",
    split: str = "train",
) -> ActivationStore:
    """Write n_tokens samples as a greylens activation store; resumes a store left unfinished.

    Shard i holds `hierarchy.sample(n_i, Generator().manual_seed(shard_seed(seed, i)))`. Row
    columns are fakes in the harvest layout: windows of context_size − 1 rows (BOS not stored),
    and token_ids = 1 + the strongest true feature of the row (0: no feature fired).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if n_tokens < 1 or shard_tokens < 1 or context_size < 2:
        raise ValueError("need n_tokens ≥ 1, shard_tokens ≥ 1 and context_size ≥ 2")
    cfg = hierarchy.config
    config_json = json.dumps(asdict(cfg), sort_keys=True, separators=(",", ":"))
    manifest = StoreManifest(
        model="synthetic",
        weights_sha256=hierarchy.weights_sha256(),
        hooks=[hook],
        d_model=cfg.d_model,
        dtype=dtype,
        context_size=context_size,
        corpus=CORPUS_PREFIX + config_json,
        seed=seed,
        n_tokens_target=n_tokens,
        windows_per_shard=math.ceil(shard_tokens / (context_size - 1)),
        keep_bos=False,
        split=split,
    )
    writer = StoreWriter.open(out_dir, manifest)
    n_shards = math.ceil(n_tokens / shard_tokens)
    # a resumed store continues after its last complete shard; a complete one writes nothing
    for index in range(writer.n_shards_done, n_shards):
        first = index * shard_tokens
        n = min(shard_tokens, n_tokens - first)
        x, codes = hierarchy.sample(n, torch.Generator().manual_seed(shard_seed(seed, index)))
        rows = torch.arange(first, first + n)  # [n] global row index
        strongest = torch.where(codes.amax(1) > 0, codes.argmax(1) + 1, 0)
        writer.write_shard(
            {
                hook: x.to(DTYPES[dtype]),
                "token_ids": strongest.to(torch.int32),
                "doc_ids": (rows // (context_size - 1)).to(torch.int32),
                "positions": (1 + rows % (context_size - 1)).to(torch.int32),
            }
        )
    writer.finish()
    return ActivationStore(out_dir)


def hierarchy_from_store(store: ActivationStore | str | Path) -> PlantedHierarchy:
    """Rebuild the ground truth of a store made by `write_store` (checked against its hash)."""
    store = store if isinstance(store, ActivationStore) else ActivationStore(store)
    corpus = store.manifest.corpus
    if not corpus.startswith(CORPUS_PREFIX):
        raise StoreError(
            f"{store.directory} was not written by graphs.eval.planted.write_store (corpus "
            f"{corpus[:40]!r})"
        )
    hierarchy = PlantedHierarchy.build(
        PlantedHierarchyConfig(**json.loads(corpus[len(CORPUS_PREFIX) :]))
    )
    if hierarchy.weights_sha256() != store.manifest.weights_sha256:
        raise StoreError(
            f"rebuilding {store.directory}'s dictionary gave another hash (different torch or "
            "platform numerics); rewrite the store with write_store on this machine"
        )
    return hierarchy


def store_codes(hierarchy: PlantedHierarchy, store: ActivationStore) -> torch.Tensor:
    """True codes [len(store), n_true] of every row of a `write_store` store, in row order."""
    hook, seed, parts = store.hooks[0], store.manifest.seed, []
    for index, info in enumerate(store.manifest.shards):
        x, codes = hierarchy.sample(
            info.n_tokens, torch.Generator().manual_seed(shard_seed(seed, index))
        )
        stored = store.shard(index)[hook].float()
        if not torch.allclose(stored, x, rtol=1e-2, atol=1e-2):  # float16/bfloat16 rounding
            raise StoreError(
                f"shard {index} of {store.directory} does not match this hierarchy's samples"
            )
        parts.append(codes)
    return torch.cat(parts)
