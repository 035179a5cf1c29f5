"""SparseGraphAutoencoder: the sparse graph step against a dense reference, gradients, files."""

from __future__ import annotations

import pytest
import torch
from torch_geometric.data import Data

from graphs.eval.reconstruction import without_edges
from graphs.io import load_graph, load_graph_sae, save_graph_sae
from graphs.model import SparseGraphAutoencoder
from sae.io import load_sae
from sae.sae import SAE, SAEConfig

N_LATENTS, D, N = 48, 12, 40


def _model(seed: int = 0, dtype: torch.dtype = torch.float32) -> SparseGraphAutoencoder:
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=D, n_latents=N_LATENTS, arch="batchtopk", k=4))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    pairs = torch.randint(0, N_LATENTS, (2, 400))
    pairs = torch.unique(pairs[:, pairs[0] != pairs[1]], dim=1)
    model = SparseGraphAutoencoder(sae, pairs).to(dtype)
    with torch.no_grad():  # strong, varied edges so that many targets cross the threshold
        model.weight_raw.uniform_(-1.0, 1.5)
        model.log_alpha.uniform_(-3.0, 3.0)
    return model


def _dense_strengths(model: SparseGraphAutoencoder, strengths: torch.Tensor) -> torch.Tensor:
    S = torch.zeros(N_LATENTS, N_LATENTS, dtype=strengths.dtype)
    return S.index_put((model.edge_index[0], model.edge_index[1]), strengths)  # [n, n]


def test_encode_equals_dense_reference() -> None:
    model = _model()
    x = torch.randn(N, D) * 2
    with torch.no_grad():
        model.sae.threshold.fill_(0.8)
        graph_code = model.encode(x)
        _, _, pre = model.pre_acts(x)
        e = pre * (pre > 0.8)  # evidence at inference: pre > θ
        lifted = pre + e @ _dense_strengths(model, model.strengths(sample=False))
        expected = lifted * (lifted > 0.8)
    assert torch.allclose(graph_code.evidence.to_dense(N_LATENTS), e)
    assert torch.allclose(graph_code.code.to_dense(N_LATENTS), expected, atol=1e-6)
    implied = int((~graph_code.from_evidence).sum())
    assert implied > 0 and implied == int(((expected > 0) & (e == 0)).sum())
    # each fired token edge leaves an evidence entry of its own token and lands on an active node
    assert torch.equal(
        graph_code.evidence.rows[graph_code.edge_src], graph_code.code.rows[graph_code.edge_dst]
    )
    assert torch.equal(
        model.edge_index[1, graph_code.edge_id], graph_code.code.cols[graph_code.edge_dst]
    )


