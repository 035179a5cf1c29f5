"""Label-free parent latents, so that the graph step has something to imply.

Why: an absorbed child ("snake" carrying "starts with s") can only hand its parent back through an
edge if a parent latent exists that fires, as evidence, on most of the class. A TopK SAE often has
no such latent for a broad class like a first letter; its token means can: averaged per token type,
each type weighs 1, so no frequent word can buy a latent of its own, and a small SAE on those means
learns latents for whole classes of words.

The recipe (`python -m graphs parents`; each step is cached under --out, so a killed run resumes):

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
from safetensors.torch import load_file
from tqdm.auto import tqdm

from graphs.coactivation import CoactivationStats, StatsConfig, coactivation_stats
from graphs.first_letter import first_letter_labels
from sae.atomic import atomic_save_tensors, atomic_write_json
from sae.io import load_sae, save_sae
from sae.sae import SAE, SAEConfig
from sae.store import ActivationStore

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


@dataclass
class TypeStats:
    """What one pass of the base SAE over the store gives (step 1)."""

    type_ids: torch.Tensor  # [U] int64: every token type in the counted rows
    # [U, d] float64: sum of the SAE's centred input x·s − b_dec over the type's rows
    sums: torch.Tensor
    counts: torch.Tensor  # [U] int64
    fires: torch.Tensor  # [n_latents] int64: base latent firings
    median_value: float  # median active value of the base SAE (first 8 batches)


def build_parents(cfg: ParentsConfig) -> Path:
    """Run (or resume) the recipe; returns cfg.out."""
    store, base, out = _check_inputs(cfg)
    hook = base.cfg.hook
    n_tokens = min(cfg.tokens, len(store)) if cfg.tokens else len(store)
    if not (out / "type_stats.safetensors").exists():
        # the one pass over the store, the slowest step
        _save_type_stats(
            type_statistics(base, store, n_tokens, cfg.device), out / "type_stats.safetensors"
        )
    types = _load_type_stats(out / "type_stats.safetensors")
    frequent = types.counts >= cfg.min_count
    if int(frequent.sum()) <= cfg.latents:
        raise ValueError(
            f"only {int(frequent.sum())} token types are seen {cfg.min_count}+ times in "
            f"{n_tokens} tokens; the token-mean SAE needs more than its {cfg.latents} latents: "
            "pass more --tokens or fewer --latents"
        )
    if not (out / "tokmean-sae.safetensors").exists():
        means = token_means(types.sums[frequent], types.counts[frequent])
        sae, fvu = train_tokmean_sae(means, cfg)
        active = _active(sae, means)
        atomic_save_tensors(
            out / "tokmean-sae.safetensors",
            {
                "type_ids": types.type_ids[frequent],
                "active": active.to(torch.uint8),
                "W_dec": sae.W_dec,
            },
            metadata={"fvu": str(fvu), "latents": str(cfg.latents), "k": str(cfg.k)},
        )
    tokmean = load_file(out / "tokmean-sae.safetensors")
    parents_sae = out / "sae" / hook
    if not (out / "parents.json").exists():
        type_ids, active = tokmean["type_ids"], tokmean["active"].bool()
        type_counts = types.counts[torch.searchsorted(types.type_ids, type_ids)]
        # [latents]
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
        # the least-used base latents
        slots = torch.argsort(types.fires, stable=True)[: cfg.n_parents]
        # [U, P] bool over all store types
        inside = _type_sets(active[:, picked], type_ids, types.type_ids)
        mean_in, mean_out = set_means(types.sums, types.counts, inside)
        # base: not used after
        save_sae(install_parents(base, slots, mean_in, mean_out, types.median_value), parents_sae)
        atomic_write_json(
            out / "parents.json",
            {
                "config": asdict(cfg),
                "n_tokens": n_tokens,
                "tokmean_fvu": float(_tokmean_meta(out)["fvu"]),
                "n_types": int(frequent.sum()),
                "n_candidates": len(candidates),
                "slots": slots.tolist(),
                "picked": picked.tolist(),
                "mean_jaccard": crossing[order].tolist(),
                "freq": freq[picked].tolist(),
                "top_tokens": _top_tokens(inside, types, tokenizer),
            },
        )
    meta = json.loads((out / "parents.json").read_text())
    stats = coactivation_stats(
        StatsConfig(
            store=cfg.store,
            sae=str(parents_sae),
            out=str(out / "stats"),
            tokens=n_tokens,
            device=cfg.device,
        )
    )
    # the edges are cheap: recounted unless parents.json says they were written
    if "n_edges" not in meta:
        edges = parent_edges(stats, torch.tensor(meta["slots"]), cfg.cut, cfg.min_pair_count)
        atomic_save_tensors(out / "edges.safetensors", {"edge_index": edges})
        meta["n_edges"], meta["parents_reached"] = edges.shape[1], int(edges[1].unique().numel())
        atomic_write_json(out / "parents.json", meta)
    return out


def _tokmean_meta(out: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(out / "tokmean-sae.safetensors"), "pt") as f:
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


@torch.no_grad()
def type_statistics(
    sae: SAE, store: ActivationStore, n_tokens: int, device: str = "cpu", chunk: int = 8192
) -> TypeStats:
    """Step 1 over the first n_tokens store rows (rows the SAE passes through are left out)."""
    hook, d = sae.cfg.hook, sae.cfg.d_in
    ids = torch.cat(
        [store.shard(s)["token_ids"].long() for s in range(len(store.manifest.shards))]
    )[:n_tokens]
    type_ids, inverse = ids.unique(return_inverse=True)
    sums = torch.zeros(len(type_ids), d, dtype=torch.float64)
    counts = torch.zeros(len(type_ids), dtype=torch.int64)
    fires = torch.zeros(sae.cfg.n_latents, dtype=torch.int64)
    values = []
    b_dec = sae.b_dec.detach().double().cpu()
    for start in tqdm(range(0, n_tokens, chunk), desc="token types", leave=False):
        rows = torch.arange(start, min(start + chunk, n_tokens))
        x = store.rows(rows, hooks=[hook])[hook].to(device)
        code = sae.encode(x)
        on = code.values > 0
        fires += torch.bincount(code.cols[on].cpu(), minlength=sae.cfg.n_latents)
        if len(values) < 8:
            values.append(code.values[on].cpu())
        keep = ~sae.passthrough(x).cpu()
        centred = x.cpu()[keep].double() * sae.cfg.input_scale - b_dec
        sums.index_add_(0, inverse[rows][keep], centred)
        counts += torch.bincount(inverse[rows][keep], minlength=len(type_ids))
    return TypeStats(type_ids, sums, counts, fires, float(torch.cat(values).median()))


def _save_type_stats(types: TypeStats, path: Path) -> None:
    atomic_save_tensors(
        path,
        {
            "type_ids": types.type_ids,
            "sums": types.sums,
            "counts": types.counts,
            "fires": types.fires,
            "median_value": torch.tensor([types.median_value]),
        },
    )


def _load_type_stats(path: Path) -> TypeStats:
    t = load_file(path)
    return TypeStats(t["type_ids"], t["sums"], t["counts"], t["fires"], float(t["median_value"][0]))


def token_means(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[V, d] float32: each type's mean, centred over types (each type weighs 1), unit rows."""
    means = sums / counts[:, None].double()
    means = means - means.mean(0)
    return torch.nn.functional.normalize(means, dim=1).float()


