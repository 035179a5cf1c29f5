"""SAE trainer: one pass over the activation store trains one SAE per hook.

    for each batch of the store (seeded shuffle, resumable at any step):
        for each hook:  forward (sparse kernels for the TopK family) -> FVU + AuxK + λ·sparsity
                        -> backward -> drop decoder-parallel grad -> Adam -> unit-norm decoder
                        [--target-l0: λ = λ_I·(L0/target) from this batch's L0; λ_I integrates]
                        [--reopen-dead (jumprelu): dead latents' θ back at the k/n quantile]
        every log_every steps: metrics.jsonl + wandb;  every checkpoint_every: checkpoint

How λ is set for jumprelu/relu (fixed schedule or a target-L0 controller) and their thresholds:
`sae/sparsity.py`.

Initialisation follows the literature: decoder rows random unit vectors, encoder = decoder
transpose, b_dec = geometric median of a sample, inputs scaled so E‖x‖ = √d_in (the scale is kept
in the SAE config, so inference takes raw activations). Data parallel: every rank takes a slice of
the same global batch; losses use global denominators and gradients are summed, so N ranks take
exactly the step one rank would take on the whole batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import schedulefree
import torch
import torch.distributed as torch_dist
from tqdm.auto import tqdm

from sae.checkpoint import load_checkpoint, prepare_run_dir, save_checkpoint
from sae.hooks import parse_hooks
from sae.io import save_sae
from sae.metrics import dead_fraction, dense_fraction
from sae.sae import SAE, SPARSE_ARCHS, Architecture, SAEConfig, batch_topk_code, fvu
from sae.sparsity import (
    adapt_sparsity_coeff,
    applied_sparsity_coeff,
    initial_sparsity_coeff,
    reopen_thresholds,
    sparsity_coeff_at,
    sparsity_warmup_steps,
    start_with_k_active,
)
from sae.store import ActivationStore
from sae.train_log import TrainLogger


@dataclass
class TrainConfig:
    store: str = ""
    """Activation store directory (from `python -m sae harvest`)."""
    out: str = ""
    """Output directory: one SAE per hook under out/<hook>/, plus checkpoint, metrics and plots."""
    hooks: str = ""
    """Comma-separated hooks to train, one SAE each, all from one pass (default: every hook in the store)."""
    arch: Architecture = "topk"
    """SAE variant."""
    k: int = 32
    """Active latents per token (topk; batchtopk and matryoshka on average)."""
    expansion: int = 16
    """n_latents = expansion × d_model."""
    tokens: int = 1_000_000
    """Training tokens (the store is re-read in new shuffled epochs if it is smaller)."""
    batch_size: int = 4096
    """Tokens per optimizer step (global, over all ranks)."""
    optimizer: Literal["auto", "adam", "schedulefree"] = "auto"
    """adam: Adam with warm-up and a linear decay to 0. schedulefree: schedule-free AdamW (Defazio et
    al. 2024; the `schedulefree` package), β1 0.95, no decay: the saved SAE is its averaged point.
    auto: schedulefree for topk, adam for the others. SmolLM2 L15, 1M tokens, held-out FVU / dead:
    topk adam 0.155 / 4.0%, schedulefree 0.152 / 5.4% (at 200k tokens 0.258 vs 0.227); batchtopk
    adam 0.167 / 6.5%, schedulefree 0.161 / 25.3%: too many dead latents (docs/sae_quality.md)."""
    lr: float = 0.0
    """Learning rate; 0 picks 2e-3 / sqrt(n_latents / 16384) for adam and 5e-3 / sqrt(...) for
    schedulefree (sparsify's default for its schedule-free sign descent). On SmolLM2 layer 15 (TopK,
    Adam, 9216 latents, 200k tokens) FVU was 0.53 at 2.7e-4, 0.33 at 1e-3 and 0.24 at 3e-3."""
    warmup_frac: float = 0.05
    """Fraction of steps with linear LR warm-up."""
    decay_frac: float = 0.2
    """adam: fraction of steps at the end with linear LR decay to 0 (schedulefree needs none)."""
    sparsity_coeff: float = 0.0
    """λ of the sparsity term: L1 for relu, L0 for jumprelu (0 picks a default per arch)."""
    sparsity_warmup_frac: float = 0.1
    """Fraction of steps over which λ rises linearly from 0 (with --target-l0: over which the
    controller's integral part waits, since L0 first dips whatever λ is)."""
    target_l0: float = 0.0
    """jumprelu/relu: reach and hold this L0. Each step uses λ = λ_I · (L0/target)^gain with the
    batch's own L0; λ_I starts at --sparsity-coeff (or the default), integrates log(L0/target)
    after the warm-up, and is saved in the SAE config. 0 keeps the fixed λ schedule with warm-up.
    For jumprelu also pass --threshold-lr-scale 10 --dense-aux --reopen-dead (docs/sae_quality.md)."""
    l0_control_rate: float = 0.2
    """Integral gain of the target-L0 controller: its slow part λ_I changes by at most a factor
    e^rate per step (reached when L0 is a factor e or more off the target)."""
    l0_control_gain: float = 1.0
    """Proportional gain: a step uses λ_I · (L0/target)^gain with this batch's L0 (clamped to ±1 in log)."""
    aux_coeff: float = 1 / 32
    """Weight of the AuxK dead-latent loss (TopK family; jumprelu/relu with --dense-aux)."""
    dense_aux: bool = False
    """Also apply AuxK to jumprelu/relu: their dead latents (below threshold) get no other gradient."""
    jumprelu_bandwidth: float = 0.05
    """jumprelu: width ε of the straight-through kernel, in normalised pre-activation units (there
    θ starts near 1.8 and a pre-activation's spread across tokens is ~0.7 on SmolLM2 L15)."""
    reopen_dead: bool = False
    """jumprelu: put a dead latent's θ back at the (1 − k/n) quantile of its pre-activations on the
    current batch (the initial rule), so that what AuxK taught it can show; below θ nothing else
    reaches it."""
    threshold_lr_scale: float = 1.0
    """jumprelu: the threshold's (log θ) learning rate is this × the LR of the other weights (at 1,
    θ moves ~60× less per step than the encoder moves a pre-activation)."""
    dead_tokens: int = 0
    """A latent that has not fired in this many tokens counts as dead (and gets the AuxK loss). 0: a
    fifth of the run's tokens, at most 1M. A fixed 1M never triggered AuxK in a run of 1M tokens or
    fewer (SmolLM2 L15, TopK, 1M tokens: 12.0% of latents silent on 32k held-out rows with a 1M
    window, 9.4% with 200k, held-out FVU 0.156 both; docs/benchmarks.md)."""
    outlier_ratio: float = 10.0
    """Rows with a norm above this × the median norm (massive activations) are skipped and passed
    through at inference; 0 keeps every row."""
    checkpoint_every: int = 100
    """Steps between checkpoints (a checkpoint is also written at the end)."""
    log_every: int = 10
    """Steps between metric rows."""
    resume: bool = False
    """Continue from out/checkpoint.safetensors exactly where it stopped."""
    seed: int = 0
    """Seed of the data order and the initial weights."""
    wandb: Literal["offline", "online", "disabled"] = "offline"
    """wandb mode (offline writes under out/wandb)."""
    device: str = "cpu"
    """Torch device."""


class Distributed(NamedTuple):
    """This process's place among data-parallel ranks (world 1: plain single-process training)."""

    rank: int = 0
    world: int = 1

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch_dist.all_reduce(tensor)
        return tensor

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's tensor (same shape on all), concatenated along dim 0 in rank order."""
        if self.world == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        torch_dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def local(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch."""
        size = batch.shape[0] // self.world
        return batch[self.rank * size : (self.rank + 1) * size]


@dataclass
class HookState:
    sae: SAE
    optimizer: torch.optim.Optimizer
    tokens_since_fired: torch.Tensor  # [n_latents] int64
    fire_counts: torch.Tensor  # [n_latents] int64, since the last log row


def train(
    cfg: TrainConfig, dist: Distributed | None = None, on_step: Callable[[int], None] | None = None
) -> dict[str, SAE]:
    """Train (or resume) one SAE per hook; returns them and writes out/<hook>/ for each.

    on_step(step) runs after each optimizer step (every hook updated), before the checkpoint:
    scripts/bench_train.py uses it to time a GEMM between training steps."""
    dist = dist or Distributed()
    store, hooks, out = _check_inputs(cfg, dist)
    states = {hook: _init_hook(cfg, store, hook) for hook in hooks}
    first_step = _resume(out, states) if cfg.resume else 0
    n_steps = max(1, cfg.tokens // cfg.batch_size)
    logger = TrainLogger(
        out, asdict(cfg), cfg.wandb, first_step if cfg.resume else None, enabled=dist.rank == 0
    )
    bar = tqdm(
        total=n_steps,
        initial=first_step,
        unit="step",
        desc=f"train {cfg.arch}",
        disable=dist.rank != 0,
    )
    started = time.perf_counter()
    for step, batch in step_batches(store, cfg, hooks, start_step=first_step, n_steps=n_steps):
        lr = lr_at(cfg, step, n_steps, cfg.expansion * store.d_model)
        for hook, state in states.items():
            x = dist.local(batch[hook]).to(cfg.device)
            coeff = (
                0.0 if cfg.target_l0 else sparsity_coeff_at(cfg, step, n_steps)
            )  # target: set from the batch L0
            row = _train_step(cfg, state, x[~state.sae.passthrough(x)], lr, coeff, dist)
            if cfg.target_l0 and step >= sparsity_warmup_steps(
                cfg, n_steps
            ):  # integrate after the transient
                state.sae.cfg.sparsity_coeff = adapt_sparsity_coeff(
                    cfg, state.sae.cfg.sparsity_coeff, row["l0"]
                )
            elif not cfg.target_l0:
                state.sae.cfg.sparsity_coeff = coeff
            if (step + 1) % cfg.log_every == 0 or step + 1 == n_steps:
                tok_s = (step + 1 - first_step) * cfg.batch_size / (time.perf_counter() - started)
                logger.log(log_row(cfg, state, step, hook, row, lr, tok_s))
                bar.set_postfix(fvu=f"{row['fvu']:.3f}", l0=f"{row['l0']:.1f}")
        bar.update(1)
        if on_step is not None:
            on_step(step)
        if dist.rank == 0 and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == n_steps):
            save_checkpoint(out, step + 1, (step + 1) * cfg.batch_size, states, asdict(cfg))
    bar.close()
    for state in states.values():
        if isinstance(state.optimizer, schedulefree.AdamWScheduleFree):
            state.optimizer.eval()  # the averaged weights are the trained SAE (checkpoints keep train mode)
            if (
                cfg.arch != "relu"
            ):  # an average of unit rows is not unit (0.92-1.02 on SmolLM2 L15): renormalise;
                state.sae.normalize_decoder()  # held-out FVU 0.22758 as averaged, 0.22745 renormalised
    if dist.rank == 0:
        for hook, state in states.items():
            if cfg.arch in SPARSE_ARCHS[1:]:
                calibrate_threshold(state.sae, store, hook, cfg)
            save_sae(state.sae, out / hook)
    logger.finish()
    return {hook: state.sae for hook, state in states.items()}


def _resume(out: Path, states: dict[str, HookState]) -> int:
    """Restore the checkpoint; λ (the target-L0 controller's state) lives in each SAE's config."""
    meta = load_checkpoint(out, states)
    for hook, state in states.items():
        state.sae.cfg.sparsity_coeff = meta["sae_configs"][hook].get("sparsity_coeff", 0.0)
    return meta["step"]


def _check_inputs(cfg: TrainConfig, dist: Distributed) -> tuple[ActivationStore, list[str], Path]:
    """Every refusal happens here, before the first step."""
    if not cfg.store or not cfg.out:
        raise ValueError("pass both --store DIR and --out DIR")
    store = ActivationStore(cfg.store)
    hooks = parse_hooks(cfg.hooks) if cfg.hooks else list(store.hooks)
    missing = [h for h in hooks if h not in store.hooks]
    if missing:
        raise ValueError(
            f"the store has no {', '.join(missing)}; it holds {', '.join(store.hooks)}"
        )
    if cfg.batch_size % dist.world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the {dist.world} ranks")
    if cfg.target_l0 and cfg.arch not in ("jumprelu", "relu"):
        raise ValueError(
            f"--target-l0 adapts the sparsity penalty of jumprelu/relu; {cfg.arch} sets L0 with --k"
        )
    if (
        cfg.target_l0 < 0
        or cfg.l0_control_rate <= 0
        or cfg.l0_control_gain < 0
        or cfg.threshold_lr_scale <= 0
    ):
        raise ValueError(
            "--target-l0 and --l0-control-gain must be >= 0, --l0-control-rate and --threshold-lr-scale > 0"
        )
    if len(store) < cfg.batch_size:
        raise ValueError(
            f"the store holds {len(store)} tokens, fewer than one batch ({cfg.batch_size})"
        )
    defaults = {
        **asdict(TrainConfig()),
        "optimizer": "adam",
    }  # checkpoints from before the setting were Adam's
    out = prepare_run_dir(Path(cfg.out), asdict(cfg), cfg.resume, defaults=defaults)
    return store, hooks, out


def _init_hook(cfg: TrainConfig, store: ActivationStore, hook: str) -> HookState:
    """A fresh SAE with data-dependent initialisation (scale, b_dec), its optimizer and trackers."""
    sample = store.rows(store.epoch_order(cfg.seed)[:8192], hooks=[hook])[hook]  # [≤8192, d]
    norms = sample.norm(dim=1)
    max_norm = cfg.outlier_ratio * norms.median().item() if cfg.outlier_ratio > 0 else 0.0
    if max_norm:
        sample = sample[norms <= max_norm]
    scale = math.sqrt(store.d_model) / sample.norm(dim=1).mean().item()
    sae_cfg = SAEConfig(
        d_in=store.d_model,
        n_latents=cfg.expansion * store.d_model,
        arch=cfg.arch,
        k=cfg.k,
        hook=hook,
        model=store.manifest.model,
        weights_sha256=store.manifest.weights_sha256,
        input_scale=scale,
        max_input_norm=max_norm,
        jumprelu_bandwidth=cfg.jumprelu_bandwidth,
        sparsity_coeff=initial_sparsity_coeff(cfg) if cfg.target_l0 else 0.0,
    )
    sae = SAE(sae_cfg)
    sae.reset_parameters(torch.Generator().manual_seed(cfg.seed))
    with torch.no_grad():
        sae.b_dec.copy_(geometric_median(sample * scale))
        if cfg.arch in ("jumprelu", "relu"):
            start_with_k_active(sae, sample[:2048] * scale, cfg.k)
    sae = sae.to(cfg.device)
    n = sae_cfg.n_latents
    if optimizer_name(cfg) == "schedulefree":
        optimizer = schedulefree.AdamWScheduleFree(
            _param_groups(cfg, sae), lr=base_lr(cfg, n), betas=(0.95, 0.999)
        )
        optimizer.train()  # parameters hold the point gradients are taken at; .eval() moves them to the average
    else:
        optimizer = adam(_param_groups(cfg, sae), lr=base_lr(cfg, n))
    zeros = torch.zeros(n, dtype=torch.int64, device=cfg.device)
    return HookState(sae, optimizer, zeros.clone(), zeros.clone())


def adam(groups: list[dict], lr: float) -> torch.optim.Adam:
    """Adam, fused into one kernel per step where torch has one (CPU, CUDA). On the project CPU the
    fused step over 10.6M parameters took 6 ms against 36 ms for the default multi-tensor one
    (9216 latents); its results differ from it in the last bits only, and it is as deterministic:
    tests/sae/test_train.py checks exact resume and 2 ranks against 1 with it."""
    device = groups[0]["params"][0].device
    return torch.optim.Adam(groups, lr=lr, betas=(0.9, 0.999), fused=device.type in ("cpu", "cuda"))


def _param_groups(cfg: TrainConfig, sae: SAE) -> list[dict]:
    """One Adam group, or two when the jumprelu threshold gets its own LR multiplier.

    With Adam a parameter moves by about its LR per step whatever its gradient's size, so at the
    default LR log θ moves by at most ~0.65 over a 244-step run while one encoder step can shift a
    pre-activation by more than the kernel width: the multiplier lets θ keep up with the encoder."""
    if cfg.arch != "jumprelu" or cfg.threshold_lr_scale == 1.0:
        return [{"params": list(sae.parameters()), "lr_scale": 1.0}]
    others = [p for name, p in sae.named_parameters() if name != "log_threshold"]
    return [
        {"params": others, "lr_scale": 1.0},
        {"params": [sae.log_threshold], "lr_scale": cfg.threshold_lr_scale},
    ]


@torch.no_grad()
def calibrate_threshold(
    sae: SAE, store: ActivationStore, hook: str, cfg: TrainConfig, n_batches: int = 8
) -> float:
    """Set the batchtopk/matryoshka inference θ so that inference keeps k latents per token on average.

    During training θ is an EMA of each batch's smallest kept activation, which lags the moving
    encoder (on SmolLM2 L15 it gave L0 21.5 for k = 32). With the final weights, θ becomes the mean
    over a few batches of the cut that keeps round(k·N) activations, i.e. the rule training used.
    """
    cuts = []
    for _, batch in step_batches(store, cfg, [hook], start_step=0, n_steps=n_batches):
        x = batch[hook].to(cfg.device)
        x = x[~sae.passthrough(x)]
        pre = sae.pre_acts(x.to(sae.W_enc.dtype) * sae.cfg.input_scale)
        cuts.append(batch_topk_code(pre, sae.cfg.k).values.min())
    if cuts:
        sae.threshold.copy_(torch.stack(cuts).mean())
    return float(sae.threshold)


def geometric_median(points: torch.Tensor, iterations: int = 50) -> torch.Tensor:
    """Weiszfeld's algorithm. points: [m, d] -> [d]: the point minimising Σ‖p − y‖."""
    y = points.mean(0)
    for _ in range(iterations):
        weights = 1.0 / (points - y).norm(dim=1).clamp_min(1e-8)  # [m]
        y = (weights[:, None] * points).sum(0) / weights.sum()
    return y


def step_batches(
    store: ActivationStore, cfg: TrainConfig, hooks: list[str], start_step: int, n_steps: int
):
    """(step, batch) from start_step on; full batches only, new seeded epoch when one runs out."""
    per_epoch = len(store) // cfg.batch_size
    step = start_step
    while step < n_steps:
        epoch, first = divmod(step, per_epoch)
        for batch in store.batches(cfg.batch_size, cfg.seed, hooks, epoch=epoch, start_batch=first):
            if step >= n_steps or len(batch["token_ids"]) < cfg.batch_size:
                break
            yield step, batch
            step += 1


def optimizer_name(cfg) -> str:
    """cfg.optimizer with "auto" resolved; configs without the field (the graph trainer's) use adam."""
    name = getattr(cfg, "optimizer", "adam")
    if name == "auto":
        return "schedulefree" if cfg.arch == "topk" else "adam"
    return name


def base_lr(cfg, n_latents: int) -> float:
    default = 5e-3 if optimizer_name(cfg) == "schedulefree" else 2e-3
    return cfg.lr or default / math.sqrt(n_latents / 16384)


def dead_window(cfg: TrainConfig) -> int:
    """Tokens without firing after which a latent counts as dead: cfg.dead_tokens, or by default a
    fifth of the run (at least one batch, at most 1M)."""
    return cfg.dead_tokens or min(1_000_000, max(cfg.batch_size, cfg.tokens // 5))


def lr_at(cfg: TrainConfig, step: int, n_steps: int, n_latents: int) -> float:
    """Linear warm-up, constant, linear decay to 0 over the last decay_frac of steps (adam only)."""
    base = base_lr(cfg, n_latents)
    warmup = max(1, int(cfg.warmup_frac * n_steps))
    decay = int(cfg.decay_frac * n_steps) if optimizer_name(cfg) == "adam" else 0
    factor = min(1.0, (step + 1) / warmup)
    if decay and step >= n_steps - decay:
        factor = min(factor, (n_steps - step) / decay)
    return base * factor


def _train_step(
    cfg: TrainConfig, state: HookState, x: torch.Tensor, lr: float, coeff: float, dist: Distributed
) -> dict:
    sae, optimizer = state.sae, state.optimizer
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    dead = state.tokens_since_fired >= dead_window(cfg)
    reduce = dist.sum if dist.world > 1 else None
    aux_k = x.shape[1] // 2 if cfg.arch in SPARSE_ARCHS or cfg.dense_aux else 0  # AuxK: k_aux = d/2
    out = sae.training_forward(x, dead=dead, aux_k=aux_k, reduce=reduce)
    n_tokens = int(
        dist.sum(torch.tensor(x.shape[0]))
    )  # rows differ per rank after skipping outliers
    l0 = dist.sum(torch.tensor(float((out.code.values > 0).sum()))).item() / n_tokens
    if cfg.target_l0:
        coeff = applied_sparsity_coeff(cfg, sae.cfg.sparsity_coeff, l0)
    loss = out.fvu + cfg.aux_coeff * out.aux_loss + coeff * out.sparsity_loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for param in sae.parameters():  # each rank's loss is its share of the global loss: sum grads
        if param.grad is not None:
            dist.sum(param.grad)
    if cfg.arch != "relu":  # relu keeps free decoder norms (its L1 is weighted by them)
        sae.remove_parallel_decoder_grad()
    optimizer.step()
    if cfg.arch != "relu":
        sae.normalize_decoder()
    if cfg.reopen_dead and cfg.arch == "jumprelu" and bool(dead.any()):
        reopen_thresholds(sae, x, dead, cfg.target_l0 or cfg.k, dist)
    if cfg.arch in SPARSE_ARCHS[1:] and dist.world > 1:  # one inference threshold for all ranks
        sae.threshold.copy_(dist.sum(sae.threshold.clone()) / dist.world)
    track_firing(state, out.code, n_tokens, dist)
    with torch.no_grad():  # FVU of the whole code (for matryoshka the objective averages prefixes)
        full_fvu = fvu(x.to(out.recons.dtype), out.recons, reduce)
    parts = [
        loss.detach(),
        out.fvu.detach(),
        full_fvu,
        out.aux_loss.detach(),
        out.sparsity_loss.detach() / dist.world,
    ]
    totals = dist.sum(torch.stack(parts)).tolist()
    names = ("loss", "recon_loss", "fvu", "aux_loss", "sparsity_loss")
    return {**dict(zip(names, totals, strict=True)), "l0": l0, "sparsity_coeff": coeff}


def track_firing(state: HookState, code, n_tokens: int, dist: Distributed) -> None:
    counts = torch.bincount(code.cols[code.values > 0], minlength=state.fire_counts.numel())
    counts = dist.sum(counts)
    state.fire_counts += counts
    state.tokens_since_fired += n_tokens
    state.tokens_since_fired[counts > 0] = 0


def log_row(
    cfg: TrainConfig, state: HookState, step: int, hook: str, row: dict, lr: float, tok_s: float
) -> dict:
    tokens_window = cfg.log_every * cfg.batch_size
    logged = {
        "step": step + 1,
        "tokens": (step + 1) * cfg.batch_size,
        "hook": hook,
        **row,
        "dead_fraction": dead_fraction(state.tokens_since_fired, dead_window(cfg)),
        "dense_fraction": dense_fraction(state.fire_counts, tokens_window),
        "lr": lr,
        "tok_s": tok_s,
    }
    state.fire_counts.zero_()
    return logged
