"""One config for the engine (nano-vllm style): every knob of the pipeline in one dataclass."""

from __future__ import annotations

from dataclasses import dataclass

from sae.device import ComputeDtype


@dataclass
class EngineConfig:
    model: str = "smollm2-135m"
    """Model to serve: a model spec (smollm2-135m, tiny-<family>, a local HF directory, a .gguf,
    or org/name from the local HF cache)."""
    block_size: int = 16
    """Tokens per KV block (the unit of paging, prefix caching and transfer)."""
    num_blocks: int = 0
    """KV blocks in the device pool (0: as many as kv_cache_gb holds)."""
    kv_cache_gb: float = 1.0
    """Device memory for the KV pool when num_blocks is 0."""
    max_num_seqs: int = 64
    """Requests running at once (continuous batching)."""
    max_num_batched_tokens: int = 512
    """Token budget of one step: decode tokens first, then prefill chunks."""
    max_model_len: int = 0
    """Prompt + output tokens per request (0: the model's context length)."""
    enable_prefix_cache: bool = True
    """Reuse KV blocks of earlier requests that share a prefix (longest-prefix match)."""
    chunked_prefill: bool = True
    """Split long prompts into chunks that share steps with decodes (off: whole prompts only)."""
    host_blocks: int = 0
    """KV tier 2: blocks evicted from the device pool are kept in host memory (0: off)."""
    disk_dir: str = ""
    """KV tier 3: blocks evicted from host memory spill to files here ("": off)."""
    disk_blocks: int = 4096
    """Capacity of the disk tier in blocks (oldest dropped first)."""
    disk_ttl_s: float = 24 * 3600.0
    """Disk blocks older than this are dropped (seconds)."""
    device: str = "auto"
    """Device for weights, activations and the KV pool: cpu, cuda, cuda:N, or auto (cuda when
    there is one)."""
    dtype: ComputeDtype = "auto"
    """Compute dtype of the weights and the KV pool: auto is float32 on CPU, bfloat16 on CUDA."""
    seed: int = 0
    """Seed of requests that sample without their own seed."""

    def __post_init__(self) -> None:
        checks = {
            "block_size": self.block_size >= 1,
            "max_num_seqs": self.max_num_seqs >= 1,
            "max_num_batched_tokens": self.max_num_batched_tokens >= 1,
            "num_blocks": self.num_blocks >= 0,
            "host_blocks": self.host_blocks >= 0,
            "disk_blocks": self.disk_blocks >= 1,
            "disk_ttl_s": self.disk_ttl_s > 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"invalid engine settings: {', '.join(f'{b}={getattr(self, b)}' for b in bad)}"
            )
        if (
            not self.chunked_prefill
            and self.max_model_len
            and self.max_num_batched_tokens < self.max_model_len
        ):
            raise ValueError(
                "without chunked prefill a whole prompt must fit one step: set "
                "max_num_batched_tokens >= max_model_len or enable chunked_prefill"
            )
