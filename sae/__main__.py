"""`python -m sae harvest|info|train|eval ...` (a stable contract: scripts call these)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from sae.cli import add_dataclass_args, command_parser, dataclass_from_args
from sae.device import ComputeDtype
from sae.evaluate import heldout_windows, reconstruction_metrics, splice_metrics
from sae.harvest import HarvestConfig, harvest
from sae.identity import check_model_matches
from sae.io import load_sae
from sae.models import load_model
from sae.store import ActivationStore, StoreError
from sae.train import TrainConfig, train


@dataclass
class EvalConfig:
    sae: str = ""
    """SAE directory (cfg.json + sae.safetensors)."""
    store: str = ""
    """Activation store for reconstruction metrics (harvest it with --split heldout)."""
    model: str = ""
    """Also splice the SAE into this model (a model spec: smollm2-135m, tiny-llama, a directory,
    a .gguf, org/name) for CE loss recovered and KL."""
    device: str = "auto"
    """Device of the model: cpu, cuda, cuda:N, or auto (cuda when there is one)."""
    dtype: ComputeDtype = "auto"
    """Compute dtype of the model: auto is float32 on CPU, bfloat16 on CUDA."""
    tokens: int = 8192
    """Held-out tokens to score when splicing."""
    context_size: int = 128
    """Window size for the splice evaluation."""
    corpus: str = "default"
    """Corpus whose held-out documents the splice evaluation reads (built-in name or a path)."""
    max_store_tokens: int = 0
    """Cap on store tokens for reconstruction metrics (0: all)."""


def run_eval(cfg: EvalConfig) -> dict:
    """Reconstruction metrics of an SAE on a store, and splice metrics when a model is given."""
    sae = load_sae(cfg.sae)
    model = load_model(cfg.model, cfg.device, cfg.dtype) if cfg.model else None
    if model is not None:
        check_model_matches(
            f"the SAE {cfg.sae}",
            model,
            sae.cfg.model_record,
            sae.cfg.d_in,
            [sae.cfg.hook],
            sae.cfg.weights_sha256,
        )
    result = {
        "sae": cfg.sae,
        "hook": sae.cfg.hook,
        "arch": sae.cfg.arch,
        "n_latents": sae.cfg.n_latents,
    }
    result.update(
        reconstruction_metrics(sae, ActivationStore(cfg.store), cfg.max_store_tokens or None)
    )
    if model is not None:
        windows = heldout_windows(model, cfg.tokens, cfg.context_size, corpus=cfg.corpus)
        result.update(splice_metrics(model, sae.to(model.device), windows))
    return result


def main(argv: list[str] | None = None) -> int:
    parser, commands = command_parser("python -m sae", __doc__)
    add_dataclass_args(
        commands.add_parser("harvest", help="collect activations into a store"),
        HarvestConfig,
        ("out",),
    )
    add_dataclass_args(
        commands.add_parser("train", help="train SAEs on a store"), TrainConfig, ("store", "out")
    )
    add_dataclass_args(
        commands.add_parser("eval", help="evaluate an SAE (JSON)"), EvalConfig, ("sae", "store")
    )
    info_parser = commands.add_parser("info", help="print a store's manifest summary as JSON")
    info_parser.add_argument("store", help="activation store directory")
    info_parser.add_argument(
        "--verify", action="store_true", help="also check every shard's sha256"
    )
    args = parser.parse_args(argv)

    try:
        if args.command == "harvest":
            print(json.dumps(harvest(dataclass_from_args(HarvestConfig, args)).summary(), indent=2))
        elif args.command == "train":
            cfg = dataclass_from_args(TrainConfig, args)
            saes = train(cfg)
            print(
                json.dumps(
                    {"out": cfg.out, "saes": {hook: f"{cfg.out}/{hook}" for hook in saes}}, indent=2
                )
            )
        elif args.command == "eval":
            print(json.dumps(run_eval(dataclass_from_args(EvalConfig, args)), indent=2))
        elif args.command == "info":
            store = ActivationStore(args.store, verify=False)
            if args.verify:
                store.verify()
            print(json.dumps(store.summary(), indent=2))
    except (
        StoreError,
        ValueError,
        FileNotFoundError,
        ModuleNotFoundError,
        OverflowError,
        MemoryError,
    ) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
