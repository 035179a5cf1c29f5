"""An SAE or a graph autoencoder behind one encoder interface, and batched sparse encoding.

AsSAE(model)                       the graph autoencoder as a duck-typed SAE (cfg, passthrough,
                                   encode -> post-propagation code, decode, __call__): what
                                   `sae.evaluate.splice_metrics`, probes and the serving hook read
encode_codes(encode, x)            every row of x through any encoder, batch by batch, as one
                                   SparseCode (a dense 100k × 9216 code would be 3.7 GB)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from graphs.model import SparseGraphAutoencoder
from sae.sae import SparseCode


class AsSAE:
    """Duck-typed SAE view: cfg, passthrough, encode (post-propagation code), decode, __call__."""

    def __init__(self, model: SparseGraphAutoencoder) -> None:
        self.model, self.cfg = model, model.sae.cfg

    def passthrough(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.sae.passthrough(x)

    def encode(self, x: torch.Tensor) -> SparseCode:
        return self.model.encode(x).code

    def decode(self, code: SparseCode) -> torch.Tensor:
        return self.model.decode_n(code) / self.cfg.input_scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


@torch.no_grad()
def encode_codes(
    encode: Callable[[torch.Tensor], torch.Tensor | SparseCode],
    x: torch.Tensor,
    batch_size: int = 4096,
    progress: bool = True,
) -> SparseCode:
    """All rows of x [N, d] encoded batch by batch, kept sparse; a dense code [B, n] is
    sparsified."""
    values, cols, rows = [], [], []
    for start in tqdm(
        range(0, len(x), batch_size), desc="encode", leave=False, disable=not progress
    ):
        out = encode(x[start : start + batch_size])
        if not isinstance(out, SparseCode):
            out = out.detach()
            r, c = out.nonzero(as_tuple=True)
            out = SparseCode(out[r, c], c, r, out.shape[0])
        values.append(out.values.float())
        cols.append(out.cols.long())
        rows.append(out.rows.long() + start)
    return SparseCode(torch.cat(values), torch.cat(cols), torch.cat(rows), len(x))
