"""Model loading: any decoder-only model named by a model spec (sae.spec), on any device.

Each comes back as a `LoadedModel`: the raw HF `*ForCausalLM` (raw weights, no LayerNorm folding
or centering) in the compute dtype on the chosen device, the TransformerLens 4 `TransformerBridge`
around it (so TransformerLens hook names work), the tokenizer, its `Family` (sae.families), a
sha256 that identifies the weights and, for hub models, the cached revision. `identity()` is the
record every artefact stores (sae.identity checks it). The hub is only used for a hub id, and only
when online: greylens sets HF_HUB_OFFLINE=1 unless the user set it.
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# greylens reads hub models from the local cache only, unless the user says otherwise; say so
# before transformers is imported, so a missing file fails at once instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from sae.device import check_fits, dtype_name, resolve_device, resolve_dtype  # noqa: E402
from sae.families import Family, family_of  # noqa: E402
from sae.spec import EMBEDDED, ModelSource, resolve_spec  # noqa: E402
from sae.tiny import TINY_NAMES, build_tiny  # noqa: E402
from sae.weights import (  # noqa: E402, F401  (cache_root, sha256_file: re-exported)
    SMOLLM2_INSTALL,
    cache_root,
    converted_gguf,
    sha256_file,
    smollm2_gguf_path,
    weights_sha256_of,
)

MODEL_NAMES: tuple[str, ...] = (*TINY_NAMES, EMBEDDED)  # the built-in names (specs need no file)

DeviceMap = str | dict[str, Any] | None


@dataclass
class LoadedModel:
    """A decoder-only model ready for hooks.

    `bridge` (TransformerLens 4) wraps `hf` in place and gives every TransformerLens hook name.
    `fast` is a second, unwrapped module tree over the very same parameter tensors (no copy): plain
    HF modules run faster than bridge-wrapped ones, so harvesting uses it for the common
    residual hooks (see sae.harvest) and checks it against the bridge in the tests.
    """

    name: str  # the model spec it was loaded from
    hf: PreTrainedModel
    bridge: object  # transformer_lens.model_bridge.TransformerBridge (imported lazily: slow import)
    tokenizer: PreTrainedTokenizerBase
    weights_sha256: str
    fast: PreTrainedModel
    revision: str = ""  # hub commit of the cached snapshot ("" when not from the hub)

    @property
    def family(self) -> Family:
        return family_of(self.hf.config)

    @property
    def n_layers(self) -> int:
        return self.hf.config.num_hidden_layers

    @property
    def d_model(self) -> int:
        return self.hf.config.hidden_size

    @property
    def n_ctx(self) -> int:
        return self.hf.config.max_position_embeddings

    @property
    def bos_token_id(self) -> int:
        return int(self.tokenizer.bos_token_id)

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    def identity(self) -> dict:
        """The `model` record every artefact keeps (store manifest, SAE cfg, probe, release)."""
        return {
            "spec": self.name,
            "family": self.family.name,
            "revision": self.revision,
            "weights_sha256": self.weights_sha256,
            "dtype": dtype_name(self.dtype),
        }


def load_model(
    spec: str = EMBEDDED,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    device_map: DeviceMap = None,
) -> LoadedModel:
    """Load a model by spec (see sae.spec) in the compute `dtype` on `device`.

    device: cpu, cuda, cuda:N or auto; dtype: auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16,
    float16. device_map (accelerate, e.g. "auto") spreads a model that does not fit one device over
    several; without it a model too large for the device's free memory is refused before loading.
    """
    source = resolve_spec(spec)  # a bad spec fails here, before anything is loaded
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if source.kind == "tiny":
        if device_map is not None:
            raise ValueError(
                f"device_map is for models loaded from files; {spec} is built in code and fits "
                "any one device: pass device= instead"
            )
        hf, tokenizer, sha = build_tiny(spec)
        check_fits(hf.config, torch_dtype, torch_device, spec)
        hf = hf.to(torch_device, torch_dtype)
    else:
        directory, sha = _weights_directory(source)
        hf, tokenizer = _load_hf_directory(directory, spec, torch_device, torch_dtype, device_map)
    hf = hf.eval().requires_grad_(False)
    _ensure_bos(tokenizer, family_of(hf.config), spec)
    fast = _sharing_copy(hf)  # before the bridge wraps hf's modules
    bridge = _boot_bridge(spec, hf, tokenizer)
    return LoadedModel(spec, hf, bridge, tokenizer, sha, fast, revision=source.revision)


def _weights_directory(source: ModelSource) -> tuple[Path, str]:
    """(HF safetensors directory, weights sha256) of a file-backed spec."""
    if source.kind == "embedded":
        return converted_gguf(smollm2_gguf_path(), prefix=EMBEDDED)
    if source.kind == "gguf":
        return converted_gguf(source.path, prefix=source.path.stem)
    return source.path, weights_sha256_of(source.path)


def _load_hf_directory(
    directory: Path,
    spec: str,
    device: torch.device,
    dtype: torch.dtype,
    device_map: DeviceMap,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model + tokenizer of an HF directory; the family and memory checks come before the
    weights are read."""
    config = AutoConfig.from_pretrained(directory)
    family_of(config)  # an unsupported architecture fails before loading its weights
    if device_map is None:
        check_fits(config, dtype, device, spec)
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, device_map=device_map)
    if device_map is None:
        hf = hf.to(device)
    return hf, AutoTokenizer.from_pretrained(directory)


