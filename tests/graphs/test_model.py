"""SparseGraphAutoencoder: the sparse graph step against a dense reference, gradients, files."""

from __future__ import annotations

import pytest
import torch
from torch_geometric.data import Data

from graphs.eval.reconstruction import without_edges
from graphs.io import load_graph, load_graph_sae, save_graph_sae
from graphs.model import SparseGraphAutoencoder
from sae.io import load_sae
from sae.sae import SAE, SAEConfig, fvu

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


def test_training_loss_and_gradients_equal_dense_float64_reference() -> None:
    model = _model(seed=1, dtype=torch.float64)
    x = torch.randn(N, D, dtype=torch.float64) * 2
    torch.manual_seed(7)
    out = model.training_forward(x)
    assert bool((~out.graph_code.from_evidence).any())  # the graph step really added features
    out.fvu.backward()
    fast = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    torch.manual_seed(7)  # the same gate sample
    strengths = model.strengths(sample=True)
    x_n = x * model.sae.cfg.input_scale
    pre = (x_n - model.sae.b_dec) @ model.sae.W_enc.T + model.sae.b_enc  # dense autograd
    evidence = out.graph_code.evidence.to_dense(N_LATENTS) > 0
    e = pre * evidence
    lifted = pre + e @ _dense_strengths(model, strengths)
    threshold = pre.detach()[evidence].min()
    active = evidence | (lifted.detach() > threshold)
    recons = (lifted * active).relu() @ model.sae.W_dec + model.sae.b_dec
    loss = fvu(x_n, recons)
    loss.backward()
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
