"""Label-free parent latents, so that the graph step has something to imply.

Why: an absorbed child ("snake" carrying "starts with s") can only hand its parent back through an
edge if a parent latent exists that fires, as evidence, on most of the class. A TopK SAE often has
no such latent for a broad class like a first letter; its token means can: averaged per token type,
each type weighs 1, so no frequent word can buy a latent of its own, and a small SAE on those means
learns latents for whole classes of words.

The recipe (`python -m graphs parents`; each step is cached under --out, so a killed run resumes;
steps 1-3 live in `graphs.token_means`):

  1. one pass of the base SAE over the store: per token type, the sum and count of the SAE's centred
     input x·s − b_dec; per latent, its firing count; the median active value;
  2. token means μ_t of the types seen ≥ min_count times, centred over types, unit rows;
  3. the token-mean SAE: TopK (n_latents, k) on the μ_t. Latent g's token set T_g is the types it
     fires on;
  4. candidates: latents whose T_g covers min_freq..max_freq of the store's tokens;
  5. the cross-cutting pick: the n_parents candidates with the highest mean Jaccard, over word
     types, with the other candidates. A word's first letter is independent of its meaning, so a
     letter latent co-fires with many semantic latents, which mostly exclude one another;
  6. injection: the base's least-used latents become the parents. Decoder u_g: the unit mean
     difference of the centred input between tokens in T_g and the rest. Encoder: u_g scaled and
     biased so that the parent fires on the average T_g token with the median active value, and not
     on the average other token;
  7. co-activation stats of that SAE; edges i -> g for P(g fires | i fires) > cut on pairs seen
     ≥ min_pair_count times, each source's best parent.

Then `python -m graphs train --store S --stats OUT/stats --edges OUT/edges.safetensors` with the
HELD_OPEN recipe (the command is printed). No step uses labels; "word type" is a property of the
token's text (letters only), not of its first letter.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from graphs.coactivation import CoactivationStats, StatsConfig, coactivation_stats
from graphs.first_letter import first_letter_labels
from graphs.token_means import (
    TypeStats,
    active_latents,
    load_type_stats,
    save_type_stats,
    token_means,
    train_tokmean_sae,
    type_statistics,
)
from sae.atomic import atomic_save_tensors, atomic_write_json
from sae.io import load_sae, save_sae
from sae.models import load_model
from sae.sae import SAE
from sae.store import ActivationStore

TYPE_STATS, TOKMEAN = "type_stats.safetensors", "tokmean-sae.safetensors"  # cached steps 1, 2-3

# Graph training with the parents: gates held open (no edge penalty, logit 6), messages only to
# features the encoder left silent, a strong detached absorption penalty, w0 0.5.
HELD_OPEN = dict(
    edge_coeff=0.0,
    absorption_coeff=100.0,
    absorption_detach=True,
    implied_only=True,
    init_weight=0.5,
    init_log_alpha=6.0,
)
# The control: the same fine-tune with every gate shut from the start (the graph never acts).
GATES_SHUT = {**HELD_OPEN, "init_log_alpha": -20.0}


@dataclass
class ParentsConfig:
    store: str = ""
    """Activation store directory (the base SAE's training store)."""
    sae: str = ""
    """The base SAE directory (a `python -m sae train` OUT/<hook>/); it is not modified."""
    out: str = ""
    """Output directory: sae/<hook>/ (the base with parents), stats/, edges.safetensors and
    parents.json."""
    tokens: int = 500_000
    """Store tokens for the token means, the firing counts and the stats (the first ones)."""
    n_parents: int = 20
    """Parents to inject."""
    latents: int = 256
    """Latents of the token-mean SAE (much wider ones split a frequent class over several)."""
    k: int = 8
    """Its TopK k."""
    steps: int = 4000
    """Its Adam steps."""
    batch_size: int = 2048
    """Its token types per step."""
    lr: float = 2e-3
    """Its Adam LR (linear decay over the last fifth)."""
    min_count: int = 3
    """Token types seen fewer times in the store have no token mean."""
    min_freq: float = 0.005
    """Candidates: the latent's token set covers at least this fraction of the store's tokens..."""
    max_freq: float = 0.2
    """... and at most this fraction."""
    cut: float = 0.3
    """Edge i -> g needs P(g fires | i fires) above this."""
    min_pair_count: int = 20
    """... on a pair seen at least this many times."""
    seed: int = 0
    """Seed of the token-mean SAE."""
    model: str = ""
    """Model whose tokenizer decodes the store's token ids (default: the store's model)."""
    device: str = "cpu"
    """Torch device for the base SAE's passes and the token-mean SAE."""


def build_parents(cfg: ParentsConfig) -> Path:
    """Run (or resume) the recipe; returns cfg.out. Each step's output is cached under cfg.out."""
    store, base, out = _check_inputs(cfg)
    n_tokens = min(cfg.tokens, len(store)) if cfg.tokens else len(store)
    types = _type_stats(cfg, base, store, n_tokens, out)
    frequent = types.counts >= cfg.min_count
    if int(frequent.sum()) <= cfg.latents:
        raise ValueError(
            f"only {int(frequent.sum())} token types are seen {cfg.min_count}+ times in "
            f"{n_tokens} tokens; the token-mean SAE needs more than its {cfg.latents} latents: "
            "pass more --tokens or fewer --latents"
        )
    tokmean = _tokmean_sae(cfg, types, frequent, out)
    parents_sae = out / "sae" / base.cfg.hook
    if not (out / "parents.json").exists():
        meta = _pick_and_install(cfg, store, base, types, tokmean, parents_sae)
        atomic_write_json(
            out / "parents.json",
            {
                "config": asdict(cfg),
                "n_tokens": n_tokens,
                "tokmean_fvu": float(_tokmean_meta(out)["fvu"]),
                "n_types": int(frequent.sum()),
                **meta,
            },
        )
    _edges(cfg, out, parents_sae, n_tokens)
    return out


def _type_stats(
    cfg: ParentsConfig, base: SAE, store: ActivationStore, n_tokens: int, out: Path
) -> TypeStats:
    """Step 1, cached: the one pass over the store, the slowest step."""
    if not (out / TYPE_STATS).exists():
        save_type_stats(type_statistics(base, store, n_tokens, cfg.device), out / TYPE_STATS)
    return load_type_stats(out / TYPE_STATS)


def _tokmean_sae(
    cfg: ParentsConfig, types: TypeStats, frequent: torch.Tensor, out: Path
) -> dict[str, torch.Tensor]:
    """Steps 2-3, cached: the frequent types' token means and the token-mean SAE's latents on them
    ({type_ids [V], active [V, latents] uint8, W_dec})."""
    if not (out / TOKMEAN).exists():
        means = token_means(types.sums[frequent], types.counts[frequent])
        sae, fvu = train_tokmean_sae(
            means, cfg.latents, cfg.k, cfg.steps, cfg.batch_size, cfg.lr, cfg.seed, cfg.device
        )
        tensors = {
            "type_ids": types.type_ids[frequent],
            "active": active_latents(sae, means).to(torch.uint8),
            "W_dec": sae.W_dec,
        }
        metadata = {"fvu": str(fvu), "latents": str(cfg.latents), "k": str(cfg.k)}
        atomic_save_tensors(out / TOKMEAN, tensors, metadata=metadata)
    return load_file(out / TOKMEAN)


def _pick_and_install(
    cfg: ParentsConfig,
    store: ActivationStore,
    base: SAE,
    types: TypeStats,
    tokmean: dict[str, torch.Tensor],
    parents_sae: Path,
) -> dict:
    """Steps 4-6: candidates, the cross-cutting pick, injection into the base (saved to
    parents_sae; base is not used after). Returns what parents.json records of them."""
    type_ids, active = tokmean["type_ids"], tokmean["active"].bool()
    type_counts = types.counts[torch.searchsorted(types.type_ids, type_ids)]
    # [latents] share of the store's tokens in each latent's token set
    freq = (active.double() * type_counts[:, None].double()).sum(0) / types.counts.sum()
    candidates = ((freq >= cfg.min_freq) & (freq <= cfg.max_freq)).nonzero().squeeze(1)
    if len(candidates) < cfg.n_parents:
        raise ValueError(
            f"{len(candidates)} token-mean latents cover {cfg.min_freq}-{cfg.max_freq} of the "
            f"tokens, fewer than --n-parents {cfg.n_parents}: lower --n-parents or widen "
            "--min-freq/--max-freq"
        )
    tokenizer = _tokenizer(cfg, store)
    words = first_letter_labels(type_ids, tokenizer) >= 0
    if int(words.sum()) == 0:
        raise ValueError(
            "no token type with a mean is a word of letters; the cross-cutting pick needs text"
        )
    crossing = mean_jaccard(active[words][:, candidates])  # [C]
    order = torch.argsort(crossing, descending=True)[: cfg.n_parents]
    picked = candidates[order]
    slots = torch.argsort(types.fires, stable=True)[: cfg.n_parents]  # the least-used latents
    inside = _type_sets(active[:, picked], type_ids, types.type_ids)  # [U, P] over store types
    mean_in, mean_out = set_means(types.sums, types.counts, inside)
    save_sae(install_parents(base, slots, mean_in, mean_out, types.median_value), parents_sae)
    return {
        "n_candidates": len(candidates),
        "slots": slots.tolist(),
        "picked": picked.tolist(),
        "mean_jaccard": crossing[order].tolist(),
        "freq": freq[picked].tolist(),
        "top_tokens": _top_tokens(inside, types, tokenizer),
    }


def _edges(cfg: ParentsConfig, out: Path, parents_sae: Path, n_tokens: int) -> None:
    """Step 7: co-activation stats of the SAE with parents (cached by coactivation_stats), then
    the child -> parent edges, recounted unless parents.json says they were written."""
    stats = coactivation_stats(
        StatsConfig(
            store=cfg.store,
            sae=str(parents_sae),
            out=str(out / "stats"),
            tokens=n_tokens,
            device=cfg.device,
        )
    )
    meta = json.loads((out / "parents.json").read_text())
    if "n_edges" not in meta:
        edges = parent_edges(stats, torch.tensor(meta["slots"]), cfg.cut, cfg.min_pair_count)
        atomic_save_tensors(out / "edges.safetensors", {"edge_index": edges})
        meta["n_edges"], meta["parents_reached"] = edges.shape[1], int(edges[1].unique().numel())
        atomic_write_json(out / "parents.json", meta)


def _tokmean_meta(out: Path) -> dict[str, str]:
    with safe_open(str(out / TOKMEAN), "pt") as f:
        return f.metadata()


def _check_inputs(cfg: ParentsConfig) -> tuple[ActivationStore, SAE, Path]:
    if not cfg.store or not cfg.sae or not cfg.out:
        raise ValueError(
            "pass --store DIR, --sae DIR (a trained SAE's <hook>/ directory) and --out DIR"
        )
    if not 0 < cfg.k <= cfg.latents:
        raise ValueError(f"--k {cfg.k} must be in 1..--latents ({cfg.latents})")
    if cfg.n_parents < 1:
        raise ValueError(f"--n-parents must be at least 1 (got {cfg.n_parents})")
    if not 0 <= cfg.min_freq < cfg.max_freq <= 1:
        raise ValueError(
            f"need 0 <= --min-freq < --max-freq <= 1 (got {cfg.min_freq}, {cfg.max_freq})"
        )
    if not 0 <= cfg.cut < 1:
        raise ValueError(f"--cut is a probability in [0, 1) (got {cfg.cut})")
    store, base = ActivationStore(cfg.store), load_sae(cfg.sae)
    if base.cfg.hook not in store.hooks:
        raise ValueError(
            f"the SAE reads {base.cfg.hook!r} but {cfg.store} holds {store.hooks}: pass the store "
            "it was trained on"
        )
    if base.cfg.n_latents < cfg.n_parents:
        raise ValueError(
            f"the base SAE has {base.cfg.n_latents} latents, fewer than --n-parents {cfg.n_parents}"
        )
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "config.json"

    def settings(fields: dict) -> dict:  # what must match for a re-run to continue (paths resolved)
        kept = {k: v for k, v in fields.items() if k not in ("out", "device")}
        return {
            **kept,
            "store": str(Path(kept["store"]).resolve()),
            "sae": str(Path(kept["sae"]).resolve()),
        }

    mine = settings(asdict(cfg))
    if saved.exists() and settings(json.loads(saved.read_text())) != mine:
        raise ValueError(
            f"{out} holds parents built with other settings ({saved}); pass a new --out"
        )
    atomic_write_json(saved, mine)
    return store, base.to(cfg.device).eval(), out


def mean_jaccard(active: torch.Tensor) -> torch.Tensor:
    """[C] float64: per column of active [N, C] bool, its mean Jaccard with every other column
    (|A ∩ B| / |A ∪ B| over the rows; 0 for two empty columns)."""
    a = active.double()
    inter = a.T @ a  # [C, C]
    size = inter.diagonal()
    union = size[:, None] + size[None, :] - inter
    jaccard = torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))
    jaccard.fill_diagonal_(0.0)
    return jaccard.sum(1) / max(active.shape[1] - 1, 1)


