"""Train a TopK SAE with EleutherAI sparsify on pre-computed activations, for bench_train.py.

Runs INSIDE the side venv /root/.cache/greylens/venvs/sparsify (eai-sparsify 1.3.3, torch CPU),
never in greylens's own venv. CPU, fp32, torch's default thread count.

    python _sparsify_train.py --train TRAIN.safetensors --eval EVAL.safetensors \
        --n-latents N --k K --batch B --tokens T --lr LR --seed S --out OUT.safetensors \
        [--optimizer signum|adam]

TRAIN/EVAL hold one tensor "x": [rows, d] float32. Trains T // B steps of B rows, taken from one
seeded permutation of TRAIN's rows (repeated when T exceeds the row count), then writes
OUT {"recons": [n_eval, d]} in raw activation space and prints one JSON line on stdout (library,
version, tokens, steps, optimizer, lr, and `_side_driver.StepClock`'s setup_s, steady-state
tok_per_s and median_step_s: set-up = SparseCoder and optimizer construction through the end of
step 0; steady state = steps 1 .. N-2). All else goes to stderr.

sparsify's `Trainer` only trains from a model's forward hooks (it takes a model and a token
dataset), so this driver runs its `SparseCoder` (the module, its fused TopK encoder, its loss
and its decoder helpers) in a short loop that mirrors `Trainer.fit` and its hook for
loss_fn="fvu", one hookpoint, one seed, no gradient accumulation, no DDP:
- init: `torch.manual_seed(seed)` then `SparseCoder(d, SparseCoderConfig(num_latents=N, k=K))`
  (encoder = nn.Linear default init with zero bias, W_dec = encoder weight copy, unit-norm rows);
  on the first step b_dec = mean of that batch.
- every step: `set_decoder_norm_to_unit_norm()`, then the forward with
  total_variance = the batch's variance; loss = fvu + auxk_alpha * auxk_loss (multi-TopK off);
  backward; `remove_gradient_parallel_to_decoder_directions()`; optimizer step, zero_grad,
  scheduler step; dead-latent counters (tokens since a latent fired) updated.
- optimizer, as `Trainer.__init__` builds it (sparsify's default is "signum"):
  signum = `ScheduleFreeWrapper(SignSGD(...), momentum=0.95)`, put in train mode, no LR schedule;
  adam = torch Adam with transformers' linear warm-up (--warmup-steps, sparsify default 1000)
  then linear decay to 0 at the last step.
- AuxK: sparsify's default auxk_alpha is 0, so it is OFF by default (--auxk-alpha to enable;
  a latent is dead after --dead-tokens, sparsify default 10M, tokens without firing).
- inference: as `Trainer` saves a checkpoint, ScheduleFree is switched to eval mode (its averaged
  weights) and the weights are used as they are then (no extra decoder renormalisation); the
  reconstruction is `SparseCoder.forward(x).sae_out` on raw EVAL rows.
- normalisation: sparsify applies none; its FVU loss is scale-free and b_dec starts at the data
  mean, so it trains on raw activations as they are.
- LR: --lr is read as an Adam learning rate. For signum it is multiplied by 25, the ratio of
  sparsify's own width-scaled defaults (signum 5e-3 vs adam 2e-4, both / sqrt(N / 2^14)), so
  the bench's default LR (2e-4 / sqrt(N / 2^14)) gives sparsify exactly its own default.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from importlib.metadata import version

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _side_driver import (  # noqa: E402
    StepClock,
    batches,
    common_parser,
    emit,
    redirect_stdout,
    training_rows,
)

redirect_stdout()  # library prints go to stderr; stdout carries one JSON line

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from schedulefree import ScheduleFreeWrapper  # noqa: E402
from sparsify import SparseCoder, SparseCoderConfig  # noqa: E402
from sparsify.sign_sgd import SignSGD  # noqa: E402
from transformers import get_linear_schedule_with_warmup  # noqa: E402

SIGNUM_OVER_ADAM_LR = 5e-3 / 2e-4  # sparsify's default LRs for the two optimizers
EVAL_CHUNK = 8192


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common_parser(__doc__.splitlines()[0])
    p.add_argument("--optimizer", default="signum", choices=["signum", "adam"])
    p.add_argument(
        "--warmup-steps", type=int, default=1000, help="adam only (sparsify's lr_warmup_steps)"
    )
    p.add_argument("--auxk-alpha", type=float, default=0.0)
    p.add_argument("--dead-tokens", type=int, default=10_000_000)
    return p.parse_args(argv)


def make_optimizer(
    sae: SparseCoder, name: str, lr: float, warmup: int, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """The optimizer (and LR schedule) sparsify's Trainer builds for one SAE."""
    if name == "signum":
        opt = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": lr}]), momentum=0.95)
        opt.train()
        return opt, None
    adam = torch.optim.Adam([{"params": sae.parameters(), "lr": lr}])
    return adam, get_linear_schedule_with_warmup(adam, warmup, steps)


def train(
    sae: SparseCoder,
    data: Iterator[torch.Tensor],
    opt: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    args: argparse.Namespace,
    clock: StepClock,
) -> int:
    """sparsify's Trainer step for loss_fn="fvu", repeated over `data`; returns the tokens seen.
    `clock` ticks at the end of every step."""
    since_fired = torch.zeros(sae.num_latents, dtype=torch.long)
    tokens = 0
    for step, x in enumerate(data):
        if step == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        dead = since_fired > args.dead_tokens if args.auxk_alpha > 0 else None
        out = sae(x, dead_mask=dead, total_variance=(x - x.mean(0)).pow(2).sum())
        (out.fvu + args.auxk_alpha * out.auxk_loss).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()
        since_fired += len(x)
        since_fired[out.latent_indices.flatten()] = 0
        tokens += len(x)
        clock.tick()
    return tokens


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    x, steps = training_rows(args)
    torch.manual_seed(args.seed)
    clock = StepClock(args.batch)
    clock.start()
    sae = SparseCoder(
        x.shape[1], SparseCoderConfig(num_latents=args.n_latents, k=args.k), "cpu", torch.float32
    )
    lr = args.lr * (SIGNUM_OVER_ADAM_LR if args.optimizer == "signum" else 1.0)
    opt, scheduler = make_optimizer(sae, args.optimizer, lr, args.warmup_steps, steps)

    tokens = train(sae, batches(x, args.batch, steps, args.seed), opt, scheduler, args, clock)

    if isinstance(opt, ScheduleFreeWrapper):
        opt.eval()  # what Trainer does before saving: switch to the averaged weights
    x_eval = load_file(args.eval)["x"].float()
    with torch.no_grad():
        recons = torch.cat([sae(chunk).sae_out for chunk in x_eval.split(EVAL_CHUNK)])
    save_file({"recons": recons.float().contiguous()}, args.out)

    report = {
        "library": "sparsify",
        "version": version("eai-sparsify"),
        "tokens": tokens,
        "steps": steps,
        "optimizer": args.optimizer,
        "lr": lr,
        **clock.report(steps),
    }
    emit(report)


if __name__ == "__main__":
    main()
