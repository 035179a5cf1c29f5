"""Texts → per-token activations at a hook, as a ragged batch; and the SAE encoders probes read.

A probe reads every token of a text except BOS (its residual is a huge, text-independent outlier).
Texts have different lengths, so activations are kept *flattened*: `values [n_tokens, d]` with
`offsets [n_texts + 1]` (text i owns rows offsets[i]:offsets[i+1]) — the same layout the serving
engine hands its hooks (a flattened batch with request offsets), so probe code runs unchanged there.
`pool` turns per-token values into one value per text (mean, max or last token).

    tokenize(tokenizer, texts, max_tokens)  BOS + tokens per text (truncated, never empty)
    collect(model, texts, hooks)            {hook: Ragged} from forwards that stop at the deepest
                                            hook
    pool(ragged, how)                       [n_texts, ...] mean / max / last of each text's tokens
    load_encoder(path)                      an SAE or a graph autoencoder (behind the SAE
                                            interface)
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from graphs.coders import AsSAE, encode_codes
from graphs.io import load_graph_sae
from sae.hooks import capture, validate_hooks
from sae.io import load_sae
from sae.models import LoadedModel, sha256_file
from sae.sae import SAE, SparseCode

Aggregation = Literal["mean", "max", "last"]
AGGREGATIONS: tuple[str, ...] = ("mean", "max", "last")


class Ragged(NamedTuple):
    """Per-token rows of several texts, flattened (text i owns rows offsets[i]:offsets[i + 1])."""

    values: Tensor  # [n_tokens, ...]
    offsets: Tensor  # [n_texts + 1] int64, offsets[0] == 0, strictly increasing

    @property
    def n_texts(self) -> int:
        return self.offsets.numel() - 1

    def segment_ids(self) -> Tensor:  # [n_tokens] int64: the text each row belongs to
        lengths = self.offsets.diff()
        return torch.repeat_interleave(
            torch.arange(lengths.numel(), device=lengths.device), lengths
        )

    def rows_of(self, texts: Tensor) -> tuple[Tensor, Tensor]:
        """(rows [m] of the chosen texts in that order, their new offsets [len(texts) + 1])."""
        starts, ends = self.offsets[texts], self.offsets[texts + 1]
        rows = torch.cat(
            [torch.arange(s, e) for s, e in zip(starts.tolist(), ends.tolist(), strict=True)]
        )
        return rows, torch.cat([starts.new_zeros(1), (ends - starts).cumsum(0)])

    def select(self, texts: Tensor) -> Ragged:
        """The rows of the chosen texts (in that order)."""
        rows, offsets = self.rows_of(texts)
        return Ragged(self.values[rows], offsets)


class Features(NamedTuple):
    """What probes read for a set of texts: residuals at one hook and, optionally, their SAE
    code."""

    acts: Ragged  # values [n_tokens, d_model]
    code: SparseCode | None = None  # rows index acts.values
    n_latents: int = 0

    @property
    def n_texts(self) -> int:
        return self.acts.n_texts

    def select(self, texts: Tensor) -> Features:
        rows, offsets = self.acts.rows_of(texts)
        code = None if self.code is None else select_code(self.code, rows)
        return Features(Ragged(self.acts.values[rows], offsets), code, self.n_latents)


def select_code(code: SparseCode, rows: Tensor) -> SparseCode:
    """The code of rows[0], rows[1], ... renumbered 0, 1, ... (a row may be chosen once)."""
    new_index = torch.full((code.n_rows,), -1, dtype=torch.long)
    new_index[rows] = torch.arange(rows.numel())
    new_rows = new_index[code.rows]
    keep = new_rows >= 0
    order = new_rows[keep].argsort(stable=True)
    return SparseCode(
        code.values[keep][order], code.cols[keep][order], new_rows[keep][order], rows.numel()
    )


def pool(ragged: Ragged, how: Aggregation) -> Tensor:
    """[n_texts, ...]: the mean, the max or the last of each text's rows (differentiable)."""
    values, offsets = ragged.values, ragged.offsets
    if how == "last":
        return values[offsets[1:] - 1]
    if ragged.n_texts == 1 and how in ("mean", "max"):  # one text (a generation step): no scatter
        return values.mean(0, keepdim=True) if how == "mean" else values.amax(0, keepdim=True)
    segments = ragged.segment_ids()
    shape = (ragged.n_texts, *values.shape[1:])
    index = segments.view(-1, *[1] * (values.dim() - 1)).expand_as(values)
    if how == "mean":
        sums = values.new_zeros(shape).index_add(0, segments, values)
        return sums / offsets.diff().view(-1, *[1] * (values.dim() - 1)).to(values.dtype)
    if how == "max":
        return values.new_zeros(shape).scatter_reduce(0, index, values, "amax", include_self=False)
    raise ValueError(f"unknown aggregation {how!r}; choose one of {', '.join(AGGREGATIONS)}")


