"""Hook-point naming: TransformerLens names everywhere (`blocks.{L}.hook_resid_post`, ...)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from sae.families import BLOCK_POINTS
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
    check_family_points(model, hooks)
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


def check_family_points(model: LoadedModel, hooks: list[str]) -> None:
    """Refuse block points the model's family lacks (hook_resid_mid of a parallel-residual one)."""
    family = model.family
    points = family.hook_points(model.fast.config)
    for name in hooks:
        point = fast_point(name)
        if point and point not in points:
            raise ValueError(
                f"{model.name} ({family.name}) runs attention and MLP in parallel from the same "
                f"input, so it has no {point} (asked for {name!r}); use one of {', '.join(points)}"
            )


def stop_layer(hooks: list[str], n_layers: int) -> int | None:
    """The `stop_at_layer` that runs just far enough to reach every hook (None: the full model)."""
    layers = [hook_layer(h) for h in hooks]
    if any(layer is None for layer in layers):
        return None  # a hook after the blocks (ln_final, unembed) needs the whole forward
    deepest = max(layers) + 1
    return None if deepest >= n_layers else deepest


# --------------------------------------------------------------------------- capture

# Hook points the fast path reads straight off plain HF modules (through the model's `Family`
# entry); anything else goes to the bridge.
_FAST_POINTS = BLOCK_POINTS


class _StopForward(Exception):
    """Raised by the deepest hook: the rest of the model is never computed."""


def fast_point(name: str) -> str | None:
    """The block point of a fast-path hook name (`blocks.3.mlp.hook_in` -> `mlp.hook_in`), else
    None."""
    layer = hook_layer(name)
    point = name.split(".", 2)[2] if layer is not None else ""
    return point if point in _FAST_POINTS else None


@torch.inference_mode()
def capture(model: LoadedModel, tokens: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor]:
    """Activations at `hooks` for tokens [batch, seq], computing no block past the deepest hook.

    The fast path (plain HF modules sharing the bridge's weights, found through the model's
    `Family` entry) serves every block point of `BLOCK_POINTS` (resid_pre/mid/post, attn_out,
    mlp.hook_in, mlp_out); any other TransformerLens name runs through the bridge.
    Both give identical values (tested). Returns {hook: [batch, seq, d_model] float32}.
    """
    tokens = tokens.to(model.device)
    if all(fast_point(h) for h in hooks):
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
            model.fast.base_model(tokens, use_cache=False)
        except _StopForward:
            pass
        return latest()


@contextmanager
def recording(
    model: LoadedModel, hooks: list[str], stop: bool = False
) -> Iterator[Callable[[], dict]]:
    """Record fast-path hook points (`BLOCK_POINTS`) of forwards of `model.fast`.

    Yields a function that returns {hook: [batch, seq, d_model]} of the latest forward. With
    stop=True the forward raises `_StopForward` right after the deepest hook (the caller catches
    it), so no later block is computed. Used by `capture` and by generation loops that read
    activations token by token (probes.Lens.monitor).
    """
    unsupported = [h for h in hooks if not fast_point(h)]
    if unsupported:
        raise ValueError(
            f"hook points {unsupported} are not fast-path points of a block; "
            f"use one of {', '.join(_FAST_POINTS)} (e.g. blocks.3.hook_resid_post)"
        )
    check_family_points(model, hooks)
    family, blocks = model.family, model.family.blocks(model.fast)
    deepest = max(hook_layer(h) for h in hooks)
    seen: dict[tuple[int, str], torch.Tensor] = {}

    def latest() -> dict[str, torch.Tensor]:
        out = {}
        for h in hooks:
            layer, point = hook_layer(h), fast_point(h)
            if point == "hook_resid_mid":  # the residual between attention and MLP
                out[h] = seen[(layer, "hook_resid_pre")] + seen[(layer, "hook_attn_out")]
            else:
                out[h] = seen[(layer, point)]
        return out

    handles = []
    for layer in sorted({hook_layer(h) for h in hooks}):
        block = blocks[layer]
        on_input = _keeper(seen, layer, "hook_resid_pre", inputs=True)
        handles.append(block.register_forward_pre_hook(on_input, with_kwargs=True))
        for point in ("hook_attn_out", "hook_mlp_out"):
            module = family.point_module(block, point)
            handles.append(module.register_forward_hook(_keeper(seen, layer, point)))
        mlp_in = _keeper(seen, layer, "mlp.hook_in", inputs=True)
        handles.append(
            family.point_module(block, "mlp.hook_in").register_forward_pre_hook(
                mlp_in, with_kwargs=True
            )
        )
        on_output = _keeper(seen, layer, "hook_resid_post", stop=stop and layer == deepest)
        handles.append(block.register_forward_hook(on_output))
    try:
        yield latest
    finally:
        for handle in handles:
            handle.remove()


