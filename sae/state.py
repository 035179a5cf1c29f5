"""Per-hook training state: what a trainer updates each step and a checkpoint saves.

`sae.checkpoint` writes and restores exactly these fields; the SAE trainer (`sae.train`) and the
graph trainer (`graphs.train`) both keep one `HookState` per trained hook.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sae.firing import FiringTracker


@dataclass
class HookState:
    # the module being trained: an SAE, or the graph trainer's SparseGraphAutoencoder; its `cfg`
    # dataclass goes into the checkpoint's JSON
    sae: nn.Module
    optimizer: torch.optim.Optimizer
    firing: FiringTracker