def tokenize(tokenizer, texts: list[str] | list[list[int]], max_tokens: int) -> list[Tensor]:
    """BOS + at most max_tokens - 1 tokens per text, as the SAEs saw them in training windows.
    A text may also be a list of token ids (already tokenized, without BOS)."""
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2 (BOS + one token), got {max_tokens}")
    empty = [
        i
        for i, text in enumerate(texts)
        if not text or (isinstance(text, str) and not text.strip())
    ]
    if empty:
        raise ValueError(f"texts {empty[:5]} are empty; every text needs at least one token")
    strings = [i for i, text in enumerate(texts) if isinstance(text, str)]
    encoded = (
        tokenizer([texts[i] for i in strings], add_special_tokens=False)["input_ids"]
        if strings
        else []
    )
    ids = [list(text) for text in texts]
    for i, row in zip(strings, encoded, strict=True):
        ids[i] = row
    bos = tokenizer.bos_token_id
    return [torch.tensor([bos, *row[: max_tokens - 1]], dtype=torch.long) for row in ids]


@torch.inference_mode()
def collect(
    model: LoadedModel,
    texts: list[str],
    hooks: list[str],
    max_tokens: int = 128,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[dict[str, Ragged], list[Tensor]]:
    """Activations of every non-BOS token at each hook:
    ({hook: Ragged [n_tokens, d_model]}, token ids).

    Texts are batched by length (little padding); right padding never changes earlier positions
    of a causal model, and padded rows are dropped.
    """
    validate_hooks(model, hooks)
    token_rows = tokenize(model.tokenizer, texts, max_tokens)
    order = sorted(range(len(texts)), key=lambda i: len(token_rows[i]))
    per_text: dict[str, list[Tensor | None]] = {h: [None] * len(texts) for h in hooks}
    pad = model.tokenizer.pad_token_id or 0
    for start in tqdm(range(0, len(order), batch_size), desc="activations", disable=not progress):
        chosen = order[start : start + batch_size]
        width = max(len(token_rows[i]) for i in chosen)
        batch = torch.full((len(chosen), width), pad, dtype=torch.long)
        for row, i in enumerate(chosen):
            batch[row, : len(token_rows[i])] = token_rows[i]
        acts = capture(model, batch, hooks)
        for h in hooks:
            for row, i in enumerate(chosen):
                per_text[h][i] = acts[h][row, 1 : len(token_rows[i])].float().cpu()  # drop BOS
    lengths = torch.tensor([len(row) - 1 for row in token_rows])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    out = {h: Ragged(torch.cat(per_text[h]), offsets) for h in hooks}
    return out, [row[1:] for row in token_rows]


# --------------------------------------------------------------------------- encoders


def load_encoder(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """An SAE directory, or a graph autoencoder directory (its post-propagation code)."""
    path = Path(path)
    if (path / "graph.json").exists():
        return AsSAE(load_graph_sae(path, device))  # duck-typed: cfg, encode, decode
    if not (path / "cfg.json").exists():
        raise FileNotFoundError(
            f"{path} is neither an SAE directory (cfg.json + sae.safetensors) nor a "
            "graph autoencoder directory (graph.json); pass the per-hook SAE directory"
        )
    return load_sae(path, device)


def encoder_sha256(path: str | Path) -> str:
    """Identity of an encoder's weights (the SAE file; for a graph autoencoder also its graph)."""
    path = Path(path)
    files = [path / "sae.safetensors"] + (
        [path / "graph.safetensors"] if (path / "graph.json").exists() else []
    )
    return "+".join(sha256_file(f)[:16] for f in files)


@torch.no_grad()
def encode(encoder: SAE, ragged: Ragged, batch_size: int = 4096) -> tuple[SparseCode, int]:
    """Sparse code of every row (in chunks, so a large set never builds a huge dense
    pre-activation)."""
    return encode_codes(
        encoder.encode, ragged.values, batch_size, progress=False
    ), encoder.cfg.n_latents
