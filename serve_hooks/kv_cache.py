"""Where KV bytes live: the paged device pool, and the host-memory and disk tiers behind it.

The device pool is two tensors per engine, k and v: [n_layers, num_blocks, block_size,
n_kv_heads, head_dim]. A token's slot is block * block_size + offset; the model runner writes
new K/V at their slots and gathers a sequence's blocks for attention. Blocks evicted from the pool
can be copied to host memory (`host_blocks` slots, pinned on CUDA) and from there to one
safetensors file per block under `disk_dir`. This class only moves bytes; *which* block goes
where is the block manager's policy.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from sae.atomic import atomic_save_tensors


class KVCache:
    def __init__(
        self,
        n_layers: int,
        num_blocks: int,
        block_size: int,
        n_kv_heads: int,
        head_dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        host_blocks: int = 0,
        disk_dir: str = "",
    ) -> None:
        shape = (n_layers, num_blocks, block_size, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.block_size, self.num_blocks = block_size, num_blocks
        host_shape = (host_blocks, n_layers, block_size, n_kv_heads, head_dim)
        pin = torch.device(device).type == "cuda"
        self.host_k = torch.zeros(host_shape, dtype=dtype, pin_memory=pin)
        self.host_v = torch.zeros(host_shape, dtype=dtype, pin_memory=pin)
        self.disk_dir = Path(disk_dir) if disk_dir else None
        if self.disk_dir is not None:
            self.disk_dir.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def bytes_per_block(
        n_layers: int, block_size: int, n_kv_heads: int, head_dim: int, dtype_bytes: int = 4
    ) -> int:
        return 2 * n_layers * block_size * n_kv_heads * head_dim * dtype_bytes

    # ------------------------------------------------------------------ tiers

    def device_to_host(self, block: int, slot: int) -> None:
        self.host_k[slot].copy_(self.k[:, block], non_blocking=True)
        self.host_v[slot].copy_(self.v[:, block], non_blocking=True)

    def host_to_device(self, slot: int, block: int) -> None:
        self.k[:, block].copy_(self.host_k[slot], non_blocking=True)
        self.v[:, block].copy_(self.host_v[slot], non_blocking=True)

    def host_to_disk(self, slot: int, name: str, extras: dict[str, Tensor] | None = None) -> None:
        """One file per block: its K and V, plus `extras` (per-token data kept beside the KV)."""
        tensors = {f"extra/{key}": t for key, t in (extras or {}).items()}
        tensors |= {"k": self.host_k[slot], "v": self.host_v[slot]}
        atomic_save_tensors(self._path(name), tensors)  # a reader never sees half a block

    def disk_to_device(self, name: str, block: int) -> dict[str, Tensor]:
        """Load a block's KV into `block`; returns the extras saved with it."""
        tensors = load_file(str(self._path(name)))
        self.k[:, block].copy_(tensors["k"])
        self.v[:, block].copy_(tensors["v"])
        return {
            key.removeprefix("extra/"): t for key, t in tensors.items() if key.startswith("extra/")
        }

    def delete(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)

    def _path(self, name: str) -> Path:
        if self.disk_dir is None:
            raise RuntimeError("the disk tier is off (disk_dir is empty)")
        return self.disk_dir / f"{name}.safetensors"

    # ------------------------------------------------------------- transfer (prefill -> decode)

    def gather(self, blocks: list[int]) -> tuple[Tensor, Tensor]:
        """K, V of these blocks: [n_layers, len(blocks), block_size, n_kv_heads, head_dim] each."""
        index = torch.tensor(blocks, device=self.k.device, dtype=torch.long)
        return self.k.index_select(1, index), self.v.index_select(1, index)

    def scatter(self, blocks: list[int], k: Tensor, v: Tensor) -> None:
        index = torch.tensor(blocks, device=self.k.device, dtype=torch.long)
        self.k.index_copy_(1, index, k.to(self.k.device))
        self.v.index_copy_(1, index, v.to(self.v.device))
