"""The adaptive sparse GNN autoencoder: SAE latents are nodes of a learned sparse implication graph.

    evidence    e = BatchTopK(pre)  (train: the round(k_e·N) largest of the batch;
                inference: pre > θ)
    graph step  a_j = pre_j + Σ_{i→j} w_ij z_ij e_i  where that exceeds θ (the evidence threshold),
                over each token's active subgraph only
    decode      x̂ = a W_dec + b_dec

An edge i → j (w ≥ 0, gate z ∈ [0, 1]) lets an active feature raise a feature it implies, e.g. a
child ("snake") raising its parent ("starts with s"): this counters feature absorption, where the
parent stops firing because the child's decoder has copied its direction. Edges come from a fixed
candidate set (top-m co-activation neighbours per feature, `graphs.coactivation`, optionally joined
by decoder-geometry neighbours, `graphs.candidates`); their gates are hard-concrete (Louizos et al.
2018) so training drives most of them to exactly zero.

Sparsity budget: `k` is the target *post-propagation* L0. The evidence budget k_e starts at k and a
controller lowers it by however many features the graph adds, so models are compared at equal
post-propagation L0. Cost per token is O(k·m·d): only edges leaving active features are touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch_geometric.nn import MessagePassing

from sae.kernels import sparse_decode, sparse_encode
from sae.sae import SAE, SparseCode, batch_topk_code, fvu

# hard-concrete stretch interval and temperature (Louizos et al. 2018)
GAMMA, ZETA, BETA = -0.1, 1.1, 2.0 / 3.0


@dataclass
class GraphConfig:
    n_latents: int
    n_edges: int
    init_log_alpha: float = -1.0  # P(gate open) starts at 0.65, the deterministic gate at 0.22
    init_weight: float = 0.1  # w = softplus(weight_raw) starts here
    evidence_k: float = 0.0  # current evidence budget k_e (0: start at the SAE's k)
    implied_only: bool = (
        False  # messages reach only features the encoder left inactive (no corrections)
    )
    format_version: int = 1


class GraphCode(NamedTuple):
    """Codes of one batch before and after the graph step, and the token-level edges that fired."""

    evidence: SparseCode  # e: [nnz_e] entries, row-sorted
    code: SparseCode  # a: the active (token, feature) nodes after the graph step, row-sorted
    from_evidence: torch.Tensor  # [nnz] bool: the node was already active before the graph step
    edge_src: torch.Tensor  # [n_fired] index into evidence entries of each fired edge's source
    edge_dst: torch.Tensor  # [n_fired] index into code entries of its target
    edge_id: torch.Tensor  # [n_fired] index into the candidate feature edges
    message: torch.Tensor  # [n_fired] s·e_src: what the edge added to its target's pre-activation


class GraphOutput(NamedTuple):
    recons: torch.Tensor  # [N, d_in] raw space
    graph_code: GraphCode
    fvu: torch.Tensor  # scalar reconstruction loss (normalised space)
    aux_loss: torch.Tensor  # AuxK dead-latent loss
    edge_l0: torch.Tensor  # expected number of open gates per feature (mean out-degree)
    absorption: torch.Tensor  # Σ_open edges z·w·relu(cos(d_src, d_dst))² / n_latents


def expand_out_edges(
    edge_src: torch.Tensor, n_nodes: int, cols: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token edges: every (entry, out-edge) pair for the active entries of a code.

    edge_src: [E] source feature of each edge, sorted; cols: [nnz] feature of each active entry.
    Returns (entry [T], edge [T]) with T = Σ_entries outdeg(col): only active features' edges.
    """
    out_degree = torch.bincount(edge_src, minlength=n_nodes)  # [n_nodes]
    first = torch.cumsum(out_degree, 0) - out_degree  # CSR start of each feature's edges
    degree = out_degree[cols]  # [nnz]
    entry = torch.repeat_interleave(torch.arange(len(degree), device=cols.device), degree)  # [T]
    within = (
        torch.arange(len(entry), device=cols.device) - (torch.cumsum(degree, 0) - degree)[entry]
    )
    return entry, first[cols][entry] + within


