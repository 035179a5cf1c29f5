"""Data-parallel SAE training under torchrun (gloo on CPU, NCCL on GPU).

    torchrun --nproc_per_node 2 scripts/train_ddp.py --store DIR --out DIR \
        [any `python -m sae train` flag]

Every rank reads the same global batch from the store and trains on its slice; losses use
global denominators and gradients are summed, so the run takes the same steps as one process
with the same --batch-size (tests/sae/test_train.py checks this with two CPU ranks).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from sae.cli import add_dataclass_args, dataclass_from_args
from sae.config import TrainConfig
from sae.distributed import Distributed
from sae.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_dataclass_args(parser, TrainConfig, required=("store", "out"))
    cfg = dataclass_from_args(TrainConfig, parser.parse_args())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        cfg.device = f"cuda:{local_rank}"
    try:
        train(cfg, Distributed(dist.get_rank(), dist.get_world_size()))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
