"""Sparse autoencoder architectures: one module, the variant is `SAEConfig.arch` (a Literal).

All variants share

    x_n = x · input_scale,  pre = (x_n − b_dec) W_encᵀ + b_enc,  x̂_n = a W_dec + b_dec,
    x̂ = x̂_n / input_scale,

and differ in how the code `a` is chosen from `pre`:

| arch        | code a                                               | sparsity term           |
|-------------|------------------------------------------------------|-------------------------|
| topk        | the k largest ReLU(pre) of each token                | none (k fixed)          |
| batchtopk   | the k·N largest over the batch (train); pre > θ      | none; θ learned as a    |
|             | with one learned threshold θ (inference), so L0      | running min of kept     |
|             | adapts per token                                     | activations             |
| jumprelu    | pre · H(pre − θ_j), θ_j learned by straight-through  | λ · L0 (STE), warmed up |
|             |                                                      | or set by an L0 target  |
| relu        | ReLU(pre)                                            | λ · Σ_j a_j ‖W_dec_j‖   |
|             |                                                      | (λ: same as jumprelu)   |
| matryoshka  | batchtopk, and each prefix of latents [0, m_g) must  | none                    |
|             | reconstruct x on its own (loss averaged over groups) |                         |

TopK-family codes are picked sparsely (`sae.codes`) and use the kernels in `sae.kernels`; jumprelu
and relu compute dense activations (their straight-through estimators: `sae.jumprelu`).
`input_scale` is fitted on training data and stored in the config, so the SAE takes raw
activations at inference. Hook points `hook_sae_acts_post`, `hook_sae_recons`, `hook_sae_error`
behave as in SAELens.

Massive activations: residual streams hold rare tokens (mostly the first token after BOS:
attention sinks) with norms one to two orders of magnitude above the median, which would dominate
the loss. Rows whose raw norm exceeds `max_input_norm` get no code and are passed through
unchanged by `forward` (like BOS, which is never stored); the trainer sets the limit and skips such
rows; evaluation counts them apart.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
from torch import nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from sae.codes import SparseCode, batch_topk_code, dense_to_code, topk_code
from sae.jumprelu import JumpReLU, StepL0
from sae.kernels import sparse_decode, sparse_encode

Architecture = Literal["topk", "batchtopk", "jumprelu", "relu", "matryoshka"]
ARCHITECTURES: tuple[str, ...] = ("topk", "batchtopk", "jumprelu", "relu", "matryoshka")
SPARSE_ARCHS = ("topk", "batchtopk", "matryoshka")
Reduce = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over data-parallel ranks
# Devices whose sparse training step avoids every device→host sync (fixed shapes only). On the CPU
# a "sync" costs nothing and the data-dependent forms (AuxK over the dead columns only, BatchTopK
# from a hinted candidate set) are several times faster, so the CPU keeps them.
SYNC_FREE_DEVICES = {"cuda"}


@dataclass
class SAEConfig:
    d_in: int
    n_latents: int
    arch: Architecture = "topk"
    k: int = 32  # topk family: latents per token (batchtopk: on average)
    hook: str = ""
    model: str = ""
    weights_sha256: str = ""
    # the model record of the store it was trained on (sae.identity); {} in older SAEs
    model_record: dict = field(default_factory=dict)
    input_scale: float = 1.0  # x is multiplied by this before encoding (fitted so E‖x‖ = √d_in)
    max_input_norm: float = 0.0  # rows with a larger raw norm pass through untouched (0: no limit)
    jumprelu_bandwidth: float = 0.05  # width ε of the straight-through rectangle kernel
    jumprelu_init_threshold: float = 0.05
    # jumprelu/relu: the trainer's λ; with a target L0 the controller's integral λ_I (resume state)
    sparsity_coeff: float = 0.0
    matryoshka_groups: list[int] = field(default_factory=list)  # prefix ends; [] = n/8, n/4, n/2, n
    format_version: int = 1

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(
                f"unknown arch {self.arch!r}; choose one of {', '.join(ARCHITECTURES)}"
            )
        if self.arch == "matryoshka" and not self.matryoshka_groups:
            self.matryoshka_groups = [
                self.n_latents // 8,
                self.n_latents // 4,
                self.n_latents // 2,
                self.n_latents,
            ]
        if self.arch in SPARSE_ARCHS and not 0 < self.k <= self.n_latents:
            raise ValueError(f"k must be in 1..n_latents ({self.n_latents}), got {self.k}")


class SAEOutput(NamedTuple):
    recons: torch.Tensor  # [N, d_in] in the input's (raw) space
    code: SparseCode
    fvu: torch.Tensor  # scalar: reconstruction loss (normalised space, batch FVU)
    aux_loss: torch.Tensor  # scalar: AuxK dead-latent loss (0 when nothing is dead)
    sparsity_loss: torch.Tensor  # scalar: L1 (relu) or L0 (jumprelu) term, before its coefficient


class SAE(HookedRootModule):
    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n, d = cfg.n_latents, cfg.d_in
        # [n_latents, d_in] (SAELens stores the transpose)
        self.W_enc = nn.Parameter(torch.empty(n, d))
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.W_dec = nn.Parameter(torch.empty(n, d))  # [n_latents, d_in], unit-norm rows
        self.b_dec = nn.Parameter(torch.zeros(d))
        if cfg.arch == "jumprelu":
            self.log_threshold = nn.Parameter(
                torch.full((n,), math.log(cfg.jumprelu_init_threshold))
            )
        self.register_buffer("threshold", torch.zeros(()))  # batchtopk/matryoshka inference θ
        # training's [N, n_latents] pre-activation buffer (not state)
        self._pre_workspace: torch.Tensor | None = None
        # the last training batch's BatchTopK cut (not state: only a speed hint; a 0-dim tensor
        # once set, read back only by `cut_hint`)
        self._last_cut: float | torch.Tensor = 0.0
        self.hook_sae_acts_post = HookPoint()
        self.hook_sae_recons = HookPoint()
        self.hook_sae_error = HookPoint()
        self.setup()
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Unit-norm random decoder rows; the encoder starts as the decoder's transpose."""
        with torch.no_grad():
            directions = torch.randn(self.W_dec.shape, generator=generator)
            self.W_dec.copy_(directions / directions.norm(dim=1, keepdim=True))
            self.W_enc.copy_(self.W_dec)

    # ------------------------------------------------------------------ inference

    def pre_acts(self, x_n: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b_enc, x_n - self.b_dec, self.W_enc.T)  # [N, n_latents], bias fused

    def passthrough(self, x: torch.Tensor) -> torch.Tensor:
        """[N] bool: rows too large for this SAE (massive activations), left as they are."""
        if self.cfg.max_input_norm <= 0:
            return torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        return x.norm(dim=-1) > self.cfg.max_input_norm

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> SparseCode:
        """Sparse code of raw activations x: [N, d_in] (inference rules: batchtopk uses θ)."""
        pre = self.pre_acts(x.to(self.W_enc.dtype) * self.cfg.input_scale)
        arch = self.cfg.arch
        if arch == "topk":
            code = topk_code(pre, self.cfg.k)
        elif arch in ("batchtopk", "matryoshka"):
            code = dense_to_code(pre * (pre > self.threshold))
        elif arch == "jumprelu":
            code = dense_to_code(pre * (pre > self.log_threshold.exp()))
        else:
            code = dense_to_code(pre.relu())
        skipped = self.passthrough(x)
        if bool(skipped.any()):
            keep = ~skipped[code.rows]
            code = SparseCode(code.values[keep], code.cols[keep], code.rows[keep], code.n_rows)
        return code

    def decode(self, code: SparseCode) -> torch.Tensor:
        """Raw-space reconstruction [N, d_in] of a sparse code."""
        x_n = sparse_decode(code.values, code.cols, code.rows, self.W_dec, code.n_rows) + self.b_dec
        return x_n / self.cfg.input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of raw x, running the SAE hook points (acts are materialised dense)."""
        code = self.encode(x)
        acts = self.hook_sae_acts_post(code.to_dense(self.cfg.n_latents))  # [N, n_latents]
        recons = (acts @ self.W_dec + self.b_dec) / self.cfg.input_scale
        recons = self.hook_sae_recons(
            torch.where(self.passthrough(x)[:, None], x.to(recons.dtype), recons)
        )
        self.hook_sae_error(x - recons)
        return recons

    # ------------------------------------------------------------------ training

    def training_forward(
        self,
        x: torch.Tensor,
        dead: torch.Tensor | None = None,
        aux_k: int = 0,
        reduce: Reduce | None = None,
    ) -> SAEOutput:
        """Losses for one batch of raw activations x: [N, d_in]. `dead`: [n_latents] bool.

        `reduce` sums a tensor over data-parallel ranks: losses then use global denominators, so
        summing the ranks' gradients gives exactly the gradient of the whole global batch.
        """
        x_n = x.to(self.W_enc.dtype) * self.cfg.input_scale
        x_c = x_n - self.b_dec  # [N, d_in]
        sparse = self.cfg.arch in SPARSE_ARCHS
        sync_free = sparse and x.device.type in SYNC_FREE_DEVICES
        if sparse:
            # no autograd through pre (grads go via the kernels): write it into a reused buffer,
            # in autocast's dtype when it is on (an out= op is not autocast: cast by hand)
            with torch.no_grad():
                dtype = _autocast_dtype(x.device.type) or self.W_enc.dtype
                buffer = self.workspace(x_c.shape[0], dtype)
                W_enc, b_enc = self.W_enc.to(dtype), self.b_enc.to(dtype)
                pre = torch.addmm(b_enc, x_c.to(dtype), W_enc.T, out=buffer)  # [N, n_latents]
        else:
            pre = torch.addmm(self.b_enc, x_c, self.W_enc.T)  # [N, n_latents], bias fused
        sparsity = aux = x_n.new_zeros(())
        if sparse:
            code, recon_loss, recons_n = self._sparse_losses(x_n, x_c, pre, reduce, sync_free)
        else:
            code, recon_loss, sparsity, recons_n = self._dense_losses(x_n, pre, reduce)
        if dead is not None and aux_k > 0 and sync_free:  # 0 when nothing is dead, no sync
            aux = self.masked_aux_loss(x_n - recons_n, x_c, pre, dead, aux_k, reduce)
        elif dead is not None and aux_k > 0 and bool(dead.any()):  # dense archs: trainer opts in
            aux = self.aux_loss(x_n - recons_n, x_c, pre, dead, aux_k, reduce)
        recons = recons_n / self.cfg.input_scale
        return SAEOutput(recons, code.detach(), recon_loss, aux, sparsity)

    def workspace(self, n_rows: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The [n_rows, n_latents] pre-activation buffer of the sparse training path, reused across
        steps. A fresh tensor of that size per step costs page faults on every write, which makes
        the encoder GEMM measurably slower. The values do not outlive the step: codes and losses
        hold their own tensors. Batches differ by the few massive-activation rows skipped, so the
        buffer keeps the largest row count seen and a step uses its first n_rows rows (a
        contiguous view)."""
        buffer, W = self._pre_workspace, self.W_enc
        dtype = dtype or W.dtype  # the weights' dtype, or autocast's
        if (
            buffer is None
            or buffer.shape[0] < n_rows
            or buffer.dtype != dtype
            or buffer.device != W.device
        ):
            buffer = self._pre_workspace = torch.empty(
                n_rows, self.cfg.n_latents, dtype=dtype, device=W.device
            )
        return buffer[:n_rows]

    def _sparse_losses(
        self,
        x_n: torch.Tensor,
        x_c: torch.Tensor,
        pre: torch.Tensor,
        reduce: Reduce | None,
        sync_free: bool = False,
    ) -> tuple[SparseCode, torch.Tensor, torch.Tensor]:
        """(code, reconstruction loss, detached normalised-space reconstruction of the whole code).

        x_n, x_c: [N, d_in] scaled and centred inputs; pre: [N, n_latents]. sync_free: BatchTopK
        by one topk over all N·n entries (the same winners; fixed shapes, no hint read back)."""
        with torch.no_grad():
            if self.cfg.arch == "topk":
                selected = topk_code(pre, self.cfg.k)
            elif sync_free:
                selected = batch_topk_code(pre, self.cfg.k, exhaustive=True)
                self.update_threshold(selected.values)
            else:
                selected = batch_topk_code(pre, self.cfg.k, hint=self.cut_hint())
                self.update_threshold(selected.values)
        # selected.values = ReLU(pre) at the selected entries: under the ReLU below, the same as pre
        # the sparse kernels run in the weights' dtype (pre may be autocast's bf16)
        kept = selected.values.to(x_c.dtype)
        values = sparse_encode(
            x_c, self.W_enc, self.b_enc, pre, selected.cols, selected.rows, kept
        ).relu()
        code = SparseCode(values, selected.cols, selected.rows, selected.n_rows)
        if self.cfg.arch != "matryoshka":
            recons_n = self._decode_n(code)
            return code, fvu(x_n, recons_n, reduce), recons_n.detach()
        prefixes = [
            self._decode_n(code._replace(values=values * (code.cols < end)))
            for end in self.cfg.matryoshka_groups
        ]
        loss = torch.stack([fvu(x_n, p, reduce) for p in prefixes]).mean()
        if self.cfg.matryoshka_groups[-1] >= self.cfg.n_latents:  # the last prefix: whole code
            return code, loss, prefixes[-1].detach()
        with torch.no_grad():
            return code, loss, self._decode_n(code)

    def _dense_losses(
        self, x_n: torch.Tensor, pre: torch.Tensor, reduce: Reduce | None
    ) -> tuple[SparseCode, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(code, reconstruction loss, sparsity term, detached normalised-space reconstruction)."""
        if self.cfg.arch == "jumprelu":
            threshold = self.log_threshold.exp()
            acts = JumpReLU.apply(pre, threshold, self.cfg.jumprelu_bandwidth)
            sparsity = StepL0.apply(pre, threshold, self.cfg.jumprelu_bandwidth).sum()
        else:
            acts = pre.relu()
            sparsity = (acts * self.W_dec.norm(dim=1)).sum()
        n_tokens = x_n.new_tensor(float(x_n.shape[0]))
        # mean over the global batch
        sparsity = sparsity / (reduce(n_tokens) if reduce else n_tokens)
        recons_n = acts @ self.W_dec + self.b_dec  # [N, d_in]
        return dense_to_code(acts), fvu(x_n, recons_n, reduce), sparsity, recons_n.detach()

    def _decode_n(self, code: SparseCode) -> torch.Tensor:
        """Normalised-space reconstruction [N, d_in] of a sparse code."""
        decoded = sparse_decode(code.values, code.cols, code.rows, self.W_dec, code.n_rows)
        return decoded + self.b_dec

    def aux_loss(
        self,
        residual: torch.Tensor,
        x_c: torch.Tensor,
        pre: torch.Tensor,
        dead: torch.Tensor,
        aux_k: int,
        reduce: Reduce | None,
    ) -> torch.Tensor:
        """AuxK (Gao et al. 2024): the top aux_k dead latents must explain what the code missed.

        Also used for jumprelu/relu: a latent pushed below its threshold gets no gradient from the
        reconstruction, and this is the only loss that can bring it back. `pre` is read, never
        differentiated (the kernel recomputes the selected entries' gradients).

        Only the dead columns of `pre` are searched, and selected entries with pre ≤ 0 are dropped:
        their ReLU is 0 and gets no gradient, so loss and gradients are unchanged, and since few of
        the aux_k selected entries per token are positive, the step's AuxK gets several times
        cheaper. residual, x_c: [N, d_in]; pre: [N, n_latents]; dead: [n_latents] bool."""
        dead_ids = dead.nonzero().squeeze(1)  # [n_dead]
        k = min(aux_k, len(dead_ids))
        with torch.no_grad():
            top, local = pre.index_select(1, dead_ids).topk(k, dim=1, sorted=False)  # [N, k]
            positive = (top > 0).flatten()
            top, cols = top.flatten()[positive], dead_ids[local.flatten()[positive]]
            rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(k)
            rows = rows[positive]  # still sorted
        top = top.to(x_c.dtype)  # pre may be autocast's bf16; the kernels use the weights' dtype
        values = sparse_encode(x_c, self.W_enc, self.b_enc, pre, cols, rows, top)
        guess = sparse_decode(values, cols, rows, self.W_dec, pre.shape[0])
        return fvu(residual.detach(), guess, reduce)

    def masked_aux_loss(
        self,
        residual: torch.Tensor,
        x_c: torch.Tensor,
        pre: torch.Tensor,
        dead: torch.Tensor,
        aux_k: int,
        reduce: Reduce | None,
    ) -> torch.Tensor:
        """`aux_loss` with fixed shapes, for devices where reading the dead count back would stall
        the host: live columns are masked to −inf instead of dropped, each token keeps aux_k
        entries, those that are not positive get weight 0, and the loss is multiplied by whether
        anything is dead (aux_loss is 0 then). Same value up to summation order, but the top-k
        runs over all n_latents columns. Shapes as in `aux_loss`."""
        n_rows, k = pre.shape[0], min(aux_k, pre.shape[1])
        with torch.no_grad():
            top, cols = pre.masked_fill(~dead, -torch.inf).topk(k, dim=1, sorted=False)  # [N, k]
            positive = (top > 0).flatten().to(pre.dtype)  # [N·k]; live or ≤ 0 entries: weight 0
            top, cols = top.flatten().clamp_min(0).to(x_c.dtype), cols.flatten()
            rows = torch.arange(n_rows, device=pre.device).repeat_interleave(k)
        values = sparse_encode(x_c, self.W_enc, self.b_enc, pre, cols, rows, top) * positive
        guess = sparse_decode(values, cols, rows, self.W_dec, n_rows)
        return fvu(residual.detach(), guess, reduce) * dead.any()

    def cut_hint(self) -> float:
        """A value just below the next training batch's BatchTopK cut: 0.85 × the last batch's cut
        (θ before the first batch; 0, no hint, while both are unset). Only `batch_topk_code`'s speed
        depends on it. Not θ itself: θ averages cuts with momentum 0.99 and lags when they move
        fast, as in a graph autoencoder's first steps."""
        return 0.85 * (float(self._last_cut) or float(self.threshold))

    @torch.no_grad()
    def update_threshold(self, kept: torch.Tensor, momentum: float = 0.99) -> None:
        """θ ← the smallest positive kept value (the first time), then its EMA; no positive value
        leaves θ and the cut as they were. Written with `where`, not branches, so that nothing is
        read back to the host. kept: [nnz]."""
        if kept.numel() == 0:  # a shape, known on the host
            return
        smallest = torch.where(kept > 0, kept, torch.inf).min()  # +inf: nothing positive
        found = smallest.isfinite()
        last = self._last_cut
        if not isinstance(last, torch.Tensor):  # unset (0.0): a fill, no host→device copy
            last = smallest.new_full((), last)
        self._last_cut = torch.where(found, smallest, last)
        ema = momentum * self.threshold + (1 - momentum) * smallest
        new = torch.where(self.threshold == 0, smallest, ema)
        self.threshold.copy_(torch.where(found, new, self.threshold))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Drop the gradient component along each decoder row (it would only change the norm)."""
        if self.W_dec.grad is None:
            return
        # [n_latents] in one pass (three fewer than mul-sum-mul-sub)
        parallel = torch.linalg.vecdot(self.W_dec.grad, self.W_dec)
        self.W_dec.grad.addcmul_(parallel[:, None], self.W_dec, value=-1)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """autocast's dtype on this device type when it is on (the trainer's --dtype bfloat16)."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def fvu(x: torch.Tensor, x_hat: torch.Tensor, reduce: Reduce | None = None) -> torch.Tensor:
    """Σ‖x − x̂‖² / Σ‖x − mean(x)‖² over the (global) batch: the training form of sae.metrics.fvu.

    The denominator holds no parameters; it comes from float64 sums (Σx, Σx², n) so that data-
    parallel ranks can add theirs up. x, x_hat: [N, d] -> scalar.
    """
    d = x.shape[1]
    with torch.no_grad():
        x64 = x.detach().double()
        # [2d + 1]: Σx, Σx², n
        # n by a fill, not new_tensor: a host list copied to CUDA would wait for the stream
        stats = torch.cat([x64.sum(0), x64.pow(2).sum(0), x64.new_full((1,), x.shape[0])])
        if reduce is not None:
            stats = reduce(stats)
        total_variance = (stats[d : 2 * d] - stats[:d].pow(2) / stats[-1]).sum().clamp_min(1e-12)
    return (x - x_hat).pow(2).sum() / total_variance.to(x.dtype)
