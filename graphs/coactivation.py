"""Co-activation statistics of a trained SAE over a store: `python -m graphs stats`.

    coactivation_stats(cfg)   streams a store through the SAE, writes (or resumes) cfg.out
    CoactivationCounter       the accumulator behind it, add(code) batch by batch
                              (graphs.pair_counter)
    CoactivationStats         counts + co-counts; PMI, NPMI, Jaccard, P(j | i), residual lift;
                              top-m candidates (graphs.coactivation_scores)

With `--residual`, the same pass also counts, per token, which latents the code *missed*
(`graphs.residual`), for `--score residual`. Rows the SAE passes through (massive activations, see
`SAE.passthrough`) get no code and are not counted in N, as in sae.evaluate.

Output directory (format_version 1):

    checkpoint.safetensors  while running: feature_counts + the runs; JSON state in the metadata
    stats.safetensors       the counts (graphs.coactivation_scores)
    candidates.safetensors  edge_index [2, E] int64, scores [E] float32, for cfg.m / score /
                            min_count
    stats.json              format_version, n_tokens, n_latents, sae, hook, config, ...; written
                            last, with "complete": true, so its presence marks a finished run
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from graphs.coactivation_scores import (
    FORMAT_VERSION,
    SCORES,
    STATS_JSON,
    CoactivationStats,
    Score,
)
from graphs.pair_counter import CoactivationCounter
from graphs.residual import missed_features
from sae.atomic import atomic_save_tensors
from sae.io import SAE_FILE, load_sae
from sae.models import sha256_file
from sae.sae import SAE, SparseCode
from sae.store import MANIFEST, ActivationStore

# the stage's public names, wherever they are defined
__all__ = ["CoactivationCounter", "CoactivationStats", "StatsConfig", "coactivation_stats"]

CHECKPOINT, CANDIDATES = "checkpoint.safetensors", "candidates.safetensors"
FREE_FIELDS = ("store", "sae", "out", "device", "checkpoint_every")  # results don't depend on them
RESIDUAL_FIELDS = ("residual", "miss_k")  # part of a run's identity only when residual is on


@dataclass
class StatsConfig:
    store: str = ""
    """Activation store directory (from `python -m sae harvest`)."""
    sae: str = ""
    """Trained SAE directory (cfg.json + sae.safetensors, e.g. a `python -m sae train`
    OUT/<hook>/)."""
    out: str = ""
    """Output directory (created, or resumed if it holds this same run)."""
    hook: str = ""
    """Hook to read from the store (default: the SAE's own hook)."""
    tokens: int = 0
    """Tokens to count, the first ones in store order after --skip-tokens (0: the rest of the
    store)."""
    skip_tokens: int = 0
    """Store rows to skip before counting (to count disjoint slices of one store)."""
    batch_size: int = 4096
    """Tokens encoded per batch."""
    m: int = 32
    """Candidate neighbours kept per feature."""
    score: Score = "npmi"
    """How candidate neighbours are ranked: npmi, pmi, jaccard, conditional (P(j | i)) or residual
    (how much more often j is missed when i fires; needs --residual)."""
    min_count: int = 5
    """Pairs that co-fire on fewer tokens are never candidates."""
    residual: bool = False
    """Also count missed features (graphs.residual) and (i active, j missed) pairs: the input of
    --score residual. Costs one more GEMM per batch and about doubles the counting."""
    miss_k: int = 16
    """With --residual: at most this many missed latents per token (those the residual points at
    most)."""
    checkpoint_every: int = 50
    """Batches between resumable checkpoints."""
    device: str = "cpu"
    """Torch device for the SAE encoder (counting runs on the CPU)."""


# ---------------------------------------------------------------------------- the job


def coactivation_stats(cfg: StatsConfig) -> CoactivationStats:
    """Count (or resume counting) cfg.tokens of the store; a killed run re-run with the same cfg
    ends identical."""
    store, sae, hook = _check_inputs(cfg)
    out = Path(cfg.out)
    identity = _identity(cfg, store, hook)
    if (out / STATS_JSON).exists():
        _check_same_run(
            out, json.loads((out / STATS_JSON).read_text()).get("identity", {}), identity
        )
        print(f"[greylens] {out} already holds these co-activation stats")
        return CoactivationStats.load(out)
    counter = CoactivationCounter(sae.cfg.n_latents, residual=cfg.residual)
    state = {"batches_done": 0, "n_passthrough": 0}
    if (out / CHECKPOINT).exists():
        state = _load_checkpoint(out, identity, counter)
    out.mkdir(parents=True, exist_ok=True)
    n_tokens = cfg.tokens or len(store) - cfg.skip_tokens
    n_batches = math.ceil(n_tokens / cfg.batch_size)
    with tqdm(
        total=n_batches, initial=state["batches_done"], unit="batch", desc=f"coactivation {hook}"
    ) as bar:
        for batch in range(state["batches_done"], n_batches):
            # [B]
            rows = cfg.skip_tokens + torch.arange(
                batch * cfg.batch_size, min((batch + 1) * cfg.batch_size, n_tokens)
            )
            code, n_passthrough, missed = _encode(
                sae,
                store.rows(rows, hooks=[hook])[hook].to(cfg.device),
                cfg.miss_k if cfg.residual else 0,
            )
            counter.add(code, n_passthrough, missed)
            state["batches_done"], state["n_passthrough"] = (
                batch + 1,
                state["n_passthrough"] + n_passthrough,
            )
            bar.update(1)
            bar.set_postfix(run_entries=counter.entries())
            if (batch + 1) % cfg.checkpoint_every == 0 and batch + 1 < n_batches:
                _save_checkpoint(out, counter, state, identity)
    meta = {
        "sae": str(Path(cfg.sae).resolve()),
        "hook": hook,
        "store": str(Path(cfg.store).resolve()),
        "config": asdict(cfg),
        "identity": identity,
        "n_passthrough": state["n_passthrough"],
    }
    stats = counter.stats(meta)
    edge_index, scores = stats.candidates(cfg.m, cfg.score, cfg.min_count)
    atomic_save_tensors(out / CANDIDATES, {"edge_index": edge_index, "scores": scores})
    stats.save(out)  # stats.json goes last: from here on the run counts as complete
    (out / CHECKPOINT).unlink(missing_ok=True)
    return stats


def _encode(
    sae: SAE, x: torch.Tensor, miss_k: int = 0
) -> tuple[SparseCode, int, SparseCode | None]:
    """The SAE code of x [B, d_model], how many of its rows were passed through uncoded, and (with
    miss_k > 0) the features the code missed (graphs.residual; passthrough rows miss nothing)."""
    with torch.inference_mode():
        code = sae.encode(x)
        missed = None
        if miss_k > 0:
            x_n = x.to(sae.W_dec.dtype) * sae.cfg.input_scale
            missed = missed_features(x_n, code, sae.W_dec, sae.b_dec, miss_k)
        return code, int(sae.passthrough(x).sum()), missed


def _check_inputs(cfg: StatsConfig) -> tuple[ActivationStore, SAE, str]:
    """Every refusal happens here, before anything is read or written."""
    if not (cfg.store and cfg.sae and cfg.out):
        raise ValueError(
            "pass --store DIR (an activation store), --sae DIR (a trained SAE) and --out DIR"
        )
    for name in ("batch_size", "m", "min_count", "checkpoint_every", "miss_k"):
        if getattr(cfg, name) < 1:
            raise ValueError(
                f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}"
            )
    if cfg.tokens < 0:
        raise ValueError(f"--tokens must be 0 (the whole store) or positive, got {cfg.tokens}")
    if cfg.score not in SCORES:
        raise ValueError(f"unknown --score {cfg.score!r}; choose one of {', '.join(SCORES)}")
    if cfg.score == "residual" and not cfg.residual:
        raise ValueError("--score residual ranks by missed features: pass --residual to count them")
    if not (Path(cfg.store) / MANIFEST).exists():
        raise ValueError(
            f"--store {cfg.store} is not an activation store (no {MANIFEST}); "
            "point it at a directory made by `python -m sae harvest`"
        )
    if not (Path(cfg.sae) / SAE_FILE).exists():
        raise ValueError(
            f"--sae {cfg.sae} holds no {SAE_FILE}; point it at an SAE directory "
            "(cfg.json + sae.safetensors) such as `python -m sae train`'s OUT/<hook>/"
        )
    store, sae = ActivationStore(cfg.store), load_sae(cfg.sae, cfg.device).eval()
    hook = cfg.hook or sae.cfg.hook
    if not hook:
        raise ValueError(
            f"{cfg.sae}/cfg.json names no hook; pass --hook (the store holds "
            f"{', '.join(store.hooks)})"
        )
    if hook not in store.hooks:
        raise ValueError(
            f"the store has no hook {hook!r} (it holds {', '.join(store.hooks)}); pass --hook "
            f"with one of those, or use a store harvested at {hook}"
        )
    _check_sae_matches_store(sae, store)
    if len(store) == 0:
        raise ValueError(f"the store {cfg.store} holds no tokens yet; finish its harvest first")
    if cfg.skip_tokens < 0 or cfg.skip_tokens >= len(store):
        raise ValueError(
            f"--skip-tokens must be in 0..{len(store) - 1} (the store holds {len(store)}), got "
            f"{cfg.skip_tokens}"
        )
    if cfg.tokens + cfg.skip_tokens > len(store):
        raise ValueError(
            f"--tokens {cfg.tokens} is more than the store holds ({len(store)}); pass "
            f"--tokens {len(store)} or less (0: the whole store), or harvest more"
        )
    return store, sae, hook


