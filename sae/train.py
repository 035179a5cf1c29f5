"""SAE trainer: one pass over the activation store trains one SAE per hook.

    for each batch of the store (seeded shuffle, resumable at any step):
        for each hook:  forward (sparse kernels for the TopK family) -> FVU + AuxK + λ·sparsity
                        -> backward -> drop decoder-parallel grad -> optimizer -> unit-norm decoder
                        [--target-l0: λ = λ_I·(L0/target) from this batch's L0; λ_I integrates]
                        [--reopen-dead (jumprelu): dead latents' θ back at the k/n quantile]
        every log_every steps: metrics.jsonl + wandb;  every checkpoint_every: checkpoint
    finally: schedule-free's averaged weights, batchtopk's inference θ, out/<hook>/ for each hook.

The pieces live in their own modules, shared with the graph trainer (`graphs.train`): the config
(`sae.config`), initialisation (`sae.init`), per-hook state (`sae.state`), optimizers
(`sae.optim`), the LR schedule (`sae.schedule`), the sparsity penalty and its controller
(`sae.sparsity`), the firing tracker (`sae.firing`), batch stepping (`sae.batches`), data
parallelism (`sae.distributed`), checkpoints (`sae.checkpoint`) and logs (`sae.train_log`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sae.batches import step_batches
from sae.checkpoint import load_checkpoint, prepare_run_dir, save_checkpoint
from sae.codes import batch_topk_code
from sae.config import TrainConfig, base_lr, compute_dtype, lr_decay_frac
from sae.distributed import Distributed
from sae.firing import dead_window
from sae.hooks import parse_hooks
from sae.identity import check_model_matches
from sae.init import init_hook_state
from sae.io import save_sae
from sae.models import load_model
from sae.optim import average_weights, set_lr
from sae.sae import SAE, SPARSE_ARCHS, Reduce, SAEOutput, fvu
from sae.schedule import lr_at
from sae.sparsity import (
    adapt_sparsity_coeff,
    applied_sparsity_coeff,
    reopen_thresholds,
    sparsity_coeff_at,
    sparsity_warmup_steps,
)
from sae.state import HookState
from sae.store import ActivationStore
from sae.train_log import TrainLogger, metrics_row

__all__ = ["TrainConfig", "calibrate_threshold", "device_rows", "train"]


def train(
    cfg: TrainConfig,
    dist: Distributed | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, SAE]:
    """Train (or resume) one SAE per hook; returns them and writes out/<hook>/ for each.

    on_step(step) runs after each optimizer step (every hook updated), before the checkpoint:
    scripts/bench_train.py uses it to time a GEMM between training steps."""
    dist = dist or Distributed()
    store, hooks, out, resuming = _check_inputs(cfg, dist)
    states = {hook: init_hook_state(cfg, store, hook) for hook in hooks}
    first_step = _resume(out, states) if resuming else 0
    n_steps = max(1, cfg.tokens // cfg.batch_size)
    base = base_lr(cfg, cfg.expansion * store.d_model)
    resume_step = first_step if resuming else None
    logger = TrainLogger(out, asdict(cfg), cfg.wandb, resume_step, enabled=dist.rank == 0)
    bar = tqdm(
        total=n_steps,
        initial=first_step,
        unit="step",
        desc=f"train {cfg.arch}",
        disable=dist.rank != 0,
    )
    started = time.perf_counter()
    batches = step_batches(store, cfg.batch_size, cfg.seed, hooks, first_step, n_steps)
    for step, batch in batches:
        lr = lr_at(base, step, n_steps, cfg.warmup_frac, lr_decay_frac(cfg))
        log = (step + 1) % cfg.log_every == 0 or step + 1 == n_steps
        for hook, state in states.items():
            x = device_rows(cfg, state.sae, batch[hook], dist)
            row = _train_hook(cfg, state, x, step, n_steps, lr, dist, log)
            if log:
                tok_s = (step + 1 - first_step) * cfg.batch_size / (time.perf_counter() - started)
                logged_tokens = cfg.log_every * cfg.batch_size
                firing = state.firing.log_fractions(_dead_window(cfg), logged_tokens)
                logger.log(metrics_row(step, cfg.batch_size, hook, row, firing, lr, tok_s))
                bar.set_postfix(fvu=f"{row['fvu']:.3f}", l0=f"{row['l0']:.1f}")
        bar.update(1)
        if on_step is not None:
            on_step(step)
        if dist.rank == 0 and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == n_steps):
            save_checkpoint(out, step + 1, (step + 1) * cfg.batch_size, states, asdict(cfg))
    bar.close()
    _finish(cfg, store, states, out, dist)
    logger.finish()
    return {hook: state.sae for hook, state in states.items()}


def _check_store_model(spec: str, store: ActivationStore, hooks: list[str]) -> None:
    """--model given: the store must have been harvested from it (loaded on CPU, just to check)."""
    m = store.manifest
    check_model_matches(
        f"the store {store.directory}",
        load_model(spec, device="cpu"),
        m.model_record,
        m.d_model,
        hooks,
        m.weights_sha256,
    )


def _check_inputs(
    cfg: TrainConfig, dist: Distributed
) -> tuple[ActivationStore, list[str], Path, bool]:
    """Every refusal happens here, before the first step. Also returns whether the run resumes
    (--resume with a checkpoint in out; without one it starts from scratch)."""
    if not cfg.store or not cfg.out:
        raise ValueError("pass both --store DIR and --out DIR")
    store = ActivationStore(cfg.store)
    hooks = parse_hooks(cfg.hooks) if cfg.hooks else list(store.hooks)
    missing = [h for h in hooks if h not in store.hooks]
    if missing:
        raise ValueError(
            f"the store has no {', '.join(missing)}; it holds {', '.join(store.hooks)}"
        )
    if cfg.model:
        _check_store_model(cfg.model, store, hooks)
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
            "--target-l0 and --l0-control-gain must be >= 0, "
            "--l0-control-rate and --threshold-lr-scale > 0"
        )
    if len(store) < cfg.batch_size:
        raise ValueError(
            f"the store holds {len(store)} tokens, fewer than one batch ({cfg.batch_size})"
        )
    # checkpoints from before the optimizer setting existed were Adam's
    defaults = {**asdict(TrainConfig()), "optimizer": "adam"}
    out, resuming = prepare_run_dir(Path(cfg.out), asdict(cfg), cfg.resume, defaults=defaults)
    return store, hooks, out, resuming


def _resume(out: Path, states: dict[str, HookState]) -> int:
    """Restore the checkpoint; λ (the target-L0 controller's state) lives in each SAE's config."""
    meta = load_checkpoint(out, states)
    for hook, state in states.items():
        state.sae.cfg.sparsity_coeff = meta["sae_configs"][hook].get("sparsity_coeff", 0.0)
    return meta["step"]


def _dead_window(cfg: TrainConfig) -> int:
    return dead_window(cfg.dead_tokens, cfg.tokens, cfg.batch_size)


def device_rows(cfg: TrainConfig, sae: SAE, batch: torch.Tensor, dist: Distributed) -> torch.Tensor:
    """This rank's rows of the host batch [N, d] without the massive ones, on the training device.

    The rows are dropped on the host, before the copy: boolean indexing on the device has a
    data-dependent shape, so the host would wait for the GPU every step. On CUDA the rows are
    copied from pinned memory without blocking (the copy overlaps the previous step's kernels)."""
    x = dist.local(batch)
    x = x[~sae.passthrough(x)]  # [N_local - skipped, d], on the host
    device = torch.device(cfg.device)
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def _train_hook(
    cfg: TrainConfig,
    state: HookState,
    x: torch.Tensor,
    step: int,
    n_steps: int,
    lr: float,
    dist: Distributed,
    log: bool = True,
) -> dict[str, float]:
    """One step of one hook's SAE on this rank's rows x: [N_local, d] (from `device_rows`); λ
    follows its fixed schedule or, under a target L0, the controller. The returned row is filled
    only on log steps (`log`); otherwise it is empty (or holds just the L0 the controller read)."""
    # under a target L0 the step sets λ from the batch's own L0
    coeff = 0.0 if cfg.target_l0 else sparsity_coeff_at(cfg, step, n_steps)
    row = _train_step(cfg, state, x, lr, coeff, dist, log)
    if cfg.target_l0 and step >= sparsity_warmup_steps(cfg, n_steps):
        # the controller integrates only after the warm-up's transient
        state.sae.cfg.sparsity_coeff = adapt_sparsity_coeff(
            cfg, state.sae.cfg.sparsity_coeff, row["l0"]
        )
    elif not cfg.target_l0:
        state.sae.cfg.sparsity_coeff = coeff
    return row


def _train_step(
    cfg: TrainConfig,
    state: HookState,
    x: torch.Tensor,
    lr: float,
    coeff: float,
    dist: Distributed,
    log: bool = True,
) -> dict[str, float]:
    """Forward, loss, backward and update on x: [N_local, d] (massive rows already skipped).

    Nothing here waits for the device unless the step logs (`log`: the row's numbers are read
    back) or one of these needs a host value: the target-L0 controller (this step's λ is a
    function of this batch's L0, read with .item()), --reopen-dead (whether any latent is dead
    decides whether the jumprelu thresholds are re-set), and with several ranks the global row
    count (an all-reduce of the rows kept after skipping massive activations)."""
    sae = state.sae
    set_lr(state.optimizer, lr)
    dead = state.firing.dead(_dead_window(cfg))  # [n_latents] bool
    reduce = dist.sum if dist.world > 1 else None
    aux_k = x.shape[1] // 2 if cfg.arch in SPARSE_ARCHS or cfg.dense_aux else 0  # k_aux = d/2
    dtype = compute_dtype(cfg)  # bf16: the forward's matmuls in bf16, weights/loss stay fp32
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = sae.training_forward(x, dead=dead, aux_k=aux_k, reduce=reduce)
    # rows differ per rank after skipping outliers: count the global batch
    n_tokens = x.shape[0] if dist.world == 1 else int(dist.sum(torch.tensor(x.shape[0])))
    fired = dist.sum((out.code.values > 0).sum().float())  # scalar on the device: no sync
    row = {"l0": fired.item() / n_tokens} if cfg.target_l0 else {}  # the controller's read
    if cfg.target_l0:
        coeff = applied_sparsity_coeff(cfg, sae.cfg.sparsity_coeff, row["l0"])
    loss = out.fvu + cfg.aux_coeff * out.aux_loss + coeff * out.sparsity_loss
    _update(cfg, state, loss, dist)
    if cfg.reopen_dead and cfg.arch == "jumprelu" and bool(dead.any()):
        reopen_thresholds(sae, x, dead, cfg.target_l0 or cfg.k, dist)
    if cfg.arch in SPARSE_ARCHS[1:] and dist.world > 1:  # one inference threshold for all ranks
        sae.threshold.copy_(dist.sum(sae.threshold.clone()) / dist.world)
    state.firing.update(out.code, n_tokens, dist)
    if not log:
        return row
    l0 = fired.item() / n_tokens
    return {**_step_losses(x, out, loss, reduce, dist), "l0": l0, "sparsity_coeff": coeff}


def _update(cfg: TrainConfig, state: HookState, loss: torch.Tensor, dist: Distributed) -> None:
    """Backward, sum the ranks' gradients, optimizer step; decoder rows stay unit-norm."""
    sae, optimizer = state.sae, state.optimizer
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


def _step_losses(
    x: torch.Tensor,
    out: SAEOutput,
    loss: torch.Tensor,
    reduce: Reduce | None,
    dist: Distributed,
) -> dict[str, float]:
    """The step's losses over the global batch, for the log."""
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
    return dict(zip(names, totals, strict=True))


def _finish(
    cfg: TrainConfig,
    store: ActivationStore,
    states: dict[str, HookState],
    out: Path,
    dist: Distributed,
) -> None:
    """The trained SAEs: averaged weights (schedule-free), inference θ (batchtopk, matryoshka),
    written to out/<hook>/ by rank 0. Checkpoints keep the optimizer's train-mode weights."""
    for state in states.values():
        # an average of unit rows is not unit: renormalise (relu keeps free decoder norms)
        if average_weights(state.optimizer) and cfg.arch != "relu":
            state.sae.normalize_decoder()
    if dist.rank != 0:
        return
    for hook, state in states.items():
        if cfg.arch in SPARSE_ARCHS[1:]:
            calibrate_threshold(state.sae, store, hook, cfg)
        save_sae(state.sae, out / hook)


@torch.no_grad()
def calibrate_threshold(
    sae: SAE, store: ActivationStore, hook: str, cfg: TrainConfig, n_batches: int = 8
) -> float:
    """Set the batchtopk/matryoshka inference θ so that inference keeps k latents per token on
    average.

    During training θ is an EMA of each batch's smallest kept activation, which lags the moving
    encoder (and so gives fewer than k latents per token). With the final weights, θ becomes the
    mean over a few batches of the cut that keeps round(k·N) activations, i.e. the rule training
    used."""
    cuts = []
    for _, batch in step_batches(store, cfg.batch_size, cfg.seed, [hook], 0, n_batches):
        x = batch[hook].to(cfg.device)
        x = x[~sae.passthrough(x)]
        pre = sae.pre_acts(x.to(sae.W_enc.dtype) * sae.cfg.input_scale)
        cuts.append(batch_topk_code(pre, sae.cfg.k).values.min())
    if cuts:
        sae.threshold.copy_(torch.stack(cuts).mean())
    return float(sae.threshold)
