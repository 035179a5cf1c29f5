"""Training checkpoints: one safetensors file (tensors) whose metadata holds the JSON state.

One file means one atomic rename: a run killed at any moment leaves either the previous checkpoint
or the new one, never a mix. Nothing is pickled. Contents, per hook `h`:

    h/sae.<name>                 every SAE parameter and buffer
    h/adam.<param>.exp_avg       optimizer state of each parameter: Adam's moments and step count,
    h/adam.<param>.exp_avg_sq    or schedule-free's z and exp_avg_sq (whose scalars, the step count
    h/adam.<param>.step          and the average's weight sum, go in the JSON)
    h/tokens_since_fired         dead-latent tracking [n_latents]
    h/fire_counts                firings since the last log [n_latents]
    rng/torch                    the global torch RNG state
    metadata["greylens"]         JSON: format_version, step, tokens seen, train config, SAE configs,
                                 optimizer group scalars
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open

from sae.atomic import atomic_save_tensors
from sae.state import HookState

CHECKPOINT = "checkpoint.safetensors"
FORMAT_VERSION = 1
# schedule-free's running scalars (Adam has none)
GROUP_STATE = ("k", "weight_sum", "lr_max", "train_mode")


def save_checkpoint(
    directory: Path, step: int, tokens: int, states: dict[str, HookState], config: dict
) -> None:
    """Write directory/checkpoint.safetensors: every hook's state, the RNG, the JSON state."""
    tensors: dict[str, torch.Tensor] = {"rng/torch": torch.get_rng_state()}
    for hook, state in states.items():
        for name, value in state.sae.state_dict().items():
            tensors[f"{hook}/sae.{name}"] = value
        for name, param in state.sae.named_parameters():
            for key, value in state.optimizer.state.get(param, {}).items():
                tensors[f"{hook}/adam.{name}.{key}"] = torch.as_tensor(value)
        tensors[f"{hook}/tokens_since_fired"] = state.firing.tokens_since_fired
        tensors[f"{hook}/fire_counts"] = state.firing.fire_counts
    meta = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "tokens": tokens,
        "config": config,
        "sae_configs": {hook: asdict(state.sae.cfg) for hook, state in states.items()},
        "optimizer_groups": {
            hook: [{k: g[k] for k in GROUP_STATE if k in g} for g in state.optimizer.param_groups]
            for hook, state in states.items()
        },
    }
    atomic_save_tensors(directory / CHECKPOINT, tensors, {"greylens": json.dumps(meta)})


# settings a resume may change: they do not change results
FREE_SETTINGS = ("resume", "wandb", "device", "log_every", "checkpoint_every", "model")


def prepare_run_dir(
    out: Path, config: dict, resume: bool, defaults: dict | None = None
) -> tuple[Path, bool]:
    """A training run's directory and whether the run resumes from its checkpoint. Raises before
    any work: a resume must use the checkpoint's settings (except those that do not change
    results); a new run must not land on an existing one.

    `--resume` with no checkpoint yet (the job was killed before its first one, or never started)
    starts from scratch and says so on stderr, like a re-run harvest: a job runner re-issuing the
    same command after a pre-emption always works.

    defaults: each setting's default. A setting the checkpoint does not record (it was written
    before the setting existed) counts as its default, since new settings keep the old behaviour at
    their defaults; so an older checkpoint resumes unless the resume turns a new option on."""
    if resume and not (out / CHECKPOINT).exists():
        print(f"--resume: no {CHECKPOINT} in {out} yet; starting from scratch", file=sys.stderr)
        resume = False
    if resume:
        saved = {**(defaults or {}), **read_checkpoint_meta(out)["config"]}
        diffs = [
            f"{k}: checkpoint {saved.get(k)!r}, now {v!r}"
            for k, v in config.items()
            if k not in FREE_SETTINGS and saved.get(k) != v
        ]
        if diffs:
            raise ValueError(
                f"--resume with other settings than {out}'s run ({'; '.join(diffs)}); "
                "use the same flags"
            )
    elif (out / CHECKPOINT).exists():
        raise ValueError(
            f"{out} already holds a training run; pass --resume to continue it or pick a new --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out, resume


def read_checkpoint_meta(directory: Path) -> dict:
    """The checkpoint's JSON state; raises if there is none or its format is another version."""
    path = directory / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(
            f"no {CHECKPOINT} in {directory}: nothing was checkpointed there yet"
        )
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["greylens"])
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {meta.get('format_version')}, expected {FORMAT_VERSION}"
        )
    return meta


def load_checkpoint(directory: Path, states: dict[str, HookState]) -> dict:
    """Restore every hook's SAE, optimizer state and firing tracker in place; return the JSON
    state."""
    meta = read_checkpoint_meta(directory)
    with safe_open(directory / CHECKPOINT, framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    for hook, state in states.items():
        sae_state = {
            k.removeprefix(f"{hook}/sae."): v
            for k, v in tensors.items()
            if k.startswith(f"{hook}/sae.")
        }
        state.sae.load_state_dict(sae_state)
        for name, param in state.sae.named_parameters():
            prefix = f"{hook}/adam.{name}."
            moments = {
                k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)
            }
            if moments:
                state.optimizer.state[param] = {k: v.to(param.device) for k, v in moments.items()}
        for group, saved in zip(
            state.optimizer.param_groups,
            meta.get("optimizer_groups", {}).get(hook, []),
            strict=False,
        ):
            group.update(saved)
        state.firing.tokens_since_fired.copy_(tensors[f"{hook}/tokens_since_fired"])
        state.firing.fire_counts.copy_(tensors[f"{hook}/fire_counts"])
    torch.set_rng_state(tensors["rng/torch"])
    return meta
