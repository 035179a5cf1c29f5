"""Hook-point naming: TransformerLens names everywhere (`blocks.{L}.hook_resid_post`, ...)."""

from __future__ import annotations

import difflib
import re

from sae.models import LoadedModel

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def hook_layer(name: str) -> int | None:
    """The block a hook point lives in, or None for hooks outside the blocks (embed, ln_final)."""
    match = _BLOCK.match(name)
    return int(match.group(1)) if match else None


def parse_hooks(hooks: str | list[str] | tuple[str, ...]) -> list[str]:
    """Accept `"a,b"` (the command line form) or a list; strip blanks, keep order, drop repeats."""
    items = hooks.split(",") if isinstance(hooks, str) else list(hooks)
    names = list(dict.fromkeys(h.strip() for h in items if h.strip()))
    if not names:
        raise ValueError("no hook names given; e.g. --hooks blocks.15.hook_resid_post")
    return names


def validate_hooks(model: LoadedModel, hooks: list[str]) -> None:
    """Raise before any work if a hook name is not one of the model's hook points."""
    valid = list(model.bridge.hook_dict.keys())
    for name in hooks:
        if name in model.bridge.hook_dict:
            continue
        close = difflib.get_close_matches(name, valid, n=5, cutoff=0.5)
        hint = f"closest valid names: {', '.join(close)}" if close else f"e.g. {valid[:3]}"
        layer = hook_layer(name)
        if layer is not None and layer >= model.n_layers:
            hint = f"{model.name} has layers 0..{model.n_layers - 1}; {hint}"
        raise ValueError(f"unknown hook point {name!r} for model {model.name}; {hint}")


def stop_layer(hooks: list[str], n_layers: int) -> int | None:
    """The `stop_at_layer` that runs just far enough to reach every hook (None: the full model)."""
    layers = [hook_layer(h) for h in hooks]
    if any(layer is None for layer in layers):
        return None  # a hook after the blocks (ln_final, unembed) needs the whole forward
    deepest = max(layers) + 1
    return None if deepest >= n_layers else deepest
