"""Token means: per token type, the mean of an SAE's centred input, and a small TopK SAE on them.

Steps 1-3 of the label-free parents recipe (`graphs.parents`):

  1. one pass of the base SAE over the store: per token type, the sum and count of the SAE's
     centred input x·s − b_dec; per latent, its firing count; the median active value;
  2. token means μ_t of the frequent types, centred over types, unit rows: each type weighs 1, so
     no frequent word can buy a latent of its own;
  3. a TopK SAE on the μ_t, whose latents then stand for whole classes of words.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from sae.atomic import atomic_save_tensors
from sae.sae import SAE, SAEConfig
from sae.store import ActivationStore


@dataclass
class TypeStats:
    """What one pass of the base SAE over the store gives (step 1)."""

    type_ids: torch.Tensor  # [U] int64: every token type in the counted rows
    # [U, d] float64: sum of the SAE's centred input x·s − b_dec over the type's rows
    sums: torch.Tensor
    counts: torch.Tensor  # [U] int64
    fires: torch.Tensor  # [n_latents] int64: base latent firings
    median_value: float  # median active value of the base SAE (first 8 batches)


@torch.no_grad()
def type_statistics(
    sae: SAE, store: ActivationStore, n_tokens: int, device: str = "cpu", chunk: int = 8192
) -> TypeStats:
    """One pass of the SAE over the first n_tokens store rows (rows it passes through are left
    out): per token type, the sum and count of the centred input; per latent, its firings."""
    hook, d = sae.cfg.hook, sae.cfg.d_in
    ids = torch.cat(
        [store.shard(s)["token_ids"].long() for s in range(len(store.manifest.shards))]
    )[:n_tokens]
    type_ids, inverse = ids.unique(return_inverse=True)
    sums = torch.zeros(len(type_ids), d, dtype=torch.float64)
    counts = torch.zeros(len(type_ids), dtype=torch.int64)
    fires = torch.zeros(sae.cfg.n_latents, dtype=torch.int64)
    values = []
    b_dec = sae.b_dec.detach().double().cpu()
    for start in tqdm(range(0, n_tokens, chunk), desc="token types", leave=False):
        rows = torch.arange(start, min(start + chunk, n_tokens))
        x = store.rows(rows, hooks=[hook])[hook].to(device)
        code = sae.encode(x)
        on = code.values > 0
        fires += torch.bincount(code.cols[on].cpu(), minlength=sae.cfg.n_latents)
        if len(values) < 8:
            values.append(code.values[on].cpu())
        keep = ~sae.passthrough(x).cpu()
        centred = x.cpu()[keep].double() * sae.cfg.input_scale - b_dec
        sums.index_add_(0, inverse[rows][keep], centred)
        counts += torch.bincount(inverse[rows][keep], minlength=len(type_ids))
    return TypeStats(type_ids, sums, counts, fires, float(torch.cat(values).median()))


def save_type_stats(types: TypeStats, path: Path) -> None:
    atomic_save_tensors(
        path,
        {
            "type_ids": types.type_ids,
            "sums": types.sums,
            "counts": types.counts,
            "fires": types.fires,
            "median_value": torch.tensor([types.median_value]),
        },
    )


def load_type_stats(path: Path) -> TypeStats:
    t = load_file(path)
    return TypeStats(t["type_ids"], t["sums"], t["counts"], t["fires"], float(t["median_value"][0]))


def token_means(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[V, d] float32: each type's mean, centred over types (each type weighs 1), unit rows."""
    means = sums / counts[:, None].double()
    means = means - means.mean(0)
    return torch.nn.functional.normalize(means, dim=1).float()


def train_tokmean_sae(
    x: torch.Tensor,
    latents: int,
    k: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    device: str = "cpu",
) -> tuple[SAE, float]:
    """A TopK SAE (latents, k) on the rows of x [V, d] (small: dense codes), Adam with a linear LR
    decay over the last fifth; returns it and its FVU on x."""
    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig(d_in=x.shape[1], n_latents=latents, arch="topk", k=k))
    sae.reset_parameters(generator=g)
    sae = sae.to(device)
    x = x.to(device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    decay_from = int(0.8 * steps)
    for step in tqdm(range(steps), desc="token-mean SAE", leave=False):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (steps - step) / max(steps - decay_from, 1))
        batch = x[torch.randint(len(x), (min(batch_size, len(x)),), generator=g).to(device)]
        loss = _tokmean_fvu(sae, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sae.normalize_decoder()
    with torch.no_grad():
        return sae.cpu().eval(), float(_tokmean_fvu(sae, x.cpu()))


def _tokmean_fvu(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    acts = _dense_topk(sae, x)
    x_hat = acts @ sae.W_dec + sae.b_dec
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


def _dense_topk(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    pre = sae.pre_acts(x)
    top = pre.topk(sae.cfg.k, dim=1)
    return torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())


@torch.no_grad()
def active_latents(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """[V, latents] bool: which latents fire on each row."""
    return _dense_topk(sae, x) > 0
