"""greylens SAE features inside vLLM (V1): a `vllm.general_plugins` entry point.

Install greylens in vLLM's environment without its dependencies (this file imports only torch,
safetensors and vLLM), point the plugin at SAEs and a sink directory, start vLLM as usual:

    pip install --no-deps /path/to/greylens            # registers the entry point below
    GREYLENS_VLLM_SAES=out/sae/blocks.15.hook_resid_post GREYLENS_VLLM_SINK=/tmp/feats \\
    GREYLENS_VLLM_TOP_N=8 vllm serve ...                # or LLM(...) in Python
    read_features("/tmp/feats", request_id)             # serve_hooks.vllm_features, anywhere

How it works (docs/vllm_plugin.md has the details). `register()` runs in every vLLM process; with
GREYLENS_VLLM_SAES set it registers the side-effectful custom op `greylens::tap` and wraps the
model runners' `load_model`, which then (before vLLM compiles the model) hooks each tapped decoder
layer, found per family by `serve_hooks.vllm_families`: the hook passes the layer's output — the
residual stream `blocks.L.hook_resid_post`, or Llama-style (hidden, residual) whose sum it is — to
the op, whose body encodes the rows. The wrapped `_prepare_inputs` records the step's batch
(req_ids, query_start_loc, num_computed_tokens, input ids), which maps the flattened rows to
(request, position); writes overwrite, so recompute leaves no duplicates. A request in the next
step's `finished_req_ids` is written to `<sink>/<internal id>.safetensors`.

Limits:
- Prefix cache: cached prefix tokens never run through the model. Every full KV block computed
  here gets a feature page keyed by the chain hash of its tokens; a prefix hit copies the pages.
  Positions without a page (evicted, GREYLENS_VLLM_PAGES=0, cached before start) have
  `computed` False: reported as missing, never zeros passed off as features.
- CUDA graphs replay without the op's Python body: refused unless --enforce-eager or piecewise
  graphs with `greylens::tap` in splitting_ops. torch.compile: fine (the op is in the graph; a hook
  added after start-up would not be). Async scheduling: refused (input ids lag). One worker;
  the families in `vllm_families.LAYER_PATHS`; no speculative decoding.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

# The caller's side of the contract (any environment); its names are importable from here too.
from serve_hooks.vllm_families import candidate_paths, decoder_layers, stream_parts
from serve_hooks.vllm_features import (
    ENV_PAGES,
    ENV_SAES,
    ENV_SINK,
    ENV_TOP_N,
    FORMAT_VERSION,
    VLLMFeatures,
    plugin_env,
    read_features,
)

__all__ = ["VLLMFeatures", "plugin_env", "read_features", "register"]
OP_NAME = "greylens::tap"


# --------------------------------------------------------------------------- SAE encode


class TapEncoder:
    """An SAE read from greylens's `cfg.json` + `sae.safetensors`, encode only (no greylens import).

    Same maths as `sae.SAE.encode` followed by the hook's dense top-n: x_n = x·input_scale,
    pre = (x_n − b_dec) W_encᵀ + b_enc, the arch's code rule, rows over max_input_norm get none.
    """

    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        if (directory / "graph.json").exists():
            raise ValueError(
                f"{directory} is a graph autoencoder; the vLLM plugin takes plain SAE "
                "directories (cfg.json + sae.safetensors): pass the per-hook SAE"
            )
        if not (directory / "cfg.json").exists() or not (directory / "sae.safetensors").exists():
            raise FileNotFoundError(
                f"{directory} is not a greylens SAE directory (cfg.json + sae.safetensors)"
            )
        self.cfg: dict[str, Any] = json.loads((directory / "cfg.json").read_text())
        if self.cfg.get("format_version") != 1:
            raise ValueError(
                f"{directory / 'cfg.json'} has format_version "
                f"{self.cfg.get('format_version')}, expected 1"
            )
        w = load_file(directory / "sae.safetensors")
        self.W_enc, self.b_enc, self.b_dec = w["W_enc"], w["b_enc"], w["b_dec"]  # [n, d], [n], [d]
        self.threshold = w["threshold"]  # [] batchtopk/matryoshka θ
        self.log_threshold = w.get("log_threshold")  # [n] jumprelu
        self.hook: str = self.cfg["hook"]
        self.n_latents: int = int(self.cfg["n_latents"])

    @torch.no_grad()
    def dense(self, x: Tensor) -> Tensor:  # x [N, d_in] raw -> [N, n_latents]
        pre = torch.addmm(
            self.b_enc, x.to(self.W_enc.dtype) * self.cfg["input_scale"] - self.b_dec, self.W_enc.T
        )
        arch = self.cfg["arch"]
        if arch == "topk":
            values, cols = pre.topk(int(self.cfg["k"]), dim=1, sorted=False)  # [N, k]
            acts = torch.zeros_like(pre).scatter_(1, cols, values.relu())
        elif arch in ("batchtopk", "matryoshka"):
            acts = pre * (pre > self.threshold)
        elif arch == "jumprelu":
            acts = pre * (pre > self.log_threshold.exp())
        else:
            acts = pre.relu()
        limit = float(self.cfg.get("max_input_norm", 0.0))
        if limit > 0:  # massive activations: no code (as SAE.passthrough)
            acts = acts.masked_fill((x.norm(dim=-1) > limit)[:, None], 0.0)
        return acts

    def top(self, x: Tensor, top_n: int) -> tuple[Tensor, Tensor]:  # -> indices, values [N, top_n]
        top = self.dense(x).topk(min(top_n, self.n_latents), dim=1)
        return top.indices, top.values


def layer_of(hook: str) -> int:
    """Decoder layer whose output is `hook` (resid_post of L = output of L; resid_pre of L = output
    of L-1)."""
    match = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(pre|post)", hook)
    if match is None or (match[2] == "pre" and match[1] == "0"):
        raise ValueError(
            f"the vLLM plugin taps decoder-layer outputs: blocks.L.hook_resid_post or "
            f"blocks.L.hook_resid_pre with L >= 1, got {hook!r}"
        )
    return int(match[1]) if match[2] == "post" else int(match[1]) - 1


# --------------------------------------------------------------------------- worker state


class RequestRows:
    """One request's per-position results (grown on demand); `seen` marks positions we hold."""

    def __init__(self, hooks: list[str], top_n: int) -> None:
        self.idx = {h: torch.zeros(0, top_n, dtype=torch.long) for h in hooks}  # [cap, top_n]
        self.val = {h: torch.zeros(0, top_n) for h in hooks}  # [cap, top_n]
        self.seen = torch.zeros(0, dtype=torch.bool)  # [cap]
        self.tokens = torch.zeros(0, dtype=torch.long)  # [cap]
        self.n = 0
        self.chain: list[bytes] = []  # hash of tokens [0, (i+1)·block_size) for committed blocks i

    def room(self, length: int) -> None:
        if self.seen.shape[0] >= length:
            return
        cap = max(length, 2 * self.seen.shape[0])
        grow = lambda t: torch.cat([t, t.new_zeros((cap - t.shape[0], *t.shape[1:]))])  # noqa: E731
        self.idx = {h: grow(t) for h, t in self.idx.items()}
        self.val = {h: grow(t) for h, t in self.val.items()}
        self.seen, self.tokens = grow(self.seen), grow(self.tokens)

    def block_hash(self, i: int, block_size: int) -> bytes:
        prev = self.chain[i - 1] if i else b"greylens"
        return hashlib.sha256(
            prev + self.tokens[i * block_size : (i + 1) * block_size].numpy().tobytes()
        ).digest()


