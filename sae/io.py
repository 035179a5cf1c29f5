"""SAE files: greylens's `cfg.json` + `sae.safetensors`, and the SAELens on-disk layout.

greylens layout (one directory per hook):
    cfg.json          SAEConfig as JSON (format_version, arch, k, input_scale, hook, model, ...)
    sae.safetensors   W_enc [n, d], b_enc [n], W_dec [n, d], b_dec [d], threshold [],
                      (log_threshold [n])

SAELens layout:
    cfg.json                 {"architecture": "topk" | "jumprelu" | "standard", "d_in", "d_sae",
                              "hook_name", "model_name", "k", "normalize_activations": "none", ...}
    sae_weights.safetensors  W_enc [d, n], b_enc [n], W_dec [n, d], b_dec [d], (threshold [n])

SAELens has no input scale, so export folds it into the weights: with s = input_scale,
pre = (x·s − b) W_encᵀ + c = (x − b/s)(s·W_enc)ᵀ + c and x̂ = (a W_dec + b)/s, i.e.
W_enc' = s·W_enc, b_dec' = b/s, W_dec' = W_dec/s — the exported SAE computes the same code and
reconstruction on raw activations. (Import keeps the unit-norm-free decoder as is, with
input_scale 1.)
SAELens has no inference class for BatchTopK: like SAELens itself, we export batchtopk and
matryoshka as `jumprelu` with the learned threshold θ for every latent (the same rule, pre > θ),
and import restores the original arch from our metadata.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sae.sae import SAE, SAEConfig

SAE_FILE, CFG_FILE = "sae.safetensors", "cfg.json"
SAELENS_FILE = "sae_weights.safetensors"


def save_sae(sae: SAE, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    save_file(tensors, directory / f".{SAE_FILE}.tmp")
    (directory / f".{SAE_FILE}.tmp").replace(directory / SAE_FILE)
    (directory / CFG_FILE).write_text(json.dumps(asdict(sae.cfg), indent=2))
    return directory


def load_sae(directory: str | Path, device: str | torch.device = "cpu") -> SAE:
    directory = Path(directory)
    if not (directory / SAE_FILE).exists():
        hint = (
            " (this looks like a SAELens export: use import_saelens)"
            if (directory / SAELENS_FILE).exists()
            else ""
        )
        raise FileNotFoundError(f"{directory} holds no {SAE_FILE}{hint}")
    raw = json.loads((directory / CFG_FILE).read_text())
    if raw.get("format_version") != 1:
        raise ValueError(
            f"{directory / CFG_FILE} has format_version {raw.get('format_version')}, expected 1"
        )
    sae = SAE(SAEConfig(**raw))
    sae.load_state_dict(load_file(directory / SAE_FILE))
    return sae.to(device)


_TO_SAELENS_ARCH = {
    "topk": "topk",
    "batchtopk": "jumprelu",
    "matryoshka": "jumprelu",
    "jumprelu": "jumprelu",
    "relu": "standard",
}


def export_saelens(sae: SAE, directory: str | Path) -> Path:
    """Write the SAE in SAELens's layout (input scale folded into the weights)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    s = sae.cfg.input_scale
    tensors = {
        "W_enc": (sae.W_enc.detach() * s).T.contiguous(),  # [d_in, d_sae]
        "b_enc": sae.b_enc.detach().clone(),
        "W_dec": (sae.W_dec.detach() / s).contiguous(),  # [d_sae, d_in]
        "b_dec": (sae.b_dec.detach() / s).contiguous(),
    }
    arch = _TO_SAELENS_ARCH[sae.cfg.arch]
    if sae.cfg.arch == "jumprelu":
        tensors["threshold"] = sae.log_threshold.detach().exp()
    elif arch == "jumprelu":  # batchtopk / matryoshka: one learned θ for every latent
        tensors["threshold"] = sae.threshold.detach().expand(sae.cfg.n_latents).clone()
    save_file({k: v.cpu() for k, v in tensors.items()}, directory / SAELENS_FILE)
    cfg = {
        "architecture": arch,
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.n_latents,
        "dtype": "float32",
        "device": "cpu",
        "hook_name": sae.cfg.hook,
        "hook_head_index": None,
        "model_name": sae.cfg.model,
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "greylens_arch": sae.cfg.arch,
            "greylens_input_scale": s,
            "model_name": sae.cfg.model,
            "hook_name": sae.cfg.hook,
        },
    }
    if arch == "topk":
        cfg["k"] = sae.cfg.k
    (directory / CFG_FILE).write_text(json.dumps(cfg, indent=2))
    return directory


_FROM_SAELENS_ARCH = {"topk": "topk", "jumprelu": "jumprelu", "standard": "relu"}


def import_saelens(directory: str | Path) -> SAE:
    """Load an SAE saved in SAELens's layout (standard, topk, batchtopk, jumprelu)."""
    directory = Path(directory)
    raw = json.loads((directory / CFG_FILE).read_text())
    arch = raw.get("architecture", "standard")
    if arch not in _FROM_SAELENS_ARCH:
        raise ValueError(
            f"can't import SAELens architecture {arch!r}; "
            f"supported: {', '.join(_FROM_SAELENS_ARCH)}"
        )
    if raw.get("normalize_activations", "none") not in ("none", None):
        raise ValueError(
            f"SAELens normalize_activations={raw['normalize_activations']!r} is not supported; "
            "fold it first"
        )
    if not raw.get("apply_b_dec_to_input", True):
        raise ValueError("SAELens SAEs with apply_b_dec_to_input=False are not supported")
    weights = load_file(directory / SAELENS_FILE)
    ours = raw.get("metadata", {}).get(
        "greylens_arch"
    )  # our batchtopk/matryoshka exported as jumprelu
    restored = (
        ours
        if arch == "jumprelu" and ours in ("batchtopk", "matryoshka")
        else _FROM_SAELENS_ARCH[arch]
    )
    cfg = SAEConfig(
        d_in=raw["d_in"],
        n_latents=raw["d_sae"],
        arch=restored,
        k=raw.get("k") or 32,
        hook=raw.get("hook_name") or raw.get("metadata", {}).get("hook_name", ""),
        model=raw.get("model_name") or raw.get("metadata", {}).get("model_name", ""),
    )
    sae = SAE(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(weights["W_enc"].T)
        sae.b_enc.copy_(weights["b_enc"])
        sae.W_dec.copy_(weights["W_dec"])
        sae.b_dec.copy_(weights["b_dec"])
        if cfg.arch == "jumprelu":
            sae.log_threshold.copy_(weights["threshold"].clamp_min(1e-12).log())
        elif cfg.arch in ("batchtopk", "matryoshka"):
            sae.threshold.copy_(weights["threshold"][0])
    return sae