def _type_sets(
    active: torch.Tensor, type_ids: torch.Tensor, all_types: torch.Tensor
) -> torch.Tensor:
    """[U, P] bool: active [V, P] over the token-mean types, spread onto every store type."""
    inside = torch.zeros(len(all_types), active.shape[1], dtype=torch.bool)
    inside[torch.searchsorted(all_types, type_ids)] = active
    return inside


def set_means(
    sums: torch.Tensor, counts: torch.Tensor, inside: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column of inside [U, P] bool: the token-weighted mean [P, d] of the rows whose type is
    in the set, and of all the other rows."""
    w = inside.double()
    total_sum, total_count = sums.sum(0), counts.sum().double()
    in_sum, in_count = w.T @ sums, w.T @ counts.double()  # [P, d], [P]
    if bool((in_count == 0).any()) or bool((in_count == total_count).any()):
        raise ValueError(
            "a parent's token set is empty or holds every token: it has no mean difference"
        )
    return in_sum / in_count[:, None], (total_sum - in_sum) / (total_count - in_count)[:, None]


@torch.no_grad()
def install_parents(
    sae: SAE,
    slots: torch.Tensor,
    mean_in: torch.Tensor,
    mean_out: torch.Tensor,
    median_value: float,
) -> SAE:
    """Turn latents `slots` into parents (in place; returns sae). Parent p gets decoder u, the unit
    difference mean_in[p] − mean_out[p] (centred-input space), and encoder c·u with bias −c·mid,
    mid the midpoint of the two means along u and c = median_value / half their distance: its
    pre-activation is +median_value on the average set token and −median_value on the average
    other token."""
    for p, slot in enumerate(slots.tolist()):
        u = (mean_in[p] - mean_out[p]).float()
        u = u / u.norm()
        on, off = float(mean_in[p].float() @ u), float(mean_out[p].float() @ u)
        scale = median_value / max((on - off) / 2, 1e-6)
        sae.W_dec[slot] = u.to(sae.W_dec.device)
        sae.W_enc[slot] = scale * u.to(sae.W_enc.device)
        sae.b_enc[slot] = -scale * (on + off) / 2
    return sae


def parent_edges(
    stats: CoactivationStats, slots: torch.Tensor, cut: float, min_pair_count: int = 20
) -> torch.Tensor:
    """edge_index [2, E]: i -> p for P(p fires | i fires) > cut on pairs seen >= min_pair_count
    times, p a parent, i not one; each source keeps only its most likely parent."""
    src, dst, p = stats.conditional()
    keep = (
        (stats.pair_counts.repeat(2) >= min_pair_count)
        & torch.isin(dst, slots)
        & ~torch.isin(src, slots)
        & (p > cut)
    )
    src, dst, p = src[keep], dst[keep], p[keep]
    order = torch.from_numpy(np.lexsort((-p.numpy(), src.numpy())))  # by source, most likely first
    src, dst = src[order].long(), dst[order].long()
    first = torch.ones_like(src, dtype=torch.bool)
    first[1:] = src[1:] != src[:-1]
    return torch.stack([src[first], dst[first]])


def train_command(cfg: ParentsConfig, out: str, shut: bool = False) -> str:
    """The `python -m graphs train` command line of the recipe (or its gates-shut control)."""
    recipe = GATES_SHUT if shut else HELD_OPEN
    flags = " ".join(_flag(k, v) for k, v in recipe.items())
    return (
        f"python -m graphs train --store {cfg.store} --stats {Path(cfg.out) / 'stats'} "
        f"--edges {Path(cfg.out) / 'edges.safetensors'} --tokens {cfg.tokens} {flags} --out {out}"
    )


def _flag(name: str, value) -> str:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else f"--no-{name.replace('_', '-')}"
    return f"{flag} {value}"


def _tokenizer(cfg: ParentsConfig, store: ActivationStore):
    return load_model(cfg.model or store.manifest.model).tokenizer


def _top_tokens(inside: torch.Tensor, types: TypeStats, tokenizer, n: int = 8) -> list[list[str]]:
    """Per parent, the decoded text of its n most frequent store types (for a reader only)."""
    result = []
    for p in range(inside.shape[1]):
        members = inside[:, p].nonzero().squeeze(1)
        top = members[torch.argsort(types.counts[members], descending=True)[:n]]
        result.append(tokenizer.batch_decode([[int(types.type_ids[t])] for t in top]))
    return result