def locate(sorted_keys: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary search of each query in sorted_keys: (position [Q], found [Q] bool). Where a query is
    absent its position is meaningless (clamped into range, 0 for an empty key set)."""
    if len(sorted_keys) == 0:
        return torch.zeros_like(queries), torch.zeros_like(queries, dtype=torch.bool)
    at = torch.searchsorted(sorted_keys, queries).clamp_max(len(sorted_keys) - 1)
    return at, sorted_keys[at] == queries


class ImplicationConv(MessagePassing):
    r"""One implication step on token-local feature graphs.

    Bipartite: sources are the evidence entries (token t, feature i) with value x_u = e_ti; targets
    are the distinct (token, feature) pairs that some live edge reaches. A token edge u → v exists
    for every live feature edge i → j leaving an evidence feature, with weight s_uv = w_ij z_ij:

        out_v = Σ_{u → v} s_uv · x_u      x: [nnz_e, 1], edge_index: [2, T], out: [n_targets, 1]

    Only the T = Σ_tokens Σ_{active i} outdeg(i) token edges are touched (O(k·m) per token).
    Conventions as in PyG's GraphConv (source_to_target flow, sum aggregation).
    """

    def __init__(self) -> None:
        super().__init__(aggr="sum", flow="source_to_target")

    def forward(
        self,
        x: torch.Tensor,
        edge_index: torch.Tensor,
        edge_weight: torch.Tensor,
        size: tuple[int, int],
    ) -> torch.Tensor:
        return self.propagate(edge_index, x=x, edge_weight=edge_weight, size=size)

    def message(self, x_j: torch.Tensor, edge_weight: torch.Tensor) -> torch.Tensor:
        return edge_weight.unsqueeze(-1) * x_j  # [n_tok_edges, 1]


class SparseGraphAutoencoder(nn.Module):
    """A BatchTopK SAE (`self.sae`, same file format as any greylens SAE) plus a feature graph."""

    def __init__(self, sae: SAE, edge_index: torch.Tensor, cfg: GraphConfig | None = None) -> None:
        super().__init__()
        if sae.cfg.arch != "batchtopk":
            raise ValueError(
                f"the evidence SAE must be batchtopk (adaptive L0), got {sae.cfg.arch!r}"
            )
        n = sae.cfg.n_latents
        if (
            edge_index.ndim != 2
            or edge_index.shape[0] != 2
            or (edge_index.numel() and int(edge_index.max()) >= n)
        ):
            raise ValueError(
                f"edge_index must be [2, E] with feature ids < {n}, got shape "
                f"{tuple(edge_index.shape)}"
            )
        self.sae = sae
        self.cfg = cfg or GraphConfig(n_latents=n, n_edges=edge_index.shape[1])
        if self.cfg.evidence_k <= 0:
            self.cfg.evidence_k = float(sae.cfg.k)
        order = torch.argsort(edge_index[0] * n + edge_index[1])  # sorted by source: CSR lookups
        self.register_buffer("edge_index", edge_index[:, order].contiguous())  # [2, E] src → dst
        self.register_buffer("evidence_k", torch.tensor(self.cfg.evidence_k))
        n_edges = edge_index.shape[1]
        raw = math.log(math.expm1(self.cfg.init_weight))  # softplus⁻¹
        self.weight_raw = nn.Parameter(torch.full((n_edges,), raw))
        self.log_alpha = nn.Parameter(torch.full((n_edges,), self.cfg.init_log_alpha))
        self.conv = ImplicationConv()

    @property
    def n_latents(self) -> int:
        return self.sae.cfg.n_latents

    # ------------------------------------------------------------------ edges

    def edge_weight(self) -> torch.Tensor:  # [E] w ≥ 0
        return nn.functional.softplus(self.weight_raw)

    def gates(self, sample: bool) -> torch.Tensor:
        """[E] hard-concrete gates: a sample when training, the deterministic gate otherwise."""
        if sample:
            u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((u.log() - (-u).log1p() + self.log_alpha) / BETA)
        else:
            s = torch.sigmoid(self.log_alpha)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def open_probability(self) -> torch.Tensor:  # [E] P(z > 0), differentiable
        return torch.sigmoid(self.log_alpha - BETA * math.log(-GAMMA / ZETA))

    def strengths(self, sample: bool = False) -> torch.Tensor:  # [E] s = w·z (0 for pruned edges)
        return self.edge_weight() * self.gates(sample)

    # ------------------------------------------------------------------ forward

    def pre_acts(
        self, x: torch.Tensor, reuse_buffer: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_n, x_c, pre) for raw x: [N, d]; pre is computed without autograd (sparse backward).

        reuse_buffer: write pre into the SAE's training workspace (`SAE.workspace`) instead of a
        fresh [N, n_latents] tensor, whose page faults dominate a step at training widths; pre is
        then only valid until the next call."""
        x_n = x.to(self.sae.W_enc.dtype) * self.sae.cfg.input_scale
        x_c = x_n - self.sae.b_dec
        with torch.no_grad():
            out = self.sae.workspace(x_c.shape[0]) if reuse_buffer else None
            pre = torch.addmm(self.sae.b_enc, x_c, self.sae.W_enc.T, out=out)  # [N, n_latents]
        return x_n, x_c, pre

    def evidence(self, x_c: torch.Tensor, pre: torch.Tensor, train: bool) -> SparseCode:
        with torch.no_grad():
            if train:
                selected = batch_topk_code(pre, float(self.evidence_k), hint=self.sae.cut_hint())
            else:
                rows, cols = (pre > self.sae.threshold).nonzero(as_tuple=True)
                selected = SparseCode(pre[rows, cols], cols, rows, pre.shape[0])
        # selected.values are pre (or its ReLU) at the selected entries: under the ReLU, no
        # re-gather needed
        values = sparse_encode(
            x_c, self.sae.W_enc, self.sae.b_enc, pre, selected.cols, selected.rows, selected.values
        ).relu()
        return selected._replace(values=values)

    def propagate(
        self,
        x_c: torch.Tensor,
        pre: torch.Tensor,
        evidence: SparseCode,
        threshold: torch.Tensor,
        strengths: torch.Tensor,
    ) -> GraphCode:
        """The graph step: evidence features raise the pre-activations of the features they imply.

            pre'_tj = pre_tj + Σ_{i → j} s_ij e_ti        (only edges leaving token t's evidence)
            a_tj    = pre'_tj  if pre'_tj > θ  else 0     (θ: the evidence threshold of this batch)

        An implied feature fires only if the messages lift it over the same threshold the evidence
        had to pass, so sparsity stays adaptive per token. By default messages also add to features
        already in the evidence (magnitude corrections); with `cfg.implied_only` they reach only
        features the encoder left inactive, so an edge's only use is an implication. pre: [N, n] (no
        grad; the values of active nodes are re-gathered with the sparse-backward kernel),
        strengths: [E] (0 = pruned).
        """
        n_rows, n = pre.shape
        entry, edge_id, target_key, evidence_key = self._token_edges(evidence, strengths, n)
        # (index_select: its backward is a fast index_add)
        weight = strengths.index_select(0, edge_id)
        with torch.no_grad():
            targets, target_node = torch.unique(target_key, return_inverse=True)  # [n_targets], [T]
        # [n_targets]
        messages = self.conv(
            evidence.values.unsqueeze(1),
            torch.stack([entry, target_node]),
            weight,
            size=(len(evidence.values), len(targets)),
        ).view(-1)
        with torch.no_grad():
            fired = targets[pre.view(-1)[targets] + messages.detach() > threshold]
            # [nnz] sorted: rows non-decreasing
            keys = torch.unique(torch.cat([evidence_key, fired]))
            at, received = locate(targets, keys)
        rows, cols = keys // n, keys % n
        pre_active = sparse_encode(x_c, self.sae.W_enc, self.sae.b_enc, pre, cols, rows)
        if len(targets):
            pre_active = pre_active + messages.index_select(0, at) * received
        values = pre_active.relu()
        # which token edges reached an active target (for explain and penalties)
        with torch.no_grad():
            from_evidence = locate(evidence_key, keys)[1]
            hit, reached = locate(keys, target_key)
            edge_fired = reached.nonzero().squeeze(1)
            fired_entry, fired_edge = entry[edge_fired], edge_id[edge_fired]
            message = strengths[fired_edge] * evidence.values[fired_entry]
        return GraphCode(
            evidence,
            SparseCode(values, cols, rows, n_rows),
            from_evidence,
            fired_entry,
            hit[edge_fired],
            fired_edge,
            message,
        )

    def _token_edges(
        self, evidence: SparseCode, strengths: torch.Tensor, n: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The token-level edges of a batch: every live edge leaving an evidence entry, as (entry
        [T] into the evidence, edge_id [T] into the feature edges, target key [T] = token · n +
        feature), and the evidence's own keys [nnz_e] (sorted: codes are row-major)."""
        src, dst = self.edge_index[0], self.edge_index[1]
        # [E_live] feature edges that can carry a message
        live = (strengths > 0).nonzero().squeeze(1)
        entry, nth_live = expand_out_edges(src[live], n, evidence.cols)
        edge_id = live[nth_live]  # [T] token edge -> feature edge
        target_key = evidence.rows[entry] * n + dst[edge_id]  # [T] flat (token, feature) index
        evidence_key = evidence.rows * n + evidence.cols  # [nnz_e] sorted (row-major codes)
        if self.cfg.implied_only:  # drop token edges into evidence nodes
            keep = ~locate(evidence_key, target_key)[1]
            entry, edge_id, target_key = entry[keep], edge_id[keep], target_key[keep]
        return entry, edge_id, target_key, evidence_key

    def decode_n(self, code: SparseCode) -> torch.Tensor:  # normalised-space reconstruction [N, d]
        return (
            sparse_decode(code.values, code.cols, code.rows, self.sae.W_dec, code.n_rows)
            + self.sae.b_dec
        )

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> GraphCode:
        """Inference: evidence by the learned threshold θ, then the graph step with
        deterministic gates.

        Rows above the SAE's `max_input_norm` (massive activations) get no code, as in
        `SAE.encode`.
        """
        _, x_c, pre = self.pre_acts(x)
        evidence = self.evidence(x_c, pre, train=False)
        skipped = self.sae.passthrough(x)
        if bool(skipped.any()):
            keep = ~skipped[evidence.rows]
            evidence = SparseCode(
                evidence.values[keep], evidence.cols[keep], evidence.rows[keep], evidence.n_rows
            )
        return self.propagate(x_c, pre, evidence, self.sae.threshold, self.strengths(sample=False))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw-space reconstruction of raw x: [N, d]; passthrough rows come back unchanged."""
        recons = self.decode_n(self.encode(x).code) / self.sae.cfg.input_scale
        return torch.where(self.sae.passthrough(x)[:, None], x.to(recons.dtype), recons)

    def training_forward(
        self,
        x: torch.Tensor,
        dead: torch.Tensor | None = None,
        aux_k: int = 0,
        detach_penalty: bool = False,
    ) -> GraphOutput:
        """Losses of one batch of raw x: [N, d] (gates sampled, evidence by batch budget k_e).

        detach_penalty: the absorption penalty's strengths carry no gradient (see
        absorption_penalty)."""
        x_n, x_c, pre = self.pre_acts(x, reuse_buffer=True)
        evidence = self.evidence(x_c, pre, train=True)
        self.sae.update_threshold(evidence.values.detach())
        strengths = self.strengths(sample=True)
        threshold = evidence.values.detach().min() if len(evidence.values) else pre.new_tensor(0.0)
        graph_code = self.propagate(x_c, pre, evidence, threshold, strengths)
        recons_n = self.decode_n(graph_code.code)
        loss = fvu(x_n, recons_n)
        aux = x_n.new_zeros(())
        if dead is not None and aux_k > 0 and bool(dead.any()):
            aux = self.sae.aux_loss(x_n - recons_n.detach(), x_c, pre, dead, aux_k, None)
        edge_l0 = self.open_probability().sum() / self.n_latents
        recons = recons_n.detach() / self.sae.cfg.input_scale
        penalty_strengths = strengths.detach() if detach_penalty else strengths
        absorption = self.absorption_penalty(penalty_strengths, torch.unique(graph_code.edge_id))
        return GraphOutput(recons, graph_code, loss, aux, edge_l0, absorption)

    def absorption_penalty(
        self, strengths: torch.Tensor, edges: torch.Tensor, max_edges: int = 8192
    ) -> torch.Tensor:
        """Σ over the given edges i → j of s_ij · relu(cos(d_i, d_j))²  / n_latents.

        If i implies j, j's direction arrives through the edge; a child decoder d_i that
        still copies its parent's d_j would let the child stand in for the parent
        (absorption). Decoder rows are unit norm, so cos is a dot product. Training can pass
        detached strengths (`detach_penalty`): with their gradient, the cheapest way to
        lower the penalty is to close the edges whose decoders overlap, i.e. the very child
        → parent edges that should exist; detached, the penalty only moves the decoders
        apart, more so the more an edge carries. Training passes the edges that fired in the
        batch: the ones in use, and far fewer than all E (gathering E·d decoder entries
        would dominate a step); beyond max_edges of them (early in training, when most gates
        are open) a random subset, scaled up, stands in for all.
        """
        scale = 1.0
        if len(edges) > max_edges:  # an unbiased estimate from a random subset bounds the cost
            scale = len(edges) / max_edges
            edges = edges[torch.randperm(len(edges), device=edges.device)[:max_edges]]
        src, dst = self.edge_index[0, edges], self.edge_index[1, edges]
        # index_select: its backward is an index_add, not a sorting index_put
        W_dec = self.sae.W_dec
        cos = (W_dec.index_select(0, src) * W_dec.index_select(0, dst)).sum(1)  # [len(edges)]
        return scale * (strengths.index_select(0, edges) * cos.relu().pow(2)).sum() / self.n_latents

    @torch.no_grad()
    def adapt_evidence_budget(self, post_l0: float, rate: float = 0.1) -> None:
        """Move k_e so that the post-propagation L0 approaches the target k (= sae.cfg.k)."""
        k = float(self.sae.cfg.k)
        self.evidence_k.copy_((self.evidence_k + rate * (k - post_l0)).clamp(1.0, k))

    def active_edges(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(edge_index [2, E_open], strength [E_open]) of the edges whose deterministic gate is
        open."""
        strengths = self.strengths(sample=False).detach()
        keep = strengths > 0
        return self.edge_index[:, keep], strengths[keep]
