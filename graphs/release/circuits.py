"""A greylens explanation (graphs.explain) as circuit-tracer graph JSON.

Nodes: per position an embedding node and a logit node, and feature nodes (layer, feature,
position) with their role (evidence, implied, target). Links: embedding → evidence (activation),
evidence → implied (message), source → target (transition message), target / source → logit
(direct effect). A link reached twice keeps its last weight.
"""

from __future__ import annotations

from sae.hooks import hook_layer


class _Graph:
    """Nodes by id (insertion order is the output order) and links, as they are reached."""

    def __init__(self, labels: list[str], source_layer: int) -> None:
        self.nodes: dict[str, dict] = {}
        self.links: list[dict] = []
        self.labels, self.source_layer = labels, source_layer

    def feature(
        self, layer: int, f: int, ctx: int, role: str, activation: float | None = None
    ) -> str:
        """The id of feature f's node at (layer, ctx), made on first use (last activation wins)."""
        node_id = f"{layer}_{f}_{ctx}"
        is_source = layer == self.source_layer and f < len(self.labels)
        node = self.nodes.setdefault(
            node_id,
            {
                "node_id": node_id,
                "feature": f,
                "layer": str(layer),
                "ctx_idx": ctx,
                "feature_type": "sae feature",
                "jsNodeId": node_id,
                "role": role,
                "clerp": self.labels[f] if is_source else "",
                "activation": activation,
                "is_target_logit": False,
            },
        )
        if activation is not None:
            node["activation"] = activation
        return node_id

    def link(self, source: str, target: str, weight: float) -> None:
        self.links.append({"source": source, "target": target, "weight": weight})

    def token_nodes(self, p: dict, n_layers: int) -> tuple[str, str]:
        """The embedding and logit nodes of position p; returns their ids."""
        ctx = p["position"]
        emb, logit = f"E_{ctx}", f"{n_layers}_{ctx}"
        self.nodes[emb] = {
            "node_id": emb,
            "feature": None,
            "layer": "E",
            "ctx_idx": ctx,
            "feature_type": "embedding",
            "jsNodeId": emb,
            "clerp": p["token"],
            "is_target_logit": False,
        }
        self.nodes[logit] = {
            "node_id": logit,
            "feature": None,
            "layer": str(n_layers),
            "ctx_idx": ctx,
            "feature_type": "logit",
            "jsNodeId": logit,
            "clerp": p["predicted"],
            "token_prob": p["probability"],
            "is_target_logit": True,
        }
        return emb, logit


def _position_links(graph: _Graph, p: dict, n_layers: int, target: int | None) -> None:
    """Every node and link of one explained position."""
    ctx, source = p["position"], graph.source_layer
    emb, logit = graph.token_nodes(p, n_layers)
    for f, act in p["evidence"]:
        graph.link(emb, graph.feature(source, f, ctx, "evidence", act), act)
    for implied in p["implied"]:
        node = graph.feature(source, implied["feature"], ctx, "implied", implied["activation"])
        for s, message in implied["from"]:
            graph.link(graph.feature(source, s, ctx, "evidence"), node, message)
    for path in p["paths"]:
        t = graph.feature(target, path["target"], ctx, "target", path["target_act"])
        s = graph.feature(source, path["source"], ctx, "evidence", path["source_act"])
        graph.link(s, t, path["message"])
        graph.link(t, logit, path["target_act"] * path["logit_effect"])
    for d in p["direct"]:
        graph.link(graph.feature(source, d["feature"], ctx, "evidence"), logit, d["weight"])


def circuit_json(explanation: dict, slug: str, labels: list[str], n_layers: int) -> dict:
    """The graph JSON of one explanation; labels: each source feature's label (its clerp)."""
    source = hook_layer(explanation["source_hook"])
    target = hook_layer(explanation["target_hook"]) if explanation["target_hook"] else None
    graph = _Graph(labels, source)
    for p in explanation["positions"]:
        _position_links(graph, p, n_layers, target)
    unique = {(link["source"], link["target"]): link for link in graph.links}
    return {
        "metadata": {
            "slug": slug,
            "scan": f"greylens/{explanation['model']}/{explanation['source_hook']}",
            "prompt": explanation["text"],
            "prompt_tokens": [p["token"] for p in explanation["positions"]],
            "info": {
                "generator": "greylens graphs.explain",
                "source_hook": explanation["source_hook"],
                "target_hook": explanation["target_hook"],
            },
        },
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both"},
        "nodes": list(graph.nodes.values()),
        "links": list(unique.values()),
    }