def _check_sae_matches_store(sae: SAE, store: ActivationStore) -> None:
    m = store.manifest
    if sae.cfg.d_in != m.d_model:
        raise ValueError(
            f"the SAE reads d_in {sae.cfg.d_in} but the store holds d_model {m.d_model}; "
            f"use a store harvested from the SAE's model ({sae.cfg.model or 'unknown'})"
        )
    # an imported SAE may not know its model's weights: then at least the model names must agree
    same = (
        sae.cfg.weights_sha256 == m.weights_sha256
        if sae.cfg.weights_sha256
        else sae.cfg.model in ("", m.model)
    )
    if not same:
        raise ValueError(
            f"the SAE was trained on activations of {sae.cfg.model} (weights sha256 "
            f"{sae.cfg.weights_sha256[:12] or '?'}…) but the store was harvested from "
            f"{m.model} ({m.weights_sha256[:12]}…); use a store of the SAE's model, "
            "or an SAE trained on this store"
        )


def _identity(cfg: StatsConfig, store: ActivationStore, hook: str) -> dict:
    """Everything the results depend on: settings, the SAE's weights and the store's contents."""
    # stats made before --residual still match
    skip = FREE_FIELDS + (() if cfg.residual else RESIDUAL_FIELDS)
    config = {k: v for k, v in asdict(cfg).items() if k not in skip}
    config["hook"] = hook  # "" and the SAE's own hook are the same run
    shards = hashlib.sha256("".join(s.sha256 for s in store.manifest.shards).encode()).hexdigest()
    return {
        "config": config,
        "sae_sha256": sha256_file(Path(cfg.sae) / SAE_FILE),
        "store": {**store.manifest.identity(), "shards_sha256": shards},
    }


