"""Reading what the greylens vLLM plugin wrote, from any environment (torch + safetensors).

    os.environ.update(plugin_env(["out/sae/blocks.15.hook_resid_post"], "/tmp/feats"))
    ... start vLLM in this environment, generate ...
    f = read_features("/tmp/feats", request_id)   # f.codes[hook] = (indices, values) [n, top_n]

This module is the contract between a caller and `serve_hooks.vllm_plugin`, which runs inside
vLLM's workers: the environment variables that switch the plugin on, and the per-request
safetensors file it writes to the sink (`computed`, `token_ids`, `indices.<hook>`,
`values.<hook>`; metadata `format_version`, `request_id`, `top_n`, `hooks`).
"""

from __future__ import annotations

import glob
import json
import os
import re
import time
from pathlib import Path
from typing import NamedTuple

from safetensors import safe_open
from torch import Tensor

ENV_SAES, ENV_SINK, ENV_TOP_N, ENV_PAGES = (
    "GREYLENS_VLLM_SAES",
    "GREYLENS_VLLM_SINK",
    "GREYLENS_VLLM_TOP_N",
    "GREYLENS_VLLM_PAGES",
)
FORMAT_VERSION = 1


class VLLMFeatures(NamedTuple):
    """One request's features: rows are positions 0..n-1 of prompt + generated tokens (the last
    excluded)."""

    request_id: str  # vLLM's internal id
    codes: dict[str, tuple[Tensor, Tensor]]  # hook -> (indices [n, top_n] int64, values [n, top_n])
    computed: Tensor  # [n] bool: False where no features exist (prefix-cached block without a page)
    token_ids: Tensor  # [n]

    @property
    def missing(self) -> list[int]:
        return (~self.computed).nonzero().flatten().tolist()


def plugin_env(
    saes: list[str | Path], sink: str | Path, top_n: int = 8, max_pages: int = 65536
) -> dict[str, str]:
    """Environment variables that switch the plugin on for a vLLM process started with them."""
    return {
        ENV_SAES: os.pathsep.join(str(s) for s in saes),
        ENV_SINK: str(sink),
        ENV_TOP_N: str(top_n),
        ENV_PAGES: str(max_pages),
    }


def read_features(
    sink: str | Path, request_id: str, timeout: float = 30.0, remove: bool = False
) -> VLLMFeatures:
    """Features of a finished request by the id vLLM returned (its internal id is `<id>-<8 chars>`).

    The worker writes a request's file when the request leaves the batch (the engine's next step),
    so this waits up to `timeout` seconds for it.
    """
    sink = Path(sink)
    deadline = time.monotonic() + timeout
    while True:
        found = [
            p
            for p in sink.glob(f"{glob.escape(request_id)}*.safetensors")
            if p.stem == request_id or re.fullmatch(re.escape(request_id) + r"-[^-]{8}", p.stem)
        ]
        if len(found) > 1:
            raise ValueError(
                f"several feature files match request {request_id!r}: {[p.name for p in found]}"
            )
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if not found:
        raise FileNotFoundError(
            f"no features for request {request_id!r} in {sink} after {timeout:.0f} s "
            f"(is the plugin on? {ENV_SAES}, {ENV_SINK} must be set for vLLM)"
        )
    with safe_open(str(found[0]), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        hooks = json.loads((f.metadata() or {})["hooks"])
    if remove:
        found[0].unlink()
    codes = {h: (tensors[f"indices.{h}"], tensors[f"values.{h}"]) for h in hooks}
    return VLLMFeatures(found[0].stem, codes, tensors["computed"], tensors["token_ids"])
