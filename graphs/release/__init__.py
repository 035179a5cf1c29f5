"""greylens.graphs.release: feature datasets of an SAE (and its graph), with an offline dashboard.

    load        load_release(path) -> Release; imports neither the export nor the dashboard
    export      ExportConfig, export_release: `python -m graphs export`, atomic and resumable
    inputs      every export input loaded and cross-checked before any work starts
    build       the export's stages, in order; the dashboard comes last
    scan        the streamed passes: per-feature statistics, then token-level contexts
    tables      the parquet tables, dataset card, Neuronpedia and circuit-tracer JSON
    dashboard   the offline HTML site (`python -m graphs dashboard` rewrites it)

A release directory (format_version 1):

    release.json              metric card, config, histogram edges, counts; "complete": true
    README.md                 dataset card (YAML configs for the three tables + the metric card)
    data/features.parquet     one row per feature       } a datasets.DatasetDict, columns in
    data/examples.parquet     one row per context       } graphs.release.tables
    data/edges.parquet        one row per edge          }
    saelens/<hook>/           the SAE in SAELens's layout (sae.io.export_saelens)
    neuronpedia/<i>.json      Neuronpedia-style feature JSON
    circuits/<slug>.json      circuit-tracer-style graph JSON of each explained prompt (graph only)
    training/*.jsonl          the SAE's (and graph's) training metrics, when they were found
    dashboard/                the offline HTML site
    export_log.jsonl          every checkpoint and finished stage, once each

A release of a lone SAE (no --graph) has no learned edges and no explained prompts; its card,
dataset card and dashboard say so, and it loads like any other (`Release.has_graph` is False).
"""

from graphs.release.load import Release, load_release

__all__ = ["Release", "load_release"]
