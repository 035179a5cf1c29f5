"""Harvest: run the model over corpus windows and collect residual streams at hook points.

One forward pass serves every hook and stops after the deepest hooked block (TransformerLens
`stop_at_layer`), which is most of the speed-up over a full forward for a mid-layer hook.
Compute runs in `dtype` (auto: fp32 on CPU, bf16 on CUDA); the store keeps `store_dtype`
(float16 by default) to halve the disk.

    harvest_stream(cfg, model)  -> yields HarvestBatch in memory (no disk), e.g. to train online
    harvest(cfg, model)         -> writes/resumes the store at cfg.out, returns ActivationStore
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from tqdm.auto import tqdm

from sae.corpus import corpus_id, load_corpus
from sae.device import ComputeDtype
from sae.hooks import capture, parse_hooks, validate_hooks
from sae.identity import check_model_matches
from sae.models import LoadedModel, load_model
from sae.store import DTYPES, MANIFEST, ActivationStore, StoreManifest, StoreWriter
from sae.windows import Windows, make_windows


@dataclass
class HarvestConfig:
    out: str = ""
    """Directory of the activation store (created, or resumed if it holds this same harvest)."""
    model: str = "smollm2-135m"
    """Model spec: smollm2-135m (embedded default), tiny / tiny-<family> (random, for tests), a
    local Hugging Face directory, a .gguf file, or a hub id org/name (from the local HF cache)."""
    hooks: str = "blocks.15.hook_resid_post"
    """Comma-separated TransformerLens hook names, all collected in one forward pass."""
    tokens: int = 100_000
    """Tokens to store (rounded up to whole context windows)."""
    context_size: int = 128
    """Tokens per window, BOS included; windows never span two documents."""
    seed: int = 0
    """Seed of the window order (which windows come first)."""
    store_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """Storage dtype of the activations on disk (the compute dtype is --dtype)."""
    corpus: str = "default"
    """Built-in corpus (default, shakespeare, milton, kjv) or a path to your own text."""
    split: Literal["train", "heldout"] = "train"
    """Which documents: train, or the ~10% held out for evaluation (training never sees them)."""
    batch_size: int = 8
    """Windows per forward pass."""
    shard_tokens: int = 32_768
    """Approximate tokens per shard file (a shard is the unit of resume)."""
    keep_bos: bool = False
    """Also store the BOS position (its residual is a huge outlier; SAEs usually skip it)."""
    device: str = "auto"
    """Device of the forward pass: cpu, cuda, cuda:N, or auto (cuda when there is one)."""
    dtype: ComputeDtype = "auto"
    """Compute dtype of the forward pass: auto is float32 on CPU, bfloat16 on CUDA."""
    device_map: str = ""
    """accelerate device map for a model that does not fit one device (e.g. auto); empty: the
    whole model on --device."""

    @property
    def rows_per_window(self) -> int:
        return self.context_size if self.keep_bos else self.context_size - 1

    @property
    def n_windows(self) -> int:
        return math.ceil(self.tokens / self.rows_per_window)

    @property
    def windows_per_shard(self) -> int:
        return max(1, self.shard_tokens // self.rows_per_window)


class HarvestBatch(NamedTuple):
    acts: dict[str, torch.Tensor]  # hook -> [n_rows, d_model] float32
    token_ids: torch.Tensor  # [n_rows] int32
    doc_ids: torch.Tensor  # [n_rows] int32
    positions: torch.Tensor  # [n_rows] int32, position in the window (0 is BOS)


def check_config(cfg: HarvestConfig, model: LoadedModel) -> list[str]:
    """Every check that can fail, done before any forward pass. Returns the parsed hook list."""
    hooks = parse_hooks(cfg.hooks)
    validate_hooks(model, hooks)
    if cfg.context_size > model.n_ctx:
        raise ValueError(
            f"context_size {cfg.context_size} is larger than {model.name} allows ({model.n_ctx}); "
            f"use --context-size {model.n_ctx} or less"
        )
    if cfg.context_size < 2:
        raise ValueError(f"context_size must be at least 2, got {cfg.context_size}")
    if cfg.tokens <= 0 or cfg.batch_size <= 0:
        raise ValueError(
            f"tokens and batch_size must be positive (got {cfg.tokens}, {cfg.batch_size})"
        )
    if cfg.store_dtype not in DTYPES:
        raise ValueError(f"store_dtype must be one of {', '.join(DTYPES)}, got {cfg.store_dtype!r}")
    return hooks


def corpus_windows(cfg: HarvestConfig, model: LoadedModel) -> Windows:
    """The first `cfg.n_windows` windows of the seeded order over the chosen corpus split."""
    docs = load_corpus(cfg.corpus, split=cfg.split)
    windows = make_windows(docs, model.tokenizer, cfg.context_size, cfg.seed, cfg.n_windows)
    if len(windows) < cfg.n_windows:
        available = len(windows) * cfg.rows_per_window
        raise ValueError(
            f"the corpus {cfg.corpus!r} gives only {available} tokens at context_size "
            f"{cfg.context_size}; ask for --tokens {available} or less, or add text"
        )
    return windows


def harvest_stream(
    cfg: HarvestConfig,
    model: LoadedModel,
    windows: Windows | None = None,
    start_window: int = 0,
    stop_window: int | None = None,
) -> Iterator[HarvestBatch]:
    """Yield activations batch by batch, in window order, without touching disk."""
    hooks = check_config(cfg, model)
    windows = windows if windows is not None else corpus_windows(cfg, model)
    stop_window = len(windows) if stop_window is None else stop_window
    return _stream(cfg, model, hooks, windows, start_window, stop_window)


def _stream(
    cfg: HarvestConfig,
    model: LoadedModel,
    hooks: list[str],
    windows: Windows,
    start_window: int,
    stop_window: int,
) -> Iterator[HarvestBatch]:
    """harvest_stream after its checks (harvest() checks once, then streams shard by shard)."""
    first = 0 if cfg.keep_bos else 1  # column 0 is BOS
    for start in range(start_window, stop_window, cfg.batch_size):
        tokens = windows.tokens[start : min(start + cfg.batch_size, stop_window)]  # [b, ctx]
        acts = capture(model, tokens, hooks)  # each [b, ctx, d_model] float32
        n, ctx = tokens.shape
        kept = tokens[:, first:]  # [b, rows_per_window]
        positions = torch.arange(first, ctx, dtype=torch.int32).expand(n, -1)
        doc_ids = windows.doc_ids[start : start + n, None].expand(-1, ctx - first)
        yield HarvestBatch(
            acts=_to_host({h: a[:, first:].reshape(-1, a.shape[-1]) for h, a in acts.items()}),
            token_ids=kept.reshape(-1).to(torch.int32),
            doc_ids=doc_ids.reshape(-1).to(torch.int32),
            positions=positions.reshape(-1),
        )


def harvest(cfg: HarvestConfig, model: LoadedModel | None = None) -> ActivationStore:
    """Write (or resume) the store at cfg.out; a killed run re-run with the same cfg ends
    identical."""
    if not cfg.out:
        raise ValueError("no output directory: pass --out DIR")
    model = model or load_model(cfg.model, cfg.device, cfg.dtype, cfg.device_map or None)
    hooks = check_config(cfg, model)
    if (Path(cfg.out) / MANIFEST).exists():  # resuming: the store must be this model's
        old = StoreManifest.load(Path(cfg.out))
        check_model_matches(
            f"the store {cfg.out}",
            model,
            old.model_record,
            old.d_model,
            old.hooks,
            old.weights_sha256,
        )
    writer = StoreWriter.open(cfg.out, _manifest_for(cfg, model, hooks))
    if writer.manifest.complete:
        print(f"[greylens] {cfg.out} is already complete ({writer.manifest.n_tokens} tokens)")
        return ActivationStore(cfg.out)
    windows = corpus_windows(cfg, model)
    per_shard = cfg.windows_per_shard
    n_shards = math.ceil(len(windows) / per_shard)
    done_tokens = writer.manifest.n_tokens
    log = Path(cfg.out) / "harvest_log.jsonl"
    with tqdm(
        total=len(windows) * cfg.rows_per_window,
        initial=done_tokens,
        unit="tok",
        unit_scale=True,
        desc=f"harvest {cfg.model}",
    ) as bar:
        for shard in range(writer.n_shards_done, n_shards):
            started = time.perf_counter()
            lo, hi = shard * per_shard, min((shard + 1) * per_shard, len(windows))
            parts = []
            for batch in _stream(cfg, model, hooks, windows, lo, hi):
                parts.append(batch)
                bar.update(len(batch.token_ids))
            writer.write_shard(_shard_tensors(parts, hooks, cfg.store_dtype))
            seconds = time.perf_counter() - started
            rows = sum(len(p.token_ids) for p in parts)
            with open(log, "a") as f:
                f.write(json.dumps({"shard": shard, "tokens": rows, "seconds": seconds}) + "\n")
    writer.finish()
    return ActivationStore(cfg.out)


def _manifest_for(cfg: HarvestConfig, model: LoadedModel, hooks: list[str]) -> StoreManifest:
    return StoreManifest(
        model=model.name,
        weights_sha256=model.weights_sha256,
        hooks=hooks,
        d_model=model.d_model,
        dtype=cfg.store_dtype,
        context_size=cfg.context_size,
        corpus=corpus_id(cfg.corpus),
        split=cfg.split,
        seed=cfg.seed,
        n_tokens_target=cfg.tokens,
        windows_per_shard=cfg.windows_per_shard,
        keep_bos=cfg.keep_bos,
        model_record=model.identity(),
    )


def _to_host(acts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Activations as float32 on the CPU. From CUDA: non-blocking copies into pinned buffers, all
    hooks' copies in flight at once, one wait for them all."""
    first = next(iter(acts.values()))
    if first.device.type != "cuda":
        return {h: a.float().cpu() for h, a in acts.items()}
    host = {h: torch.empty(a.shape, dtype=a.dtype, pin_memory=True) for h, a in acts.items()}
    for h, a in acts.items():
        host[h].copy_(a, non_blocking=True)
    torch.cuda.current_stream(first.device).synchronize()
    return {h: a.float() for h, a in host.items()}


def _shard_tensors(
    parts: list[HarvestBatch], hooks: list[str], dtype: str
) -> dict[str, torch.Tensor]:
    tensors = {
        "token_ids": torch.cat([p.token_ids for p in parts]),
        "doc_ids": torch.cat([p.doc_ids for p in parts]),
        "positions": torch.cat([p.positions for p in parts]),
    }
    for hook in hooks:
        stored = torch.cat([p.acts[hook] for p in parts]).to(DTYPES[dtype])  # [rows, d_model]
        if not torch.isfinite(stored).all():
            raise OverflowError(
                f"activations at {hook} overflow {dtype} (largest |x| = "
                f"{max(p.acts[hook].abs().max().item() for p in parts):.0f}); "
                "harvest with --store-dtype bfloat16 or float32"
            )
        tensors[hook] = stored
    return tensors
