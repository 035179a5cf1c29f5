"""greylens.sae: from a decoder-only model to trained sparse autoencoders.

- the model and its activations: model loading (`sae.models`), hook points (`sae.hooks`), the
  corpus (`sae.corpus`, `sae.windows`), harvesting (`sae.harvest`) into an activation store
  (`sae.store`);
- the SAEs: architectures (`sae.sae`; sparse codes and kernels in `sae.codes`, `sae.kernels`,
  `sae.jumprelu`), files and SAELens interop (`sae.io`), metrics and evaluation (`sae.metrics`,
  `sae.evaluate`);
- training (`sae.train`), from pieces other trainers share: config (`sae.config`),
  initialisation (`sae.init`), per-hook state (`sae.state`), optimizers (`sae.optim`), the LR
  schedule (`sae.schedule`), the sparsity penalty (`sae.sparsity`), the firing tracker
  (`sae.firing`), batch stepping (`sae.batches`), data parallelism (`sae.distributed`),
  checkpoints (`sae.checkpoint`) and logs (`sae.train_log`).

Command line: `python -m sae harvest|info|train|eval`. In Python:

    from sae import load_model, HarvestConfig, harvest, ActivationStore
    from sae.train import TrainConfig, train
    from sae.io import load_sae
"""

from sae.corpus import load_corpus
from sae.harvest import HarvestConfig, harvest, harvest_stream
from sae.models import LoadedModel, load_model
from sae.store import ActivationStore, StoreError

__all__ = [
    "ActivationStore",
    "HarvestConfig",
    "LoadedModel",
    "StoreError",
    "harvest",
    "harvest_stream",
    "load_corpus",
    "load_model",
]
