"""SAE architectures: the fast training path against dense eager references, and their semantics."""

from __future__ import annotations

import pytest
import torch

from sae.sae import SAE, SAEConfig, fvu

D, LATENTS, K, N = 12, 48, 4, 64


def _sae(arch: str, seed: int = 0, **overrides) -> SAE:
    sae = SAE(
        SAEConfig(d_in=D, n_latents=LATENTS, arch=arch, k=K, input_scale=0.5, **overrides)
    ).double()
    sae.reset_parameters(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.b_dec.normal_(generator=torch.Generator().manual_seed(seed + 1))
        sae.b_enc.normal_(generator=torch.Generator().manual_seed(seed + 2), std=0.1)
    return sae


def _x(seed: int = 0) -> torch.Tensor:
    return (
        torch.randn(N, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3
        + 1
    )


def _dense_acts(sae: SAE, pre: torch.Tensor) -> torch.Tensor:
    """The code [N, n_latents] of every architecture written the obvious dense way from pre."""
    if sae.cfg.arch == "topk":
        mask = torch.zeros_like(pre, dtype=torch.bool).scatter(1, pre.topk(K, dim=1).indices, True)
    elif sae.cfg.arch == "jumprelu":
        return pre * (pre > sae.log_threshold.exp())
    elif sae.cfg.arch == "relu":
        return pre.relu()
    else:  # batchtopk, matryoshka: the K·N largest ReLU(pre) of the batch
        flat = pre.relu().flatten()
        mask = (
            torch.zeros_like(flat, dtype=torch.bool)
            .scatter(0, flat.topk(K * N).indices, True)
            .view_as(pre)
        )
    return pre.relu() * mask


def _dense_reference_loss(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """TopK / BatchTopK / Matryoshka written the obvious dense way."""
    x_n = x * sae.cfg.input_scale
    pre = (x_n - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    acts = _dense_acts(sae, pre)
    if sae.cfg.arch != "matryoshka":
        return fvu(x_n, acts @ sae.W_dec + sae.b_dec)
    ends = sae.cfg.matryoshka_groups
    losses = [fvu(x_n, acts[:, :end] @ sae.W_dec[:end] + sae.b_dec) for end in ends]
    return torch.stack(losses).mean()


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
def test_sparse_training_path_equals_the_dense_reference(arch: str) -> None:
    grads = []
    for use_reference in (False, True):
        sae, x = _sae(arch), _x()
        loss = _dense_reference_loss(sae, x) if use_reference else sae.training_forward(x).fvu
        loss.backward()
        grads.append((loss.detach(), {name: p.grad.clone() for name, p in sae.named_parameters()}))
    (fast_loss, fast_grads), (ref_loss, ref_grads) = grads
    torch.testing.assert_close(fast_loss, ref_loss, rtol=1e-10, atol=1e-12)
    for name in ref_grads:
        torch.testing.assert_close(
            fast_grads[name], ref_grads[name], rtol=1e-9, atol=1e-12, msg=name
        )


def test_topk_code_has_k_latents_per_token_and_decode_inverts_scale() -> None:
    sae, x = _sae("topk"), _x()
    code = sae.encode(x)
    assert torch.bincount(code.rows, minlength=N).eq(K).all()
    dense = code.to_dense(LATENTS)
    expected = (dense @ sae.W_dec + sae.b_dec) / sae.cfg.input_scale  # raw space
    torch.testing.assert_close(sae.decode(code), expected)
    torch.testing.assert_close(sae(x), expected)


def test_hook_points_fire_like_saelens() -> None:
    sae, x = _sae("topk"), _x()
    recons, cache = sae.run_with_cache(x)
    assert set(cache.keys()) == {"hook_sae_acts_post", "hook_sae_recons", "hook_sae_error"}
    assert cache["hook_sae_acts_post"].shape == (N, LATENTS)
    torch.testing.assert_close(cache["hook_sae_error"], x - recons)


def test_batchtopk_learns_an_inference_threshold_so_l0_varies_per_token() -> None:
    sae, x = _sae("batchtopk"), _x()
    for _ in range(5):
        sae.training_forward(x)
    assert sae.threshold.item() > 0
    code = sae.encode(x)  # inference: pre > θ, no batch coupling
    counts = torch.bincount(code.rows, minlength=N)
    assert counts.float().std() > 0
    assert abs(code.l0().item() - K) < K  # the threshold tracks the training L0


def test_jumprelu_threshold_gets_the_straight_through_gradient() -> None:
    sae, x = _sae("jumprelu", jumprelu_init_threshold=0.5, jumprelu_bandwidth=1.0), _x()
    out = sae.training_forward(x)
    out.sparsity_loss.backward()
    theta = sae.log_threshold.exp().detach()
    pre = sae.pre_acts(x * sae.cfg.input_scale).detach()
    in_window = ((pre - theta).abs() < 0.5).double()  # rectangle kernel, bandwidth 1
    expected = -(1.0 / 1.0) * in_window.sum(0) / N * theta  # d/dlogθ of mean L0 = θ · dL0/dθ
    torch.testing.assert_close(sae.log_threshold.grad, expected)
    assert out.sparsity_loss.item() == pytest.approx((pre > theta).double().sum(1).mean().item())


def test_relu_sparsity_is_l1_weighted_by_decoder_norms() -> None:
    sae, x = _sae("relu"), _x()
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, LATENTS)[:, None].double())
    out = sae.training_forward(x)
    acts = sae.pre_acts(x * sae.cfg.input_scale).relu()
    expected = (acts * sae.W_dec.norm(dim=1)).sum(1).mean()
    torch.testing.assert_close(out.sparsity_loss, expected)


def test_auxk_trains_only_dead_latents() -> None:
    sae, x = _sae("topk"), _x()
    dead = torch.zeros(LATENTS, dtype=torch.bool)
    dead[:10] = True
    out = sae.training_forward(x, dead=dead, aux_k=6)
    assert out.aux_loss.item() > 0
    out.aux_loss.backward()
    assert sae.W_enc.grad[10:].abs().sum() == 0 and sae.W_enc.grad[:10].abs().sum() > 0


def test_fvu_with_a_reduce_over_ranks_equals_the_whole_batch() -> None:
    x, x_hat = _x(1), _x(2)
    halves = [(x[:32], x_hat[:32]), (x[32:], x_hat[32:])]
    stats = []

    def collect(
        tensor: torch.Tensor,
    ) -> torch.Tensor:  # records each half's stats; sums them on replay
        stats.append(tensor.clone())
        return tensor

    for part in halves:
        fvu(*part, reduce=collect)
    total = stats[0] + stats[1]
    summed = sum(fvu(*part, reduce=lambda t: total.clone()) for part in halves)
    torch.testing.assert_close(summed, fvu(x, x_hat))


def test_bad_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown arch"):
        SAEConfig(d_in=4, n_latents=8, arch="sparsemax")
    with pytest.raises(ValueError, match="k must be in 1..n_latents"):
        SAEConfig(d_in=4, n_latents=8, arch="topk", k=9)


def test_rows_above_max_input_norm_get_no_code_and_pass_through() -> None:
    sae, x = _sae("topk", max_input_norm=25.0), _x()
    x[3] *= 100  # a massive activation
    assert sae.passthrough(x).tolist() == [i == 3 for i in range(N)]
    code = sae.encode(x)
    assert 3 not in code.rows.tolist() and torch.bincount(code.rows, minlength=N)[4] == K
    recons = sae(x)
    torch.testing.assert_close(recons[3], x[3])
    torch.testing.assert_close(recons[4], sae(x[4:5])[0])


def _dense_aux_reference(sae: SAE, x: torch.Tensor, dead: torch.Tensor, aux_k: int) -> torch.Tensor:
    """AuxK written the obvious dense way: the aux_k largest ReLU(pre) among dead latents must
    reconstruct the (detached) residual the code left; that code is the dense one, not the fast
    path's."""
    x_n = x * sae.cfg.input_scale
    pre = (x_n - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    residual = (x_n - (_dense_acts(sae, pre) @ sae.W_dec + sae.b_dec)).detach()
    masked = pre.masked_fill(~dead, float("-inf"))
    mask = torch.zeros_like(pre, dtype=torch.bool).scatter(
        1, masked.topk(aux_k, dim=1).indices, True
    )
    return fvu(residual, (pre.relu() * mask) @ sae.W_dec)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "relu"])
def test_auxk_equals_the_dense_reference_and_reaches_only_dead_latents(arch: str) -> None:
    dead = torch.zeros(LATENTS, dtype=torch.bool)
    dead[::3] = True
    sae, x = _sae(arch, jumprelu_init_threshold=0.5), _x()
    with (
        torch.no_grad()
    ):  # the fast path drops selected entries with pre ≤ 0: make sure there are some
        pre = sae.pre_acts(x * sae.cfg.input_scale).masked_fill(~dead, float("-inf"))
        selected = pre.topk(6, dim=1).values
    assert (selected > 0).any() and (selected <= 0).any()
    grads = []
    for use_reference in (False, True):
        sae, x = _sae(arch, jumprelu_init_threshold=0.5), _x()
        loss = (
            _dense_aux_reference(sae, x, dead, 6)
            if use_reference
            else sae.training_forward(x, dead, 6).aux_loss
        )
        loss.backward()
        grads.append(
            (
                loss.detach(),
                {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None},
            )
        )
    (fast_loss, fast_grads), (ref_loss, ref_grads) = grads
    assert fast_loss.item() > 0
    torch.testing.assert_close(fast_loss, ref_loss, rtol=1e-10, atol=1e-12)
    for name in ("W_enc", "b_enc", "W_dec"):
        torch.testing.assert_close(
            fast_grads[name], ref_grads[name], rtol=1e-9, atol=1e-12, msg=name
        )
    assert fast_grads["W_enc"][~dead].abs().sum() == 0 and fast_grads["W_enc"][dead].abs().sum() > 0
    # aux_k = 0: no AuxK (the default)
    assert _sae(arch).training_forward(_x(), dead, 0).aux_loss.item() == 0


def test_jumprelu_l0_gradient_is_the_central_difference_over_the_bandwidth() -> None:
    """The rectangle kernel makes the straight-through dL0/dθ exactly the finite difference
    (L0(θ + ε/2) − L0(θ − ε/2)) / ε: the count of pre-activations in the window, per token."""
    eps = 0.3
    sae, x = _sae("jumprelu", jumprelu_init_threshold=0.6, jumprelu_bandwidth=eps), _x()
    sae.training_forward(x).sparsity_loss.backward()
    pre = sae.pre_acts(x * sae.cfg.input_scale).detach()
    theta = sae.log_threshold.exp().detach()
    # per-latent mean L0 at threshold t
    l0_at = lambda t: (pre > t).double().sum(0) / N  # noqa: E731
    central = (l0_at(theta + eps / 2) - l0_at(theta - eps / 2)) / eps  # [n_latents]
    assert central.abs().sum() > 0
    # chain rule: d/dlogθ = θ·d/dθ
    torch.testing.assert_close(sae.log_threshold.grad, central * theta)


def test_training_forward_reuses_its_preactivation_buffer_without_changing_results() -> None:
    """The sparse path writes pre-activations into one buffer across steps (fewer page faults);
    a smaller batch uses a view of it, and results equal a fresh SAE's that never reused it."""
    torch.manual_seed(0)
    cfg = SAEConfig(d_in=16, n_latents=64, arch="topk", k=4, hook="h")
    sae, fresh = SAE(cfg), SAE(cfg)
    sae.reset_parameters(torch.Generator().manual_seed(0))
    fresh.load_state_dict(sae.state_dict())
    sae.training_forward(torch.randn(50, 16))  # leaves a 50-row buffer
    buffer = sae._pre_workspace
    x = torch.randn(40, 16)
    out, expected = sae.training_forward(x), fresh.training_forward(x)
    assert sae._pre_workspace is buffer  # reused, not reallocated
    torch.testing.assert_close(out.recons, expected.recons, rtol=0, atol=0)
    assert torch.equal(out.code.cols, expected.code.cols)
    out.fvu.backward()
    expected.fvu.backward()
    for a, b in zip(sae.parameters(), fresh.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