def _reference_training_loss(
    model: SparseGraphAutoencoder, x: torch.Tensor, u: torch.Tensor, implied_only: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loss written from the module docstring's math, dense, sharing nothing with the
    fast path but the parameters: (FVU, evidence mask [N, n]).

    u [E]: the uniform draw of the hard-concrete gates (Louizos et al. 2018)."""
    sae = model.sae
    x_n = x * sae.cfg.input_scale
    pre = (x_n - sae.b_dec) @ sae.W_enc.T + sae.b_enc  # [N, n]
    # evidence: the round(k_e·N) largest ReLU(pre) of the batch; θ the smallest of them
    n_keep = round(float(model.evidence_k) * x.shape[0])
    kept = pre.relu().flatten().topk(n_keep)
    evidence = torch.zeros(pre.numel(), dtype=torch.bool).index_fill(0, kept.indices, True)
    evidence = evidence.view_as(pre)
    theta = kept.values.min().detach()
    # gates: z = clamp(sigmoid((log u − log(1 − u) + log α) / β)·(ζ − γ) + γ, 0, 1), w = softplus
    stretched = torch.sigmoid((u.log() - (1 - u).log() + model.log_alpha) / (2 / 3)) * 1.2 - 0.1
    strengths = torch.nn.functional.softplus(model.weight_raw) * stretched.clamp(0, 1)  # [E]
    e = pre.relu() * evidence
    lifted = pre + e @ _dense_strengths(model, strengths)  # messages along i → j
    if implied_only:  # evidence nodes receive no messages
        lifted = torch.where(evidence, pre, lifted)
    active = evidence | (lifted.detach() > theta)
    recons = torch.where(active, lifted, 0.0).relu() @ sae.W_dec + sae.b_dec
    loss = (x_n - recons).pow(2).sum() / (x_n - x_n.mean(0)).pow(2).sum()  # FVU
    return loss, evidence


@pytest.mark.parametrize("implied_only", [False, True])
def test_training_loss_and_gradients_equal_dense_float64_reference(implied_only: bool) -> None:
    model = _model(seed=1, dtype=torch.float64)
    model.cfg.implied_only = implied_only
    x = torch.randn(N, D, dtype=torch.float64) * 2
    torch.manual_seed(7)
    out = model.training_forward(x)
    graph_code = out.graph_code
    assert bool((~graph_code.from_evidence).any())  # the graph step really added features
    if implied_only:
        assert not bool(graph_code.from_evidence[graph_code.edge_dst].any())
    else:  # some messages corrected evidence values
        assert bool(graph_code.from_evidence[graph_code.edge_dst].any())
    out.fvu.backward()
    fast = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    torch.manual_seed(7)  # the same uniform draw as the gate sample
    u = torch.rand(model.log_alpha.shape, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
    loss, evidence = _reference_training_loss(model, x, u, implied_only)
    loss.backward()
    assert torch.equal(graph_code.evidence.to_dense(N_LATENTS) > 0, evidence)
    assert torch.allclose(out.fvu, loss, atol=1e-10)
    assert set(fast) >= {
        "sae.W_enc",
        "sae.W_dec",
        "sae.b_enc",
        "sae.b_dec",
        "weight_raw",
        "log_alpha",
    }
    for name, p in model.named_parameters():
        assert torch.allclose(fast[name], p.grad, atol=1e-9), name


def test_without_edges_the_graph_step_is_the_identity() -> None:
    model = without_edges(_model(seed=2))  # every gate closed
    x = torch.randn(N, D)
    out = model.training_forward(x)
    code, evidence = out.graph_code.code, out.graph_code.evidence
    assert torch.equal(code.cols, evidence.cols) and torch.equal(code.rows, evidence.rows)
    assert len(out.graph_code.edge_id) == 0 and out.edge_l0 < 1e-6
    plain = model.sae.training_forward(x)  # the same SAE as a plain BatchTopK
    assert torch.allclose(out.fvu, plain.fvu, atol=1e-6)


def test_only_edges_leaving_active_features_are_touched() -> None:
    model = _model(seed=3)
    with torch.no_grad():
        model.sae.threshold.fill_(1e9)  # nothing passes: no evidence, so no messages at all
    graph_code = model.encode(torch.randn(N, D))
    assert len(graph_code.code.values) == 0 and len(graph_code.edge_id) == 0


def test_budget_controller_moves_evidence_k_toward_target() -> None:
    model = _model()
    model.adapt_evidence_budget(post_l0=10.0)  # target k = 4: too many features after propagation
    assert float(model.evidence_k) == pytest.approx(4 - 0.6)
    for _ in range(100):
        model.adapt_evidence_budget(post_l0=0.0)
    assert float(model.evidence_k) == 4.0  # never above the target


def test_save_load_round_trip_and_pyg_data(tmp_path) -> None:
    model = _model()
    with torch.no_grad():
        model.evidence_k.fill_(3.25)
    save_graph_sae(model, tmp_path / "g", source={"stats": "s"})
    loaded = load_graph_sae(tmp_path / "g")
    x = torch.randn(N, D)
    assert torch.equal(model(x), loaded(x))
    assert float(loaded.evidence_k) == 3.25
    data = load_graph(tmp_path / "g")
    edges, strengths = model.active_edges()
    assert isinstance(data, Data) and data.num_nodes == N_LATENTS
    assert torch.equal(data.edge_index, edges) and torch.allclose(data.edge_weight, strengths)
    assert 0 < data.edge_index.shape[1] < model.edge_index.shape[1]  # some gates are closed
    assert load_sae(tmp_path / "g").cfg.arch == "batchtopk"  # the evidence SAE stands alone


def test_bad_inputs_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="batchtopk"):
        SparseGraphAutoencoder(
            SAE(SAEConfig(d_in=D, n_latents=N_LATENTS, arch="topk", k=4)),
            torch.zeros(2, 1, dtype=torch.long),
        )
    sae = SAE(SAEConfig(d_in=D, n_latents=N_LATENTS, arch="batchtopk", k=4))
    with pytest.raises(ValueError, match="feature ids"):
        SparseGraphAutoencoder(sae, torch.tensor([[0], [N_LATENTS]]))
    with pytest.raises(FileNotFoundError, match="graphs train"):
        load_graph_sae(tmp_path)


def test_detached_absorption_penalty_moves_decoders_not_gates() -> None:
    """With strengths detached the penalty cannot close the overlapping edges it is about; the
    decoders still get its gradient. Without detaching, the gates get it too (the old flaw)."""
    grads = {}
    for detach in (True, False):
        model = _model(seed=4)
        torch.manual_seed(3)
        out = model.training_forward(torch.randn(N, D) * 2, detach_penalty=detach)
        assert out.absorption > 0
        out.absorption.backward()
        grads[detach] = {name: p.grad for name, p in model.named_parameters()}
    assert grads[True]["log_alpha"] is None and grads[True]["weight_raw"] is None
    assert grads[True]["sae.W_dec"].abs().sum() > 0
    assert grads[False]["log_alpha"].abs().sum() > 0 and grads[False]["weight_raw"].abs().sum() > 0


def test_implied_only_messages_skip_evidence_and_equal_dense_reference() -> None:
    model = _model(seed=5)
    model.cfg.implied_only = True
    x = torch.randn(N, D) * 2
    with torch.no_grad():
        model.sae.threshold.fill_(0.8)
        graph_code = model.encode(x)
        _, _, pre = model.pre_acts(x)
        e = pre * (pre > 0.8)
        lifted = torch.where(
            e > 0, pre, pre + e @ _dense_strengths(model, model.strengths(sample=False))
        )
        expected = lifted * (lifted > 0.8)
    assert torch.allclose(graph_code.code.to_dense(N_LATENTS), expected, atol=1e-6)
    assert bool((~graph_code.from_evidence).any())  # some features were implied
    # no edge lands on evidence
    assert not bool(graph_code.from_evidence[graph_code.edge_dst].any())


def _reference_absorption(
    model: SparseGraphAutoencoder, strengths: torch.Tensor, edges: torch.Tensor, scale: float
) -> torch.Tensor:
    """scale · Σ_{i → j in edges} s_ij · relu(cos(d_i, d_j))² / n_latents, with cos computed as a
    cosine (not as the dot product of unit rows the fast path relies on)."""
    src, dst = model.edge_index[0, edges], model.edge_index[1, edges]
    W_dec = model.sae.W_dec.detach()
    cos = torch.nn.functional.cosine_similarity(W_dec[src], W_dec[dst], dim=1)
    return scale * (strengths[edges] * cos.relu().pow(2)).sum() / N_LATENTS


def test_absorption_penalty_subsample_equals_the_reference_on_that_subsample() -> None:
    model = _model(seed=6, dtype=torch.float64)
    with torch.no_grad():  # unit decoder rows, as training keeps them
        model.sae.W_dec.div_(model.sae.W_dec.norm(dim=1, keepdim=True))
    n_edges = model.edge_index.shape[1]
    edges = torch.arange(n_edges)
    strengths = torch.rand(n_edges, dtype=torch.float64, requires_grad=True)
    # below max_edges: every edge, no scaling
    full = model.absorption_penalty(strengths, edges)
    want = _reference_absorption(model, strengths, edges, 1.0)
    torch.testing.assert_close(full, want, rtol=1e-10, atol=0)
    # above max_edges: a random subset of 25, scaled by n_edges / 25
    torch.manual_seed(11)
    got = model.absorption_penalty(strengths, edges, max_edges=25)
    got.backward()
    torch.manual_seed(11)
    subset = edges[torch.randperm(n_edges)[:25]]
    reference_strengths = strengths.detach().clone().requires_grad_(True)
    want = _reference_absorption(model, reference_strengths, subset, n_edges / 25)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    torch.testing.assert_close(strengths.grad, reference_strengths.grad, rtol=1e-10, atol=0)
    assert int((strengths.grad != 0).sum()) <= 25 < n_edges  # only the subset is touched
    # the subset estimate is unbiased: its mean over many draws approaches the full penalty
    with torch.no_grad():
        draws = torch.stack(
            [model.absorption_penalty(strengths, edges, max_edges=25) for _ in range(2000)]
        )
    assert float(draws.mean()) == pytest.approx(float(full.detach()), rel=0.03)
    assert float(draws.std()) > 0.05 * float(full.detach())  # the draws really differ
