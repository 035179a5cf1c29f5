"""greylens.graphs: the white-box reasoning layer on top of SAEs.

    coactivation   `python -m graphs stats`: co-counts of an SAE's latents over a store, resumable
    pair_counter   the sparse counter behind it
    coactivation_scores  CoactivationStats: PMI, NPMI, Jaccard, P(j | i), top-m candidates
    candidates     decoder-geometry candidate edges, joined with the co-activation ones
    residual       missed features (silent latents the residual points at), for --residual stats
    model          SparseGraphAutoencoder: BatchTopK evidence + one message-passing step on a
                   learned sparse implication graph (hard-concrete gated edges)
    train          its trainer (resumable; budgets are post-propagation L0)
    io             graph directories; load_graph -> torch_geometric.data.Data
    coders         AsSAE (a graph autoencoder behind the SAE interface), batched sparse encoding
    parents        label-free parent latents (cross-cutting pick of token-mean latents) and edges
    token_means    per token type, the mean SAE input, and the small TopK SAE on those means
    crosslayer     transition graph between the codes of layer l and layer l + Δ
    explain        reasoning paths token -> features(l) -> features(l+Δ) -> predicted token
    first_letter   what counts as a word and its first letter (parents, eval and probes share it)
    logistic       the one logistic-regression fit (probes and the letter evaluation share it)
    eval/          what a user runs on their own SAE or graph: reconstruction, first-letter
                   absorption, planted hierarchy, faithfulness (`python -m graphs eval`)
    release/       feature-dataset export, load_release, the offline dashboard

Command line: `python -m graphs stats|parents|train|transition|explain|eval|export|dashboard`.
"""

from graphs.release.load import Release, load_release

__all__ = ["Release", "load_release"]
