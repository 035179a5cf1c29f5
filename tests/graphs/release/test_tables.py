"""The release's tables (graphs.release.tables): logits, heuristic labels and edges."""

from __future__ import annotations

from pathlib import Path

from graphs.io import load_graph
from graphs.release import load_release
from sae.io import load_sae
from sae.models import LoadedModel
from tests.graphs.conftest import SOURCE_HOOK, TARGET_HOOK, TinyGraph


def test_logits_labels_and_edges(
    tiny_release: Path, tiny: LoadedModel, tiny_graph: TinyGraph
) -> None:
    release = load_release(tiny_release)
    features = release.data["features"]
    sae = load_sae(tiny_graph.sae_dirs / SOURCE_HOOK)
    # [n, vocab]
    effects = (sae.W_dec.detach() * tiny.fast.model.norm.weight) @ tiny.fast.lm_head.weight.T
    assert features["top_logit_ids"][3] == effects[3].topk(10).indices.tolist()
    assert features["bottom_logit_ids"][3] == (-effects[3]).topk(10).indices.tolist()
    assert all(features["label_is_heuristic"]) and features["label"][0]
    edges = release.data["edges"].to_pandas()
    graph = load_graph(tiny_graph.graph)
    ours = edges[edges.kind == "graph"]
    assert sorted(zip(ours.src, ours.dst, strict=True)) == sorted(
        map(tuple, graph.edge_index.T.tolist())
    )
    assert set(edges[edges.kind == "crosslayer"].dst_hook) == {TARGET_HOOK}
    assert (edges.kind == "coactivation").any()
    some = int(ours.src.iloc[0])
    assert set(features["graph_out"][some]) <= set(ours[ours.src == some].dst)
