"""Hook-point naming: TransformerLens names everywhere (`blocks.{L}.hook_resid_post`, ...)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

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


# --------------------------------------------------------------------------- capture

# Hook points the fast path reads straight off plain HF modules; anything else goes to the bridge.
_FAST_POINTS = (
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
)


class _StopForward(Exception):
    """Raised by the deepest hook: the rest of the model is never computed."""


def _fast_point(name: str) -> str | None:
    layer = hook_layer(name)
    point = name.split(".", 2)[2] if layer is not None else ""
    return point if point in _FAST_POINTS else None


@torch.inference_mode()
def capture(model: LoadedModel, tokens: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor]:
    """Activations at `hooks` for tokens [batch, seq], computing no block past the deepest hook.

    The fast path (plain HF modules sharing the bridge's weights) serves the residual-stream,
    attention-out and MLP-out points; any other TransformerLens name runs through the bridge.
    Both give identical values (tested). Returns {hook: [batch, seq, d_model] float32}.
    """
    tokens = tokens.to(model.device)
    if all(_fast_point(h) for h in hooks):
        return _capture_fast(model, tokens, hooks)
    _, cache = model.bridge.run_with_cache(
        tokens,
        names_filter=hooks,
        stop_at_layer=stop_layer(hooks, model.n_layers),
        return_cache_object=False,
    )
    return {h: cache[h] for h in hooks}


def _capture_fast(
    model: LoadedModel, tokens: torch.Tensor, hooks: list[str]
) -> dict[str, torch.Tensor]:
    with recording(model, hooks, stop=True) as latest:
        try:
            model.fast.model(tokens, use_cache=False)
        except _StopForward:
            pass
        return latest()


@contextmanager
def recording(
    model: LoadedModel, hooks: list[str], stop: bool = False
) -> Iterator[Callable[[], dict]]:
    """Record fast-path hook points (residual, attention-out, MLP-out) of forwards of `model.fast`.

    Yields a function that returns {hook: [batch, seq, d_model]} of the latest forward. With
    stop=True the forward raises `_StopForward` right after the deepest hook (the caller catches
    it), so no later block is computed. Used by `capture` and by generation loops that read
    activations token by token (probes.Lens.monitor).
    """
    unsupported = [h for h in hooks if not _fast_point(h)]
    if unsupported:
        raise ValueError(
            f"hook points {unsupported} are not residual/attn_out/mlp_out points of a block; "
            f"use one of {', '.join(_FAST_POINTS)} (e.g. blocks.3.hook_resid_post)"
        )
    layers = model.fast.model.layers
    deepest = max(hook_layer(h) for h in hooks)
    seen: dict[tuple[int, str], torch.Tensor] = {}

    def keep(layer: int, point: str, stop_here: bool = False):
        def hook(module, args, kwargs_or_output, *rest):
            if point == "hook_resid_pre":  # a pre-hook with kwargs: (module, args, kwargs)
                value = args[0] if args else kwargs_or_output["hidden_states"]
            else:
                output = rest[0] if rest else kwargs_or_output
                value = output[0] if isinstance(output, tuple) else output
            seen[(layer, point)] = value
            if stop_here:
                raise _StopForward

        return hook

    def latest() -> dict[str, torch.Tensor]:
        out = {}
        for h in hooks:
            layer, point = hook_layer(h), _fast_point(h)
            if point == "hook_resid_mid":  # the residual between attention and MLP
                out[h] = seen[(layer, "hook_resid_pre")] + seen[(layer, "hook_attn_out")]
            else:
                out[h] = seen[(layer, point)]
        return out

    handles = []
    for layer in sorted({hook_layer(h) for h in hooks}):
        block = layers[layer]
        handles.append(
            block.register_forward_pre_hook(keep(layer, "hook_resid_pre"), with_kwargs=True)
        )
        handles.append(block.self_attn.register_forward_hook(keep(layer, "hook_attn_out")))
        handles.append(block.mlp.register_forward_hook(keep(layer, "hook_mlp_out")))
        handles.append(
            block.register_forward_hook(keep(layer, "hook_resid_post", stop and layer == deepest))
        )
    try:
        yield latest
    finally:
        for handle in handles:
            handle.remove()
