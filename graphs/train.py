"""Train the adaptive sparse GNN autoencoder on an activation store.

    start from a trained SAE (its latents are the graph's nodes) and the top-m co-activation
    candidates of its features (`python -m graphs stats`)
    for each batch (seeded shuffle, resumable at any step):
        evidence by BatchTopK at budget k_e -> graph step (sampled hard-concrete gates) -> decode
        loss = FVU + aux·AuxK + λ_edge · E[open gates per feature] + λ_abs · absorption penalty
        Adam (graph parameters on their own, faster LR) -> unit-norm decoder
        k_e ← k_e + 0.1 (k − post-propagation L0)        (budgets are post-propagation)
    finally: calibrate the inference threshold θ, write the model directory.

The training pieces are the SAE trainer's (batch stepping, LR schedule, Adam, firing tracker,
per-hook state, checkpoints and logs from `sae/`): kill -9 and `--resume` continue exactly.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from graphs.candidates import geometry_candidates, union_edges
from graphs.coactivation import CoactivationStats
from graphs.io import save_graph_sae
from graphs.model import GraphConfig, SparseGraphAutoencoder
from sae.batches import step_batches
from sae.checkpoint import load_checkpoint, prepare_run_dir, save_checkpoint
from sae.codes import batch_topk_code
from sae.firing import FiringTracker, dead_window
from sae.io import load_sae
from sae.optim import adam, default_lr
from sae.sae import SAE, SAEConfig, fvu
from sae.schedule import lr_at
from sae.state import HookState
from sae.store import ActivationStore
from sae.train_log import TrainLogger, metrics_row


@dataclass
class GraphTrainConfig:
    store: str = ""
    """Activation store directory (the one the SAE was trained on, or more of the same)."""
    stats: str = ""
    """Co-activation statistics directory from `python -m graphs stats` (names the SAE it
    describes)."""
    out: str = ""
    """Output directory: the graph autoencoder (cfg.json, sae.safetensors, graph.safetensors,
    graph.json)."""
    k: int = 0
    """Target post-propagation L0 (0: the SAE's k)."""
    m: int = 32
    """Candidate out-edges per feature (at most the stats' m)."""
    score: Literal["npmi", "pmi", "jaccard", "conditional", "residual"] = "npmi"
    """How candidates are ranked: a co-activation score, or residual (how much more often j is
    missed when i fires: finds absorbed child → parent edges; needs stats made with --residual)."""
    min_count: int = 5
    """Feature pairs that co-fired fewer times are never candidates."""
    tokens: int = 500_000
    """Training tokens."""
    batch_size: int = 4096
    """Tokens per step."""
    lr: float = 0.0
    """Adam LR of the SAE weights (0: the SAE trainer's Adam default, 2e-3/√(n_latents/16384)).
    Lowering it because the weights start trained reconstructs worse, not better."""
    graph_lr: float = 0.05
    """Adam LR of the edge weights and gate logits."""
    warmup_frac: float = 0.05
    """Fraction of steps with linear LR warm-up."""
    decay_frac: float = 0.2
    """Fraction of steps at the end with linear LR decay to 0."""
    init_weight: float = 0.05
    """Initial edge weight w. Too small and no message lifts a target over θ (an edge whose target
    never fires gets no reconstruction gradient); too large and implied features flood the budget
    from the first steps. 0.05 suits SmolLM2's scaled activations; the unit-magnitude synthetic
    hierarchy needs ~0.5."""
    init_log_alpha: float = -2.0
    """Initial gate logit (−2: a gate is open in 40% of samples, deterministic gate 0.04)."""
    edge_coeff: float = 0.01
    """λ_edge on the expected number of open out-edges per feature (hard-concrete L0). Adam scales
    each gate's step, so a gate whose edge never helps reconstruction closes at about graph_lr per
    step whatever λ is; λ sets how much help an edge must give to stay."""
    absorption_coeff: float = 1.0
    """λ_abs on Σ s_ij relu(cos(d_i, d_j))² over edges in use: a child must not copy its parent."""
    absorption_detach: bool = False
    """Detach s_ij in the absorption penalty, so it moves decoders apart instead of closing the
    child → parent edges whose decoders overlap (the edges that should exist)."""
    edges: str = ""
    """A safetensors file holding edge_index [2, E] (int64 feature ids): the candidate edges, used
    instead of the stats' top-m (e.g. edges from outside knowledge, or a ceiling experiment)."""
    geometry_m: int = 0
    """Also take each feature's top geometry_m decoder-cosine neighbours as candidates (0: off).
    Absorbed children rarely co-fire with their parent, so co-activation alone misses their edge."""
    geometry_min_cos: float = 0.1
    """Geometry candidates need cos(d_i, d_j) above this."""
    implied_only: bool = False
    """Messages reach only features the encoder left inactive: an edge can imply, not correct."""
    implied_cost: float = 1.0
    """What an implied feature counts for in the L0 the budget controller steers to k (1: the same
    as evidence, so budgets are post-propagation; < 1 lets edges save evidence budget, and the
    post-propagation L0 then ends above k)."""
    aux_coeff: float = 1 / 32
    """Weight of the AuxK dead-latent loss."""
    dead_tokens: int = 100_000
    """A latent that has not fired in this many tokens counts as dead (and gets the AuxK loss).
    Firing counts start at zero here, so a 1M window would never trigger in a 500k-token run and
    leave more latents silent. 0: the SAE trainer's rule (a fifth of the run, at most 1M)."""
    checkpoint_every: int = 50
    """Steps between checkpoints (one is also written at the end)."""
    log_every: int = 10
    """Steps between metric rows."""
    resume: bool = False
    """Continue from out/checkpoint.safetensors exactly where it stopped; with no checkpoint there
    yet, start from scratch (so the same command can always be re-issued after a kill)."""
    seed: int = 0
    """Seed of the data order and the gate noise."""
    wandb: Literal["offline", "online", "disabled"] = "offline"
    """wandb mode (offline writes under out/wandb)."""
    device: str = "cpu"
    """Torch device."""


def train_graph(cfg: GraphTrainConfig) -> SparseGraphAutoencoder:
    """Train (or resume) a SparseGraphAutoencoder; writes cfg.out and returns the model."""
    store, stats, sae, edges, out, resuming = _check_inputs(cfg)
    hook = sae.cfg.hook
    model = _init_model(cfg, stats, sae, edges).to(cfg.device)
    firing = FiringTracker.zeros(sae.cfg.n_latents, cfg.device)
    state = HookState(model, _optimizer(cfg, model), firing)
    torch.manual_seed(cfg.seed)
    first_step = load_checkpoint(out, {hook: state})["step"] if resuming else 0
    n_steps = max(1, cfg.tokens // cfg.batch_size)
    base = _base_lr(cfg, sae.cfg.n_latents)
    logger = TrainLogger(out, asdict(cfg), cfg.wandb, first_step if resuming else None)
    bar = tqdm(total=n_steps, initial=first_step, unit="step", desc="train graph")
    started = time.perf_counter()
    batches = step_batches(store, cfg.batch_size, cfg.seed, [hook], first_step, n_steps)
    for step, batch in batches:
        x = batch[hook].to(cfg.device)
        lr = lr_at(base, step, n_steps, cfg.warmup_frac, cfg.decay_frac)
        row = _train_step(cfg, state, x[~sae.passthrough(x)], lr)
        if (step + 1) % cfg.log_every == 0 or step + 1 == n_steps:
            tok_s = (step + 1 - first_step) * cfg.batch_size / (time.perf_counter() - started)
            fractions = firing.log_fractions(_dead_window(cfg), cfg.log_every * cfg.batch_size)
            logger.log(metrics_row(step, cfg.batch_size, hook, row, fractions, row["lr"], tok_s))
            bar.set_postfix(
                fvu=f"{row['fvu']:.3f}", l0=f"{row['l0']:.1f}", deg=f"{row['mean_degree']:.2f}"
            )
        bar.update(1)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == n_steps:
            save_checkpoint(out, step + 1, (step + 1) * cfg.batch_size, {hook: state}, asdict(cfg))
    bar.close()
    calibrate_graph_threshold(model, store, cfg)
    save_graph_sae(model, out, source={"stats": cfg.stats, "store": cfg.store})
    logger.finish()
    return model


def _base_lr(cfg: GraphTrainConfig, n_latents: int) -> float:
    """The SAE weights' LR: cfg.lr, or the SAE trainer's Adam default for this width."""
    return cfg.lr or default_lr(n_latents)


def _dead_window(cfg: GraphTrainConfig) -> int:
    return dead_window(cfg.dead_tokens, cfg.tokens, cfg.batch_size)


def _check_inputs(
    cfg: GraphTrainConfig,
) -> tuple[ActivationStore, CoactivationStats, SAE, torch.Tensor | None, Path, bool]:
    """Every refusal happens here, before the run directory exists; edges: cfg.edges's
    edge_index, if given; the bool: whether the run resumes (--resume with a checkpoint in out;
    without one it starts from scratch)."""
    if not (cfg.store and cfg.stats and cfg.out):
        raise ValueError(
            "pass --store DIR, --stats DIR (from `python -m graphs stats`) and --out DIR"
        )
    store, stats = ActivationStore(cfg.store), CoactivationStats.load(cfg.stats)
    if cfg.score == "residual" and not stats.has_residual:
        raise ValueError(
            f"--score residual needs missed-feature counts, and {cfg.stats} has none; recompute "
            "them with `python -m graphs stats ... --residual`"
        )
    sae = load_sae(stats.meta["sae"])
    if sae.cfg.hook not in store.hooks:
        raise ValueError(
            f"the SAE reads {sae.cfg.hook} but the store holds {', '.join(store.hooks)}"
        )
    if sae.cfg.arch not in ("topk", "batchtopk", "matryoshka"):
        raise ValueError(
            "start the graph autoencoder from a topk, batchtopk or matryoshka SAE, "
            f"not {sae.cfg.arch!r}"
        )
    if len(store) < cfg.batch_size:
        raise ValueError(
            f"the store holds {len(store)} tokens, fewer than one batch ({cfg.batch_size})"
        )
    edges = load_edges(cfg.edges, sae.cfg.n_latents) if cfg.edges else None
    out, resuming = prepare_run_dir(Path(cfg.out), asdict(cfg), cfg.resume)
    return store, stats, sae, edges, out, resuming


def _init_model(
    cfg: GraphTrainConfig, stats: CoactivationStats, sae: SAE, edges: torch.Tensor | None
) -> SparseGraphAutoencoder:
    """The SAE's weights as a BatchTopK evidence encoder at budget k, plus its candidate edges
    (`edges` if given, else the stats' top-m). A matryoshka SAE is a BatchTopK SAE trained with
    nested losses: its weights and θ carry over, and training goes on with the whole-code loss."""
    batchtopk = {"arch": "batchtopk", "k": cfg.k or sae.cfg.k, "matryoshka_groups": []}
    evidence = SAE(SAEConfig(**{**asdict(sae.cfg), **batchtopk}))
    evidence.load_state_dict(sae.state_dict(), strict=False)  # topk SAEs hold θ = 0: set below
    if edges is not None:
        edge_index = edges
    else:
        edge_index = stats.candidates(cfg.m, cfg.score, cfg.min_count)[0]
    if cfg.geometry_m > 0:
        geometric = geometry_candidates(sae.W_dec, cfg.geometry_m, cfg.geometry_min_cos)
        edge_index = union_edges(edge_index, geometric, sae.cfg.n_latents)
    if edge_index.shape[1] == 0:
        raise ValueError(
            f"{cfg.stats} gives no candidate edges at min_count={cfg.min_count}; "
            "lower it or use more tokens"
        )
    graph_cfg = GraphConfig(
        sae.cfg.n_latents,
        edge_index.shape[1],
        cfg.init_log_alpha,
        cfg.init_weight,
        implied_only=cfg.implied_only,
    )
    return SparseGraphAutoencoder(evidence, edge_index, graph_cfg)


def load_edges(path: str, n_latents: int) -> torch.Tensor:
    """edge_index [2, E] int64 from a safetensors file, checked against the SAE's width."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"--edges {path} is not a file; pass a safetensors file holding edge_index [2, E]"
        )
    tensors = load_file(path)
    edge_index = tensors.get("edge_index")
    if (
        edge_index is None
        or edge_index.ndim != 2
        or edge_index.shape[0] != 2
        or edge_index.is_floating_point()
    ):
        raise ValueError(
            f"--edges {path} must hold an integer tensor edge_index of shape [2, E]; it holds "
            f"{ {k: tuple(v.shape) for k, v in tensors.items()} }"
        )
    if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= n_latents):
        raise ValueError(
            f"--edges {path} names feature ids outside 0..{n_latents - 1} (the SAE's latents)"
        )
    return edge_index.long()


def _optimizer(cfg: GraphTrainConfig, model: SparseGraphAutoencoder) -> torch.optim.Adam:
    graph = [model.weight_raw, model.log_alpha]
    lr = _base_lr(cfg, model.n_latents)
    return adam(
        [
            {"params": list(model.sae.parameters()), "lr": lr, "base_lr": lr},
            {"params": graph, "lr": cfg.graph_lr, "base_lr": cfg.graph_lr},
        ],
        lr=lr,
    )


def _train_step(
    cfg: GraphTrainConfig, state: HookState, x: torch.Tensor, lr: float
) -> dict[str, float]:
    """One step on x: [N, d] (massive rows already skipped): losses, Adam, the evidence budget's
    controller and the firing tracker; returns the step's log row."""
    model, optimizer = state.sae, state.optimizer
    # the schedule's warm-up / decay factor, applied to both groups
    factor = lr / _base_lr(cfg, model.n_latents)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    dead = state.firing.dead(_dead_window(cfg))  # the window the logged dead fraction uses
    out = model.training_forward(
        x, dead=dead, aux_k=x.shape[1] // 2, detach_penalty=cfg.absorption_detach
    )
    loss = (
        out.fvu
        + cfg.aux_coeff * out.aux_loss
        + cfg.edge_coeff * out.edge_l0
        + cfg.absorption_coeff * out.absorption
    )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    model.sae.remove_parallel_decoder_grad()
    optimizer.step()
    model.sae.normalize_decoder()
    code = out.graph_code.code
    post_l0 = float((code.values > 0).sum()) / x.shape[0]
    implied = float((~out.graph_code.from_evidence & (code.values > 0)).sum()) / x.shape[0]
    model.adapt_evidence_budget(post_l0 - (1.0 - cfg.implied_cost) * implied)
    state.firing.update(code, x.shape[0])
    with torch.no_grad():
        full_fvu = fvu(x.to(out.recons.dtype), out.recons)
    return {
        "loss": loss.item(),
        "fvu": full_fvu.item(),
        "aux_loss": out.aux_loss.item(),
        "l0": post_l0,
        "l0_evidence": len(out.graph_code.evidence.values) / x.shape[0],
        "evidence_k": float(model.evidence_k),
        "edge_l0": out.edge_l0.item(),
        "absorption": out.absorption.item(),
        "lr": lr,
        "mean_degree": model.active_edges()[0].shape[1] / model.n_latents,
        "implied_per_token": float((~out.graph_code.from_evidence).sum()) / x.shape[0],
    }


@torch.no_grad()
def calibrate_graph_threshold(
    model: SparseGraphAutoencoder, store: ActivationStore, cfg: GraphTrainConfig, n_batches: int = 8
) -> float:
    """θ := mean over a few batches of the cut that keeps round(k_e·N) evidence activations."""
    hook, sae, cuts = model.sae.cfg.hook, model.sae, []
    for _, batch in step_batches(store, cfg.batch_size, cfg.seed, [hook], 0, n_batches):
        x = batch[hook].to(cfg.device)
        _, _, pre = model.pre_acts(x[~sae.passthrough(x)])
        cuts.append(batch_topk_code(pre, float(model.evidence_k)).values.min())
    sae.threshold.copy_(torch.stack(cuts).mean())
    return float(sae.threshold)
