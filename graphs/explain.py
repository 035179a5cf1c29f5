"""Reasoning paths: each next-token prediction as token → features(l) → features(l+Δ) → logit.

For every position t of a text (forward passes only, no backward):

    evidence  e_t        active features of the graph autoencoder at layer l before the graph step
    implied              features the graph step added, with the edges (and messages) that
                         raised them
    paths     i → j → y  weight = (W_ij s_ti) · u_j(y_t):  the transition's message from source i
                         to active target j, times j's direct effect on the predicted token y_t
    direct    i → y      weight = a_ti · u_i(y_t)  (the source feature's own direct effect)

The direct effect of a feature with raw decoder direction d (= W_dec row / input_scale) on token y
is the linearised path through the final norm: u(y) = (d ⊙ g) · W_U[y] / rms_t, with g the norm's
effective weight and rms_t the token's final-residual RMS (for LayerNorm families d and the
residual are centred first and rms_t is their std; see `sae.families.Readout`). Effects are in
pre-soft-cap logit units (Gemma 2/3 soft-cap the final logits; tanh is monotonic, so rankings
hold). Layers after the feature's are ignored (it is the "direct" effect, as in logit-lens
attributions); `graphs.eval.faithfulness` tests paths by intervention.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from graphs.crosslayer import TransitionGraph
from graphs.io import load_graph_sae
from graphs.model import GraphCode, SparseGraphAutoencoder, locate
from sae.hooks import hook_layer
from sae.io import load_sae
from sae.models import LoadedModel
from sae.sae import SAE, SparseCode

# [batch, seq, d] -> same, applied to a layer's output
Edit = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ForwardResult:
    resid: dict[int, torch.Tensor]  # layer -> [batch, seq, d] resid_post
    logits: torch.Tensor  # [batch, seq, vocab]
    final_rms: torch.Tensor  # [batch, seq] the final norm's divisor (RMS, or std for LayerNorm)


def run_model(
    model: LoadedModel,
    tokens: torch.Tensor,
    layers: list[int],
    edits: dict[int, Edit] | None = None,
    grad: bool = False,
) -> ForwardResult:
    """One forward of the HF twin with resid_post captured at `layers` and optional output edits.

    `edits[layer]` rewrites that block's output (an intervention); everything downstream sees it.
    """
    family = model.family
    blocks, readout, seen, handles = family.blocks(model.fast), family.readout(model.fast), {}, []

    def at_block(layer: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if edits and layer in edits:
                hidden = edits[layer](hidden)
            seen[layer] = hidden
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    def at_norm(module, args):
        seen["rms"] = readout.scale(args[0])

    for layer in sorted(set(layers) | set(edits or {})):
        handles.append(blocks[layer].register_forward_hook(at_block(layer)))
    handles.append(family.final_norm_module(model.fast).register_forward_pre_hook(at_norm))
    try:
        with torch.set_grad_enabled(grad):
            logits = model.fast(tokens.to(model.device), use_cache=False).logits.float()
    finally:
        for handle in handles:
            handle.remove()
    return ForwardResult({layer: seen[layer] for layer in layers}, logits, seen["rms"])


def logit_effects(
    model: LoadedModel,
    sae_cfg,
    W_dec: torch.Tensor,
    features: torch.Tensor,
    tokens: torch.Tensor,
    rms: torch.Tensor,
) -> torch.Tensor:
    """u_f(y) for paired features [P], predicted tokens [P] and final RMS [P] -> [P]."""
    readout = model.family.readout(model.fast)
    directions = readout.project(W_dec[features].float() / sae_cfg.input_scale)  # [P, d]
    return (directions * readout.W_U[tokens].float()).sum(1) / rms


@dataclass
class Explainer:
    """A model, its graph autoencoder at layer l, and optionally a transition to an SAE at l + Δ."""

    model: LoadedModel
    source: SparseGraphAutoencoder | SAE  # a plain SAE explains as a graph without edges
    target: SAE | None = None
    transition: TransitionGraph | None = None

    @property
    def source_sae(self) -> SAE:
        return self.source.sae if isinstance(self.source, SparseGraphAutoencoder) else self.source

    def source_code(self, x: torch.Tensor) -> GraphCode:
        if isinstance(self.source, SparseGraphAutoencoder):
            return self.source.encode(x)
        code = self.source.encode(x)
        none = code.cols[:0]
        return GraphCode(
            code,
            code,
            torch.ones_like(code.cols, dtype=torch.bool),
            none,
            none,
            none,
            code.values[:0],
        )

    def __post_init__(self) -> None:
        if (self.target is None) != (self.transition is None):
            raise ValueError("pass both target (the layer l+Δ SAE) and transition, or neither")
        d_model = self.model.hf.config.hidden_size
        if self.source_sae.cfg.d_in != d_model:
            raise ValueError(
                f"the source reads d_in {self.source_sae.cfg.d_in}, {self.model.name} has d_model "
                f"{d_model}"
            )
        self.source_layer = hook_layer(self.source_sae.cfg.hook)
        self.target_layer = hook_layer(self.target.cfg.hook) if self.target is not None else None
        if not str(self.source_sae.cfg.hook).endswith("hook_resid_post"):
            raise ValueError(
                f"explain reads resid_post hooks; the source is at {self.source_sae.cfg.hook}"
            )

    def tokens(self, text: str) -> torch.Tensor:
        if not text.strip():
            raise ValueError("explain needs a non-empty text")
        ids = self.model.tokenizer(text, add_special_tokens=False)["input_ids"]
        return torch.tensor([[self.model.tokenizer.bos_token_id, *ids]])  # [1, 1 + T]

    @torch.no_grad()
    def codes(self, tokens: torch.Tensor) -> tuple[ForwardResult, GraphCode, SparseCode | None]:
        layers = [self.source_layer] + ([self.target_layer] if self.target is not None else [])
        result = run_model(self.model, tokens, layers)
        # BOS is never encoded
        graph_code = self.source_code(result.resid[self.source_layer][0, 1:])
        target = (
            self.target.encode(result.resid[self.target_layer][0, 1:])
            if self.target is not None
            else None
        )
        return result, graph_code, target

    @torch.no_grad()
    def explain(self, text: str, top_features: int = 8, top_paths: int = 5) -> dict:
        """JSON-serialisable explanation of every next-token prediction in `text`."""
        tokens = self.tokens(text)
        result, graph_code, target = self.codes(tokens)
        predicted = result.logits[0, 1:].argmax(-1)  # [T] what the model predicts after each token
        probs = result.logits[0, 1:].softmax(-1)
        rms = result.final_rms[0, 1:]
        paths = self.paths(graph_code.code, target, predicted, rms) if target is not None else None
        direct = self.direct(graph_code.code, predicted, rms)
        decode = self.model.tokenizer.decode
        positions = []
        for t in range(len(predicted)):
            positions.append(
                {
                    "position": t + 1,
                    "token": decode([int(tokens[0, t + 1])]),
                    "predicted": decode([int(predicted[t])]),
                    "probability": round(float(probs[t, predicted[t]]), 4),
                    **_features_at(graph_code, t, top_features),
                    "paths": _top_paths(paths, t, top_paths) if paths is not None else [],
                    "direct": _top_direct(direct, graph_code.code, t, top_paths),
                }
            )
        return {
            "text": text,
            "model": self.model.name,
            "source_hook": self.source_sae.cfg.hook,
            "target_hook": self.target.cfg.hook if self.target is not None else None,
            "positions": positions,
        }

    @torch.no_grad()
    def predictions(
        self,
        code: SparseCode,
        target: SparseCode | None,
        predicted: torch.Tensor,
        rms: torch.Tensor,
        top: int = 5,
    ) -> list[dict]:
        """Top paths and direct effects toward given tokens, one dict per row of `code` (the serving
        hook's entry point: it has the codes already and knows which token was sampled)."""
        paths = self.paths(code, target, predicted, rms) if target is not None else None
        direct = self.direct(code, predicted, rms)
        return [
            {
                "paths": _top_paths(paths, t, top) if paths is not None else [],
                "direct": _top_direct(direct, code, t, top),
            }
            for t in range(code.n_rows)
        ]

    def direct(self, code: SparseCode, predicted: torch.Tensor, rms: torch.Tensor) -> torch.Tensor:
        """[nnz] a_ti · u_i(y_t) for every active source entry."""
        sae = self.source_sae
        effect = logit_effects(
            self.model, sae.cfg, sae.W_dec, code.cols, predicted[code.rows], rms[code.rows]
        )
        return code.values * effect

    def paths(
        self, source: SparseCode, target: SparseCode, predicted: torch.Tensor, rms: torch.Tensor
    ) -> dict:
        """All token edges source i → active target j with their path weights toward y_t."""
        entry, edge_id, target_key, message = self.transition.token_edges(source)
        n_t = self.transition.n_target
        active_keys = target.rows * n_t + target.cols
        order = torch.argsort(active_keys)  # TopK codes are not sorted by column within a row
        pos, hit = locate(active_keys[order], target_key)
        hit &= message != 0  # edges the L1 fit pruned carry nothing
        entry, edge_id, message, target_entry = (
            entry[hit],
            edge_id[hit],
            message[hit],
            order[pos[hit]],
        )
        rows = source.rows[entry]
        effect = logit_effects(
            self.model,
            self.target.cfg,
            self.target.W_dec,
            target.cols[target_entry],
            predicted[rows],
            rms[rows],
        )
        return {
            "row": rows,
            "source": source.cols[entry],
            "target": target.cols[target_entry],
            "message": message,
            "target_act": target.values[target_entry],
            "logit_effect": effect,
            "weight": message * effect,
            "edge_weight": self.transition.weight[edge_id],
            "source_act": source.values[entry],
        }


def _features_at(graph_code: GraphCode, t: int, top: int) -> dict:
    evidence = graph_code.evidence
    on = (evidence.rows == t).nonzero().squeeze(1)
    on = on[torch.argsort(evidence.values[on], descending=True)[:top]]
    code = graph_code.code
    implied_nodes = ((code.rows == t) & ~graph_code.from_evidence).nonzero().squeeze(1)
    implied = []
    for node in implied_nodes[
        torch.argsort(code.values[implied_nodes], descending=True)[:top]
    ].tolist():
        into = (graph_code.edge_dst == node).nonzero().squeeze(1)
        sources = [
            [int(evidence.cols[graph_code.edge_src[e]]), round(float(graph_code.message[e]), 4)]
            for e in into.tolist()
        ]
        implied.append(
            {
                "feature": int(code.cols[node]),
                "activation": round(float(code.values[node]), 4),
                "from": sources,
            }
        )
    return {
        "evidence": [
            [int(evidence.cols[i]), round(float(evidence.values[i]), 4)] for i in on.tolist()
        ],
        "implied": implied,
        "l0_evidence": int(len((evidence.rows == t).nonzero())),
        "l0": int(((code.rows == t) & (code.values > 0)).sum()),
    }


def _top_paths(paths: dict, t: int, top: int) -> list[dict]:
    on = (paths["row"] == t).nonzero().squeeze(1)
    on = on[torch.argsort(paths["weight"][on].abs(), descending=True)[:top]]
    keys = (
        "source",
        "target",
        "weight",
        "source_act",
        "edge_weight",
        "message",
        "target_act",
        "logit_effect",
    )
    return [
        {
            k: (int(paths[k][i]) if k in ("source", "target") else round(float(paths[k][i]), 5))
            for k in keys
        }
        for i in on.tolist()
    ]


def _top_direct(direct: torch.Tensor, code: SparseCode, t: int, top: int) -> list[dict]:
    on = (code.rows == t).nonzero().squeeze(1)
    on = on[torch.argsort(direct[on].abs(), descending=True)[:top]]
    return [
        {"feature": int(code.cols[i]), "weight": round(float(direct[i]), 5)} for i in on.tolist()
    ]


def load_explainer(
    model: LoadedModel, graph_dir: str, transition_dir: str | None = None
) -> Explainer:
    """An Explainer from a graph autoencoder directory and, optionally, a transition directory
    (whose transition.json names the target SAE)."""
    source = load_graph_sae(graph_dir)
    if source.sae.cfg.weights_sha256 and source.sae.cfg.weights_sha256 != model.weights_sha256:
        raise ValueError(
            f"{graph_dir} was trained on {source.sae.cfg.model}'s activations, not {model.name}'s"
        )
    if transition_dir is None:
        return Explainer(model, source)
    transition, meta = TransitionGraph.load(transition_dir)
    if meta["source_hook"] != source.sae.cfg.hook or transition.n_source != source.n_latents:
        raise ValueError(
            f"{transition_dir} was fitted from {meta['source_hook']} ({transition.n_source} "
            "features), "
            f"not from this graph ({source.sae.cfg.hook}, {source.n_latents})"
        )
    return Explainer(model, source, load_sae(meta["target"]), transition)


@torch.no_grad()
def top_logits(
    model: LoadedModel, sae: SAE, features: torch.Tensor, k: int = 10, chunk: int = 512
) -> dict:
    """Each feature's direct effect on the logits, (W_dec_f ⊙ g) · W_U (centred first for LayerNorm
    families), summarised by its top and
    bottom k tokens. features: [F] -> {"top": (values [F, k], ids [F, k]), "bottom": (...)}.
    Chunked over features: the full [n_latents, vocab] matrix would be 1.8 GB for SmolLM2."""
    readout = model.family.readout(model.fast)
    W_U = readout.W_U.float()  # [vocab, d]
    tops, bottoms = [], []
    for start in range(0, len(features), chunk):
        directions = readout.project(sae.W_dec[features[start : start + chunk]])  # [c, d]
        effects = directions @ W_U.T  # [c, vocab]
        tops.append(effects.topk(k, dim=1))
        bottoms.append((-effects).topk(k, dim=1))
    top = (torch.cat([t.values for t in tops]), torch.cat([t.indices for t in tops]))
    bottom = (-torch.cat([b.values for b in bottoms]), torch.cat([b.indices for b in bottoms]))
    return {"top": top, "bottom": bottom}