def train_tokmean_sae(x: torch.Tensor, cfg: ParentsConfig) -> tuple[SAE, float]:
    """Step 3: a TopK SAE on the rows of x (small: dense codes), Adam; returns it and its FVU on
    x."""
    g = torch.Generator().manual_seed(cfg.seed)
    sae = SAE(SAEConfig(d_in=x.shape[1], n_latents=cfg.latents, arch="topk", k=cfg.k))
    sae.reset_parameters(generator=g)
    sae = sae.to(cfg.device)
    x = x.to(cfg.device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    decay_from = int(0.8 * cfg.steps)
    for step in tqdm(range(cfg.steps), desc="token-mean SAE", leave=False):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, (cfg.steps - step) / max(cfg.steps - decay_from, 1))
        batch = x[torch.randint(len(x), (min(cfg.batch_size, len(x)),), generator=g).to(cfg.device)]
        loss = _tokmean_fvu(sae, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sae.normalize_decoder()
    with torch.no_grad():
        return sae.cpu().eval(), float(_tokmean_fvu(sae, x.cpu()))


def _tokmean_fvu(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    acts = _dense_topk(sae, x)
    x_hat = acts @ sae.W_dec + sae.b_dec
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


def _dense_topk(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    pre = sae.pre_acts(x)
    top = pre.topk(sae.cfg.k, dim=1)
    return torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())


@torch.no_grad()
def _active(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """[V, latents] bool: which latents fire on each row."""
    return _dense_topk(sae, x) > 0


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
    from sae.models import load_model

    return load_model(cfg.model or store.manifest.model).tokenizer


def _top_tokens(inside: torch.Tensor, types: TypeStats, tokenizer, n: int = 8) -> list[list[str]]:
    """Per parent, the decoded text of its n most frequent store types (for a reader only)."""
    result = []
    for p in range(inside.shape[1]):
        members = inside[:, p].nonzero().squeeze(1)
        top = members[torch.argsort(types.counts[members], descending=True)[:n]]
        result.append(tokenizer.batch_decode([[int(types.type_ids[t])] for t in top]))
    return result
