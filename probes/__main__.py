"""`python -m probes train|score ...` (a stable contract: scripts call these).

train   fit, calibrate and evaluate one probe on a task; prints its summary as JSON
score   per-token and pooled scores of saved probes on a text (JSON)
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from probes.lens import Lens
from probes.train import ProbeTrainConfig, train_probe
from sae.cli import add_dataclass_args, command_parser, dataclass_from_args
from sae.device import ComputeDtype
from sae.models import load_model


@dataclass
class ScoreConfig:
    model: str = "smollm2-135m"
    """Model to run: a model spec: smollm2-135m, tiny-<family>, a local HF directory, a .gguf,
    or org/name from the local HF cache."""
    device: str = "auto"
    """Device of the model: cpu, cuda, cuda:N, or auto (cuda when there is one)."""
    dtype: ComputeDtype = "auto"
    """Compute dtype of the model: auto is float32 on CPU, bfloat16 on CUDA."""
    text: str = ""
    """Text to score."""
    sae: str = ""
    """Optional SAE directory: dense probes then report the SAE features behind their score."""
    top_features: int = 5
    """Features listed per probe."""
    max_tokens: int = 256
    """Tokens read (BOS included); longer texts are truncated."""


def run_score(cfg: ScoreConfig, probe_dirs: list[str]) -> list[dict]:
    if not cfg.text:
        raise ValueError("pass --text '...'")
    lens = Lens(
        load_model(cfg.model, cfg.device, cfg.dtype),
        probes=probe_dirs,
        saes=[cfg.sae] if cfg.sae else [],
        max_tokens=cfg.max_tokens,
        top_features=cfg.top_features,
    )
    return [r.to_json() for r in lens.score([cfg.text])]


def main(argv: list[str] | None = None) -> int:
    parser, commands = command_parser("python -m probes", __doc__)
    add_dataclass_args(
        commands.add_parser("train", help="train one probe"), ProbeTrainConfig, ("task", "out")
    )
    score = commands.add_parser("score", help="score a text with saved probes")
    score.add_argument(
        "--probe", action="append", required=True, help="probe directory (repeat for several)"
    )
    add_dataclass_args(score, ScoreConfig, ("text",))
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            probe = train_probe(dataclass_from_args(ProbeTrainConfig, args))
            result = probe.summary()
        else:
            result = run_score(dataclass_from_args(ScoreConfig, args), args.probe)
    except (ValueError, FileNotFoundError, MemoryError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
