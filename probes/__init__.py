"""greylens.probes: probes on residuals or SAE features, and the inference-time `Lens` API.

    activations   texts -> per-token activations at a hook (flattened, with text offsets), pooling
    probe         Probe: linear / mean_diff / sparse / graph, scoring, probe.safetensors + .json
    fit           pooled logistic fits, feature selection, graph queries, calibration, AUROC
    train         fit + calibrate + evaluate a probe on a task (`python -m probes train`)
    tasks         four built-in binary tasks from offline text, or a user's labelled file
    languages     the language task's samples (UDHR translations from the gflanguages wheel)
    sampling      the one token sampler (temperature, top-k, top-p) of Lens and the engine
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