class Tap:
    """Per-process state: encoders, the current step's batch, requests in flight, feature pages."""

    def __init__(self, sae_dirs: list[str], sink: Path, top_n: int, max_pages: int) -> None:
        self.encoders = [TapEncoder(d) for d in sae_dirs]
        self.hooks = [e.hook for e in self.encoders]
        self.layers = {layer_of(h) for h in self.hooks}
        self.sink, self.top_n, self.max_pages = sink, top_n, max_pages
        self.block_size = 0  # set at load_model
        self.step: tuple[list[str], list[int], list[int]] | None = None  # req_ids, qsl, starts
        self.requests: dict[str, RequestRows] = {}
        self.pages: OrderedDict[bytes, dict[str, Tensor]] = OrderedDict()  # LRU, per full block

    def begin(self, runner: Any) -> None:
        """After `_prepare_inputs`: remember how rows map to requests; new requests get cached
        pages."""
        n_reqs = runner.input_batch.num_reqs
        req_ids = list(runner.input_batch.req_ids[:n_reqs])
        # Request i owns rows qsl[i]:qsl[i+1].
        qsl = runner.query_start_loc.np[: n_reqs + 1].tolist()
        # Position of row qsl[i], per request.
        starts = runner.input_batch.num_computed_tokens_cpu[:n_reqs].tolist()
        ids = runner.input_ids.cpu[: qsl[-1]].long()  # [n_rows]
        for i, req_id in enumerate(req_ids):
            state = self.requests.get(req_id)
            if state is None:
                state = self.requests[req_id] = RequestRows(self.hooks, self.top_n)
                prompt = list(runner.requests[req_id].prompt_token_ids or [])
                state.room(len(prompt))
                state.tokens[: len(prompt)] = torch.tensor(prompt, dtype=torch.long)
                state.n = max(state.n, int(starts[i]))
                self._fill_from_pages(state, int(starts[i]))
            hi = starts[i] + qsl[i + 1] - qsl[i]
            state.room(hi)
            state.tokens[starts[i] : hi] = ids[qsl[i] : qsl[i + 1]]
        self.step = (req_ids, qsl, starts)

    def record(self, layer: int, rows: Tensor) -> None:
        """The op's body: rows [n_rows_padded, d_model] of one layer's residual stream."""
        if self.step is None:  # profiling / warm-up runs: no requests
            return
        req_ids, qsl, starts = self.step
        x = rows[: qsl[-1]].float()  # [n_rows, d_model], padding dropped
        for enc in self.encoders:
            if layer_of(enc.hook) != layer:
                continue
            idx, val = enc.top(x, self.top_n)  # [n_rows, top_n]
            for i, req_id in enumerate(req_ids):
                state, lo, hi, at = self.requests[req_id], qsl[i], qsl[i + 1], starts[i]
                state.idx[enc.hook][at : at + hi - lo] = idx[lo:hi]
                state.val[enc.hook][at : at + hi - lo] = val[lo:hi]

    def end(self) -> None:
        """After the forward: mark the step's positions seen, page every newly complete block."""
        if self.step is None:
            return
        req_ids, qsl, starts = self.step
        self.step = None
        for i, req_id in enumerate(req_ids):
            state, hi = self.requests[req_id], starts[i] + qsl[i + 1] - qsl[i]
            state.seen[starts[i] : hi] = True
            state.n = max(state.n, hi)
            self._commit_pages(state, hi)

    def _fill_from_pages(self, state: RequestRows, n_cached: int) -> None:
        """Copy pages for the prefix vLLM served from its cache ([0, n_cached), whole blocks)."""
        bs = self.block_size
        for b in range(n_cached // bs):
            key = state.block_hash(b, bs)
            state.chain.append(key)
            page = self.pages.get(key)
            if page is None:
                continue  # stays unseen: reported as missing
            self.pages.move_to_end(key)
            for h in self.hooks:
                state.idx[h][b * bs : (b + 1) * bs] = page[f"indices.{h}"]
                state.val[h][b * bs : (b + 1) * bs] = page[f"values.{h}"]
            state.seen[b * bs : (b + 1) * bs] = True

    def _commit_pages(self, state: RequestRows, n_done: int) -> None:
        bs = self.block_size
        for b in range(len(state.chain), n_done // bs):
            key = state.block_hash(b, bs)
            state.chain.append(key)
            if (
                self.max_pages <= 0
                or key in self.pages
                or not bool(state.seen[b * bs : (b + 1) * bs].all())
            ):
                continue
            page = {f"indices.{h}": state.idx[h][b * bs : (b + 1) * bs].clone() for h in self.hooks}
            page |= {f"values.{h}": state.val[h][b * bs : (b + 1) * bs].clone() for h in self.hooks}
            self.pages[key] = page
            while len(self.pages) > self.max_pages:
                self.pages.popitem(last=False)

    def finish(self, req_id: str) -> None:
        """Write a finished request's rows to `<sink>/<req_id>.safetensors` (tmp file + rename)."""
        state = self.requests.pop(req_id, None)
        if state is None:
            return
        n = state.n
        tensors = {"computed": state.seen[:n].clone(), "token_ids": state.tokens[:n].clone()}
        for h in self.hooks:
            tensors[f"indices.{h}"] = state.idx[h][:n].clone()
            tensors[f"values.{h}"] = state.val[h][:n].clone()
        meta = {
            "format_version": str(FORMAT_VERSION),
            "request_id": req_id,
            "top_n": str(self.top_n),
            "hooks": json.dumps(self.hooks),
        }
        self.sink.mkdir(parents=True, exist_ok=True)
        tmp = self.sink / f".{req_id}.safetensors.tmp"
        save_file(tensors, tmp, metadata=meta)
        tmp.replace(self.sink / f"{req_id}.safetensors")


_TAP: Tap | None = None


# --------------------------------------------------------------------------- vLLM wiring


def _op(rows_a: Tensor, rows_b: Tensor | None, layer: int) -> None:
    if _TAP is not None:  # rows_a is the residual stream, or hidden + residual (rows_b) is
        _TAP.record(layer, rows_a if rows_b is None else rows_a + rows_b)


def _register_op() -> None:
    if hasattr(torch.ops, "greylens") and hasattr(torch.ops.greylens, "tap"):
        return
    op = torch.library.custom_op(OP_NAME, _op, mutates_args=())
    op.register_fake(lambda rows_a, rows_b, layer: None)
    # Or Inductor's dead-code elimination drops it (the op has no output).
    torch.fx.node.has_side_effect(torch.ops.greylens.tap.default)


def _layer_hook(layer: int) -> Callable[[torch.nn.Module, tuple, Any], None]:
    def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
        rows_a, rows_b = stream_parts(output, layer)  # [n_rows_padded, d_model], same or None
        torch.ops.greylens.tap(rows_a, rows_b, layer)

    return hook


def _check_cuda_graphs(runner: Any) -> None:
    cc = runner.vllm_config.compilation_config
    mode = str(getattr(cc, "cudagraph_mode", "NONE"))
    if (
        runner.device.type == "cuda"
        and "NONE" not in mode
        and ("FULL" in mode or OP_NAME not in (cc.splitting_ops or []))
    ):
        raise RuntimeError(
            f"greylens: CUDA graphs ({mode}) would replay without running the feature op; "
            f"start vLLM with --enforce-eager, or with cudagraph_mode PIECEWISE and "
            f"{OP_NAME!r} added to compilation_config.splitting_ops"
        )


def _install(runner: Any) -> None:
    """Hook the freshly loaded model and wrap this runner's per-step methods (once per runner)."""
    global _TAP
    if getattr(runner, "_greylens_tapped", False):
        return
    runner._greylens_tapped = True
    env = os.environ  # read here, in the worker: only the process that runs the model loads SAEs
    _TAP = Tap(
        [d for d in env[ENV_SAES].split(os.pathsep) if d],
        Path(env[ENV_SINK]),
        int(env.get(ENV_TOP_N, "8")),
        int(env.get(ENV_PAGES, "65536")),
    )
    _check_cuda_graphs(runner)
    if getattr(runner.vllm_config.scheduler_config, "async_scheduling", False):  # CPU forces it off
        raise RuntimeError(
            "greylens: with async scheduling the runner's CPU input ids lag the sampled tokens; "
            "start vLLM with --no-async-scheduling (LLM(..., async_scheduling=False))"
        )
    if runner.parallel_config.world_size > 1:
        raise RuntimeError(
            "greylens: the vLLM plugin supports one worker (tensor/pipeline parallel size 1)"
        )
    _TAP.block_size = int(runner.cache_config.block_size)
    d_model = runner.model_config.get_hidden_size()
    wrong = [e.hook for e in _TAP.encoders if int(e.cfg["d_in"]) != d_model]
    if wrong:
        raise ValueError(
            f"greylens: SAEs {wrong} take d_in != {d_model} (this model's hidden size)"
        )
    hf_config = runner.model_config.hf_config
    layers = decoder_layers(runner.model, hf_config.model_type, hf_config.num_hidden_layers)
    for layer in sorted(_TAP.layers):
        if layer >= len(layers):
            raise ValueError(f"greylens: hook at layer {layer}, the model has {len(layers)} layers")
        layers[layer].register_forward_hook(_layer_hook(layer))
    prepare, update, execute = runner._prepare_inputs, runner._update_states, runner.execute_model

    def _prepare_inputs(*args: Any, **kwargs: Any) -> Any:
        out = prepare(*args, **kwargs)
        _TAP.begin(runner)
        return out

    def _update_states(scheduler_output: Any) -> Any:
        for req_id in scheduler_output.finished_req_ids:  # finished or aborted: hand over
            _TAP.finish(req_id)
        return update(scheduler_output)

    def execute_model(*args: Any, **kwargs: Any) -> Any:
        try:
            return execute(*args, **kwargs)
        finally:
            _TAP.end()

    runner._prepare_inputs = _prepare_inputs
    runner._update_states = _update_states
    runner.execute_model = execute_model


def _wrap_load_model(cls: type) -> None:
    if getattr(cls.load_model, "_greylens", False):
        return
    original = cls.load_model

    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        # An architecture the plugin cannot tap is refused before the weights load.
        candidate_paths(self.model_config.hf_config.model_type)
        out = original(self, *args, **kwargs)
        _install(self)
        return out

    load_model._greylens = True  # type: ignore[attr-defined]
    cls.load_model = load_model


def register() -> None:
    """The `vllm.general_plugins` entry point (runs in every vLLM process; a no-op without SAEs)."""
    sae_dirs = [d for d in os.environ.get(ENV_SAES, "").split(os.pathsep) if d]
    if not sae_dirs:
        return
    if not os.environ.get(ENV_SINK):
        raise RuntimeError(
            f"greylens: {ENV_SAES} is set but {ENV_SINK} is not; set it to a directory for features"
        )
    missing = [d for d in sae_dirs if not (Path(d) / "cfg.json").exists()]
    if missing:  # fail in the front end, before vLLM spends minutes starting
        raise FileNotFoundError(
            f"greylens: {ENV_SAES} names {missing}, which are not SAE directories (cfg.json)"
        )
    _register_op()
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    _wrap_load_model(GPUModelRunner)
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except ImportError:  # a GPU-only build
        return
    _wrap_load_model(CPUModelRunner)