def _check_same_run(out: Path, saved: dict, current: dict) -> None:
    theirs, ours = saved.get("config", {}), current["config"]
    diffs = [
        f"{k}: {out} has {theirs.get(k)!r}, this run {ours.get(k)!r}"
        for k in sorted(ours.keys() | theirs.keys())
        if theirs.get(k) != ours.get(k)
    ]
    diffs += [f"{k} differs" for k in ("sae_sha256", "store") if saved.get(k) != current[k]]
    if diffs:
        raise ValueError(
            f"{out} holds a co-activation run with other inputs or settings "
            f"({'; '.join(diffs)}); re-run with the original ones to resume it, or pick a "
            "new --out (other candidates from finished stats: "
            "CoactivationStats.load(out).candidates(m, score, min_count))"
        )


def _save_checkpoint(out: Path, counter: CoactivationCounter, state: dict, identity: dict) -> None:
    meta = {
        "format_version": FORMAT_VERSION,
        **state,
        "n_tokens": counter.n_tokens,
        "identity": identity,
    }
    atomic_save_tensors(out / CHECKPOINT, counter.state_dict(), {"greylens": json.dumps(meta)})


def _load_checkpoint(out: Path, identity: dict, counter: CoactivationCounter) -> dict:
    with safe_open(out / CHECKPOINT, framework="pt") as f:
        meta = json.loads(f.metadata()["greylens"])
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{out / CHECKPOINT} has format_version {meta.get('format_version')}, expected "
                f"{FORMAT_VERSION}; delete it to start over"
            )
        _check_same_run(out, meta["identity"], identity)
        counter.load_state_dict({k: f.get_tensor(k) for k in f.keys()}, meta["n_tokens"])
    return {"batches_done": meta["batches_done"], "n_passthrough": meta["n_passthrough"]}
