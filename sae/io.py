"""SAE files: greylens's `cfg.json` + `sae.safetensors`, and the SAELens on-disk layout.

greylens layout (one directory per hook):
    cfg.json          SAEConfig as JSON (format_version, arch, k, input_scale, hook, model, ...)
    sae.safetensors   W_enc [n, d], b_enc [n], W_dec [n, d], b_dec [d], threshold [],
                      (log_threshold [n])

SAELens layout:
    cfg.json                 {"architecture": "topk" | "jumprelu" | "standard", "d_in", "d_sae",
                              "hook_name", "model_name", "k", "normalize_activations": "none", ...}
    sae_weights.safetensors  W_enc [d, n], b_enc [n], W_dec [n, d], b_dec [d], (threshold [n])
    README.md                how to load it, and the passthrough rule when there is one

SAELens has no input scale, so export folds it into the weights: with s = input_scale,
pre = (x·s − b) W_encᵀ + c = (x − b/s)(s·W_enc)ᵀ + c and x̂ = (a W_dec + b)/s, i.e.
W_enc' = s·W_enc, b_dec' = b/s, W_dec' = W_dec/s — the exported SAE computes the same code and
reconstruction on raw activations. (Import keeps the unit-norm-free decoder as is, with
input_scale 1.)
SAELens has no inference class for BatchTopK: like SAELens itself, we export batchtopk and
matryoshka as `jumprelu` with the learned threshold θ for every latent (the same rule, pre > θ),
and import restores the original arch from our metadata.
SAELens has no passthrough either: rows above `max_input_norm` (massive activations) would be
encoded by SAELens. The limit goes where SAELens users see it — `cfg.json`'s `metadata` (SAELens
keeps every key there: `sae.cfg.metadata.greylens_max_input_norm`) and the README — and
`metadata.greylens_cfg` holds the whole greylens config, so `import_saelens` restores the limit
(and k, matryoshka groups, weights hash, ...) exactly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sae.sae import SAE, SAEConfig

SAE_FILE, CFG_FILE = "sae.safetensors", "cfg.json"
SAELENS_FILE, README_FILE = "sae_weights.safetensors", "README.md"


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
    """Write the SAE in SAELens's layout (input scale folded into the weights) and a README.md.

    SAELens has no passthrough rule: a `max_input_norm` is written to cfg.json's `metadata` (which
    SAELens keeps: `sae.cfg.metadata.greylens_max_input_norm`) and to the README, with the one
    line that applies it. The full greylens config goes to `metadata.greylens_cfg`, so
    `import_saelens` gives back the same SAE (rows above the limit pass through again)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu() for k, v in _saelens_tensors(sae).items()}, directory / SAELENS_FILE)
    arch = _TO_SAELENS_ARCH[sae.cfg.arch]
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
            # SAELens 6 reads metadata as written only from a 6.x layout (older ones: rebuilt
            # from a fixed key list, which would drop the passthrough limit)
            "sae_lens_version": "6.0.0",
            "greylens_arch": sae.cfg.arch,
            "greylens_input_scale": sae.cfg.input_scale,
            "greylens_max_input_norm": sae.cfg.max_input_norm,
            "greylens_passthrough": _passthrough_note(sae.cfg.max_input_norm),
            "greylens_cfg": asdict(sae.cfg),
            "model_name": sae.cfg.model,
            "hook_name": sae.cfg.hook,
        },
    }
    if arch == "topk":
        cfg["k"] = sae.cfg.k
    (directory / CFG_FILE).write_text(json.dumps(cfg, indent=2))
    (directory / README_FILE).write_text(saelens_readme(sae.cfg, arch))
    return directory


def _saelens_tensors(sae: SAE) -> dict[str, torch.Tensor]:
    """SAELens's weights: W_enc transposed, the input scale s folded in (see the module doc)."""
    s = sae.cfg.input_scale
    tensors = {
        "W_enc": (sae.W_enc.detach() * s).T.contiguous(),  # [d_in, d_sae]
        "b_enc": sae.b_enc.detach().clone(),  # [d_sae]
        "W_dec": (sae.W_dec.detach() / s).contiguous(),  # [d_sae, d_in]
        "b_dec": (sae.b_dec.detach() / s).contiguous(),  # [d_in]
    }
    if sae.cfg.arch == "jumprelu":
        tensors["threshold"] = sae.log_threshold.detach().exp()  # [d_sae]
    elif _TO_SAELENS_ARCH[sae.cfg.arch] == "jumprelu":  # batchtopk / matryoshka: one learned θ
        tensors["threshold"] = sae.threshold.detach().expand(sae.cfg.n_latents).clone()
    return tensors


