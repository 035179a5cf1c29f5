"""Train a TopK SAE with SAELens's own trainer on pre-computed activations, for bench_train.py.

Runs INSIDE the side venv /root/.cache/greylens/venvs/saelens (sae-lens 6.x, torch CPU), never in
greylens's own venv. CPU, fp32, torch's default thread count.

    python _saelens_train.py --train TRAIN.safetensors --eval EVAL.safetensors --n-latents N --k K \
        --batch B --tokens T --lr LR --seed S --out OUT.safetensors [--normalize MODE]

TRAIN/EVAL hold one tensor "x": [rows, d] float32. Trains T // B steps of B rows, taken from one
seeded permutation of TRAIN's rows (repeated when T exceeds the row count), then writes
OUT {"recons": [n_eval, d]} in raw activation space and prints one JSON line on stdout (library,
version, tokens, steps, and `_side_driver.StepClock`'s setup_s, steady-state tok_per_s and
median_step_s: set-up = SAE and trainer construction through the end of step 0; steady state =
steps 1 .. N-2, each step's end read from fit()'s pull of the next batch). All else goes to stderr.

What runs is SAELens's own code path, as its LLM runner would run it, minus the model:
- `TopKTrainingSAE(TopKTrainingSAEConfig(...))` with SAELens's defaults: AuxK on (coefficient 1,
  k_aux = d/2, a latent is dead after `dead_feature_window` = 1000 steps without firing),
  `rescale_acts_by_decoder_norm=True` (TopK on pre-activations × decoder row norms, no explicit
  decoder renormalisation), decoder rows initialised at norm 0.1, encoder = decoder transpose,
  b_dec = 0 (SAELens 6 has no data-dependent b_dec init, so on activations with a large mean,
  like SmolLM2's, early steps are spent learning the mean), loss = per-token squared error summed
  over d, averaged over the batch.
- `SAETrainer(...).fit()` with an iterator of activation batches as its data provider: Adam
  (0.9, 0.999) at --lr with SAELens's default constant schedule (no warm-up, no decay), gradient
  norm clipped to 1, no wandb, no checkpoints.
- Normalisation: SAELens's default, "none": raw activations go in as they are (no NaNs or
  divergence on raw SmolLM2 L15 activations, and on a small sample SAELens's own
  "expected_average_only_in" option gave the same FVU). `--normalize expected_average_only_in`
  selects that option: inputs scaled by sqrt(d) / E‖x‖, the factor folded back into the weights at
  the end of fit(), so the SAE still takes raw activations. fit() would estimate the factor from
  the first 1000 batches of the data provider (inside the timed loop, using those batches up);
  here `ActivationScaler.estimate_scaling_factor` runs beforehand, untimed, on a separate iterator
  over the same batches (at most 1000), so the training order is unchanged.
- Reconstruction: the trained SAE's forward in eval mode, on raw EVAL rows.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import version

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

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
from sae_lens.config import LoggingConfig, SAETrainerConfig  # noqa: E402
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig  # noqa: E402
from sae_lens.training.sae_trainer import SAETrainer  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

EVAL_CHUNK = 4096  # rows per reconstruction chunk (SAELens decodes dense [rows, n_latents] codes)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common_parser(__doc__.splitlines()[0])
    p.add_argument("--normalize", default="none", choices=["none", "expected_average_only_in"])
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    x, steps = training_rows(args)
    torch.manual_seed(args.seed)
    clock = StepClock(args.batch)
    clock.start()
    sae_cfg = TopKTrainingSAEConfig(
        d_in=x.shape[1],
        d_sae=args.n_latents,
        k=args.k,
        dtype="float32",
        device="cpu",
        normalize_activations=args.normalize,
    )
    sae = TopKTrainingSAE(sae_cfg)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * args.batch,
        train_batch_size_samples=args.batch,
        lr=args.lr,
        lr_end=args.lr / 10,
        device="cpu",
        logger=LoggingConfig(log_to_wandb=False),
    )
    trainer = SAETrainer(
        cfg=trainer_cfg,
        sae=sae,
        data_provider=clock.pulls(batches(x, args.batch, steps, args.seed)),
    )
    if args.normalize == "expected_average_only_in":
        n_norm = min(steps, trainer_cfg.n_batches_for_norm_estimate)
        trainer.activation_scaler.estimate_scaling_factor(
            x.shape[1], batches(x, args.batch, n_norm, args.seed), n_norm
        )
        print(
            f"SAELens input scaling factor: {trainer.activation_scaler.scaling_factor:.4g}",
            file=sys.stderr,
        )

    sae = trainer.fit()  # folds the input scaling factor into the weights at the end

    x_eval = load_file(args.eval)["x"].float()
    sae.eval()
    with torch.no_grad():
        recons = torch.cat([sae(chunk) for chunk in x_eval.split(EVAL_CHUNK)])
    save_file({"recons": recons.float().contiguous()}, args.out)

    tokens = trainer.n_training_samples
    report = {
        "library": "saelens",
        "version": version("sae-lens"),
        "tokens": tokens,
        "steps": trainer.n_training_steps,
        **clock.report(trainer.n_training_steps),
    }
    emit(report)


if __name__ == "__main__":
    main()
