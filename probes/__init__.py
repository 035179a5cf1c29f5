"""greylens.probes: probes on residuals or SAE features, and the inference-time `Lens` API.

    activations   texts -> per-token activations at a hook (flattened, with text offsets), pooling
    probe         Probe: linear / mean_diff / sparse / graph, scoring, probe.safetensors + probe.json
    fit           logistic fits, feature selection, graph queries, calibration, AUROC
    train         fit + calibrate + evaluate a probe on a task (`python -m probes train`)
    tasks         four built-in binary tasks from offline text, or a user's labelled file
    lens          Lens(model, probes, saes): score(texts), monitor(prompt, trigger, action)

    from probes import Lens, Probe
    lens = Lens("smollm2-135m", probes=["out/probes/code"])
    lens.score("import os")[0].probes["code"].fired

Command line: `python -m probes train|score`.
"""

from probes.lens import Lens
from probes.probe import Probe
from probes.tasks import load_task
from probes.train import ProbeTrainConfig, train_probe

__all__ = ["Lens", "Probe", "ProbeTrainConfig", "load_task", "train_probe"]