def _ensure_bos(tokenizer: PreTrainedTokenizerBase, family: Family, spec: str) -> None:
    """Every window starts with BOS; a tokenizer without one uses the family's fallback token."""
    if tokenizer.bos_token_id is not None:
        return
    fallback = family.bos_fallback
    if fallback is None or fallback not in tokenizer.get_vocab():
        why = "names no fallback" if fallback is None else f"fallback {fallback!r} is not in it"
        raise ValueError(
            f"the tokenizer of {spec} has no BOS token and the {family.name} family's {why}; set "
            f'one before saving (`tokenizer.bos_token = "<token>"`) or set `bos_fallback=` in '
            "its Family entry in sae/families.py"
        )
    tokenizer.bos_token = fallback


def _sharing_copy(hf: PreTrainedModel) -> PreTrainedModel:
    """A new model of hf's class whose parameters and buffers ARE hf's tensors (no copy)."""
    config = copy.deepcopy(hf.config)  # the bridge edits hf.config in place; keep ours apart
    # At harvest shapes (8 x 128) eager attention is faster than SDPA on CPU.
    if hf.device.type == "cpu":
        config._attn_implementation = "eager"
    with torch.device("meta"):
        twin = type(hf)(config)
    twin.load_state_dict(hf.state_dict(), assign=True, strict=True)
    for name, buffer in hf.named_buffers():  # non-persistent buffers (RoPE) are not in state_dict
        module_name, _, attribute = name.rpartition(".")
        twin.get_submodule(module_name)._buffers[attribute] = buffer
    twin.tie_weights()
    device_map = getattr(hf, "hf_device_map", None)
    if device_map and len(set(device_map.values())) > 1:
        # Spread over devices: the twin needs accelerate's hooks that move activations between
        # them, as hf has.
        from accelerate import dispatch_model

        twin = dispatch_model(twin, device_map=device_map)
    return twin.eval().requires_grad_(False)


def _boot_bridge(name: str, hf: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> object:
    # imported here: TransformerLens is slow to import, and only booting a model needs it
    from transformer_lens.model_bridge import TransformerBridge

    # The bridge reuses hf.config (no hub call) and keeps our tokenizer as is because it already
    # prepends BOS. Raw weights: the bridge does not fold LayerNorm unless asked to. It casts the
    # model to `dtype`, so pass the one hf already has.
    dtype = next(hf.parameters()).dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformerBridge.boot_transformers(
            name, hf_model=hf, tokenizer=tokenizer, dtype=dtype
        )
