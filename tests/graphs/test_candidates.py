"""Decoder-geometry candidate edges (graphs.candidates) on the planted hierarchy."""

from __future__ import annotations

import torch

from graphs.candidates import geometry_candidates, union_edges
from graphs.eval.planted import PlantedHierarchy, PlantedHierarchyConfig


def test_geometry_candidates_contain_planted_child_to_parent_edges() -> None:
    """Children planted at cos 0.5 with their parent: with the dictionary as decoder, every
    child → parent edge is among the child's top-3 cosine neighbours (its siblings share only
    0.25 through the parent), without self-edges; chunking does not change the result."""
    planted = PlantedHierarchy.build(PlantedHierarchyConfig(parent_child_cos=0.5))
    edges = geometry_candidates(planted.dictionary, m=3, min_cos=0.3)
    n = planted.n_true
    keys = edges[0] * n + edges[1]
    assert bool(torch.isin(planted.edge_index[0] * n + planted.edge_index[1], keys).all())
    assert not bool((edges[0] == edges[1]).any()) and int(torch.bincount(edges[0]).max()) <= 3
    # the same set of edges
    chunked = geometry_candidates(planted.dictionary, m=3, min_cos=0.3, chunk=7)
    # compared as sets: a parent's three children tie at cos 0.5, so their order within the row
    # follows floating-point noise
    assert torch.equal(torch.sort(chunked[0] * n + chunked[1]).values, torch.sort(keys).values)
    # unrelated features stay out: no pair of free features is that close
    free = n - planted.config.n_free
    assert not bool(((edges[0] >= free) & (edges[1] >= free)).any())
    both = union_edges(edges, planted.edge_index, n)
    assert both.shape[1] == len(
        torch.unique(torch.cat([keys, planted.edge_index[0] * n + planted.edge_index[1]]))
    )
