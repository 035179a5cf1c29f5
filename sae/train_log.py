"""Training logs: `metrics.jsonl` (the source of every plot), wandb, and PNG plots at the end.

wandb runs offline unless the user sets `--wandb online` (or `disabled`); the local JSONL is always
written. On resume, rows logged after the checkpoint's step are dropped first, so a killed and
resumed run has each step once.
"""

from __future__ import annotations

import json
from pathlib import Path

METRICS = "metrics.jsonl"
PLOTTED = ("loss", "l0", "fvu", "dead_fraction")


def metrics_row(
    step: int,
    batch_size: int,
    hook: str,
    row: dict[str, float],
    firing: dict[str, float],
    lr: float,
    tok_s: float,
) -> dict:
    """One metrics.jsonl row: after `step` (0-based) of `batch_size` tokens, the step's `row`, the
    firing tracker's fractions, the LR and the throughput so far."""
    return {
        "step": step + 1,
        "tokens": (step + 1) * batch_size,
        "hook": hook,
        **row,
        **firing,
        "lr": lr,
        "tok_s": tok_s,
    }


class TrainLogger:
    """Appends metric rows to out/metrics.jsonl and wandb; `finish` plots them. Only rank 0 logs
    (enabled=False on the others)."""

    def __init__(
        self,
        out: Path,
        config: dict,
        wandb_mode: str,
        resume_step: int | None,
        enabled: bool = True,
    ) -> None:
        self.path = Path(out) / METRICS
        self.enabled = enabled
        self.run = None
        if not enabled:
            return
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if json.loads(line)["step"] <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        if wandb_mode != "disabled":
            import wandb  # imported only when used: it is slow to import and optional at run time

            self.run = wandb.init(
                project="greylens",
                dir=str(out),
                mode=wandb_mode,
                config=config,
                name=Path(out).name,
                resume="allow",
            )

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.run is not None:
            self.run.log(
                {f"{row['hook']}/{k}": v for k, v in row.items() if k not in ("hook", "step")},
                step=row["step"],
            )

    def finish(self) -> Path | None:
        if not self.enabled:
            return None
        if self.run is not None:
            self.run.finish()
        return plot_metrics(self.path, self.path.parent / "plots" / "training.png")


def plot_metrics(metrics_path: Path, png: Path) -> Path | None:
    """Loss, L0, FVU and dead fraction against tokens, one line per hook."""
    if not metrics_path.exists():
        return None
    import matplotlib  # imported only to plot, once at the end of a run

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, key in zip(axes.flat, PLOTTED, strict=True):
        for hook in dict.fromkeys(r["hook"] for r in rows):
            points = [(r["tokens"], r[key]) for r in rows if r["hook"] == hook and key in r]
            ax.plot([p[0] for p in points], [p[1] for p in points], label=hook)
        ax.set_title(key)
        ax.set_xlabel("tokens")
        if key in ("loss", "fvu"):
            ax.set_yscale("log")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