def _keeper(
    seen: dict[tuple[int, str], torch.Tensor],
    layer: int,
    point: str,
    inputs: bool = False,
    stop: bool = False,
) -> Callable:
    """A forward hook storing a module's first output (or, inputs=True, a pre-hook with kwargs
    storing its first input) as seen[(layer, point)]; stop=True then ends the forward."""

    def hook(module, args, kwargs_or_output, *rest):
        if inputs:  # pre-hook with kwargs: (module, args, kwargs)
            value = args[0] if args else next(iter(kwargs_or_output.values()))
        else:
            output = rest[0] if rest else kwargs_or_output
            value = output[0] if isinstance(output, tuple) else output
        seen[(layer, point)] = value
        if stop:
            raise _StopForward

    return hook


@contextmanager
def editing(
    model: LoadedModel, hook: str, edit: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """During forwards of `model.fast`, replace the activation at fast-path `hook` by
    edit(activation) [batch, seq, d_model]; everything downstream sees the edited value.

    This is what splicing an SAE means. (The TransformerLens 4 bridge's `hook_resid_mid` only
    feeds the MLP's input: an edit there never reaches the residual stream that goes on to
    hook_resid_post. Here hook_resid_mid is edited where it is the residual: attention's
    contribution becomes edit(resid_pre + attn_out) - resid_pre.)
    """
    point = fast_point(hook)
    if point is None:
        raise ValueError(f"{hook!r} is not a fast-path point; use one of {', '.join(BLOCK_POINTS)}")
    check_family_points(model, [hook])
    family = model.family
    block = family.blocks(model.fast)[hook_layer(hook)]
    before: dict[str, torch.Tensor] = {}

    def on_input(module, args, kwargs):
        if args:
            return (edit(args[0]), *args[1:]), kwargs
        first = next(iter(kwargs))
        return args, {**kwargs, first: edit(kwargs[first])}

    def keep_input(module, args, kwargs):
        before["resid_pre"] = args[0] if args else next(iter(kwargs.values()))

    def on_output(module, args, output):
        value = output[0] if isinstance(output, tuple) else output
        if point == "hook_resid_mid":
            value = edit(before["resid_pre"] + value) - before["resid_pre"]
        else:
            value = edit(value)
        return (value, *output[1:]) if isinstance(output, tuple) else value

    handles = []
    if point in ("hook_resid_pre", "mlp.hook_in"):
        module = block if point == "hook_resid_pre" else family.point_module(block, point)
        handles.append(module.register_forward_pre_hook(on_input, with_kwargs=True))
    elif point == "hook_resid_post":
        handles.append(block.register_forward_hook(on_output))
    else:
        if point == "hook_resid_mid":
            handles.append(block.register_forward_pre_hook(keep_input, with_kwargs=True))
        module = family.point_module(block, "hook_attn_out" if point == "hook_resid_mid" else point)
        handles.append(module.register_forward_hook(on_output))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