def _passthrough_note(max_input_norm: float) -> str:
    if max_input_norm <= 0:
        return "none: every row is encoded"
    return (
        f"rows x with ||x||_2 > {max_input_norm:.9g} (massive activations) get no code and pass "
        "through unchanged; SAELens does not apply this: use "
        "torch.where(x.norm(dim=-1, keepdim=True) > limit, x, sae(x)) and zero their codes"
    )


def saelens_readme(cfg: SAEConfig, arch: str) -> str:
    """README.md of a SAELens export: what it is, how to load it, and the passthrough rule."""
    lines = [
        f"# greylens SAE for `{cfg.model}` at `{cfg.hook}`",
        "",
        f"A greylens `{cfg.arch}` SAE ({cfg.d_in} → {cfg.n_latents}) in SAELens's layout, loaded "
        f"as SAELens architecture `{arch}`: `sae_lens.SAE.load_from_disk(this_directory)`. "
        "greylens reads it back with `sae.io.import_saelens(this_directory)`.",
        "",
        "## Passthrough rows (massive activations)",
        "",
    ]
    if cfg.max_input_norm <= 0:
        return "\n".join([*lines, "None: this SAE encodes every row.", ""])
    limit = f"{cfg.max_input_norm:.9g}"
    return "\n".join(
        [
            *lines,
            f"**This SAE passes rows whose L2 norm exceeds {limit} through unchanged.** Such rows "
            "(attention sinks, typically the first tokens) were left out of training; greylens "
            "gives them no code and returns them as they are. SAELens has no such rule, so "
            "`SAE.load_from_disk` encodes and reconstructs them (badly). Apply it yourself; the "
            "limit is in `sae.cfg.metadata.greylens_max_input_norm`:",
            "",
            "```python",
            "limit = sae.cfg.metadata.greylens_max_input_norm",
            "massive = x.norm(dim=-1, keepdim=True) > limit  # [..., 1]",
            "acts = sae.encode(x) * ~massive",
            "recons = torch.where(massive, x, sae.decode(acts))",
            "```",
            "",
        ]
    )


_FROM_SAELENS_ARCH = {"topk": "topk", "jumprelu": "jumprelu", "standard": "relu"}


def import_saelens(directory: str | Path) -> SAE:
    """Load an SAE saved in SAELens's layout (standard, topk, jumprelu; greylens's batchtopk and
    matryoshka exports come back as themselves, with their passthrough limit)."""
    directory = Path(directory)
    raw = json.loads((directory / CFG_FILE).read_text())
    _check_importable(raw)
    weights = load_file(directory / SAELENS_FILE)
    sae = SAE(_imported_config(raw))
    with torch.no_grad():
        sae.W_enc.copy_(weights["W_enc"].T)
        sae.b_enc.copy_(weights["b_enc"])
        sae.W_dec.copy_(weights["W_dec"])
        sae.b_dec.copy_(weights["b_dec"])
        if sae.cfg.arch == "jumprelu":
            sae.log_threshold.copy_(weights["threshold"].clamp_min(1e-12).log())
        elif sae.cfg.arch in ("batchtopk", "matryoshka"):
            sae.threshold.copy_(weights["threshold"][0])
    return sae


def _check_importable(raw: dict) -> None:
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


def _imported_config(raw: dict) -> SAEConfig:
    """Our own export: its saved config, the input scale now folded into the weights. Any other
    SAELens SAE: what its cfg.json says."""
    meta = raw.get("metadata") or {}
    ours = meta.get("greylens_cfg")
    if ours is not None:
        unknown = set(ours) - {f.name for f in fields(SAEConfig)}
        if unknown:
            raise ValueError(
                f"cfg.json's metadata.greylens_cfg has fields this greylens does not know "
                f"({', '.join(sorted(unknown))}): it was written by a newer greylens; upgrade"
            )
        cfg = SAEConfig(**{**ours, "input_scale": 1.0})
        if (cfg.d_in, cfg.n_latents) != (raw["d_in"], raw["d_sae"]):
            raise ValueError(
                f"cfg.json's metadata.greylens_cfg is {cfg.d_in}→{cfg.n_latents} but the SAE is "
                f"{raw['d_in']}→{raw['d_sae']}: the metadata belongs to another SAE; delete it"
            )
        return cfg
    arch = raw.get("architecture", "standard")
    restored = meta.get("greylens_arch")  # exports from before greylens_cfg was written
    if not (arch == "jumprelu" and restored in ("batchtopk", "matryoshka")):
        restored = _FROM_SAELENS_ARCH[arch]
    return SAEConfig(
        d_in=raw["d_in"],
        n_latents=raw["d_sae"],
        arch=restored,
        k=raw.get("k") or min(32, raw["d_sae"]),
        hook=raw.get("hook_name") or meta.get("hook_name", ""),
        model=raw.get("model_name") or meta.get("model_name", ""),
        max_input_norm=float(meta.get("greylens_max_input_norm") or 0.0),
    )
