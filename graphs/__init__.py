"""greylens.graphs: the white-box reasoning layer on top of SAEs.

    coactivation   feature counts and sparse co-counts of an SAE over a store; top-m candidates
    model          SparseGraphAutoencoder: BatchTopK evidence + one message-passing step on a
                   learned sparse implication graph (hard-concrete gated edges)
    train          its trainer (resumable; budgets are post-propagation L0)
    io             graph directories; load_graph -> torch_geometric.data.Data
    crosslayer     transition graph between the codes of layer l and layer l + Δ
    explain        reasoning paths token -> features(l) -> features(l+Δ) -> predicted token
    faithfulness   edges checked by ablation, paths against gradient × activation
    evaluate       graph metrics, the SAE-shaped adapter for splicing, edge Jaccard
    synthetic      planted feature hierarchy (ground truth) and edge-recovery scoring
    letters        first-letter absorption and sparse-probing metrics
    parents        label-free parent latents (token-mean SAE, cross-cutting pick) and their edges
    release        feature-dataset export (release_scan, release_tables, release_build) and load_release
    dashboard      the release's offline HTML dashboard

Command line: `python -m graphs stats|parents|train|transition|explain|eval|export|dashboard`.
"""

_RELEASE = ("load_release", "export_release", "ExportConfig", "Release")
__all__ = list(_RELEASE)


def __getattr__(name: str):
    """`from graphs import load_release` without importing the release machinery on `import graphs`."""
    if name in _RELEASE:
        from graphs import release

        return getattr(release, name)
    raise AttributeError(f"module 'graphs' has no attribute {name!r}")
