"""The release's tables and documents, built from the scan: features, examples and edges as a
`datasets.DatasetDict`, heuristic labels, the dataset card, Neuronpedia-style feature JSON and
circuit-tracer-style graph JSON.

Columns (one row per ...):

    features  feature: density, fire_count, mean_activation (over the tokens it fires on),
              max_activation, dead, hist_counts (log-spaced bins, edges in release.json),
              top/bottom_logit_{tokens,ids,values} (decoder · final norm · unembedding),
              graph_out/in(+_weight) (learned implication edges), coactivation(+_npmi),
              crosslayer_out(+_weight) (transition edges to the later layer), label,
              label_is_heuristic, top_tokens
    examples  chosen token: feature, kind ("top" | "quantile"), rank, band, band_min, band_max,
              activation, row, doc_id, position, focus, token_ids, tokens, activations
    edges     edge: src, dst, weight, kind ("graph" | "coactivation" | "crosslayer"), src_hook,
              dst_hook
"""

from __future__ import annotations

import json
from collections import Counter

import datasets
import numpy as np
import pyarrow as pa
import torch

from graphs.release.load import NO_GRAPH
from graphs.release.scan import Examples

HEURISTIC_LABEL = (
    "most frequent tokens at the peak of the top-k activating contexts "
    "(heuristic, not model-written)"
)


def to_dataset(columns: dict[str, pa.Array | list]) -> datasets.Dataset:
    table = pa.table({k: v if isinstance(v, pa.Array) else pa.array(v) for k, v in columns.items()})
    return datasets.Dataset(datasets.table.InMemoryTable(table))


def ragged(
    offsets: torch.Tensor, flat: np.ndarray | list, kind: pa.DataType | None = None
) -> pa.Array:
    """A list column from offsets [R + 1] and flat values [offsets[-1]]."""
    return pa.ListArray.from_arrays(
        pa.array(offsets.numpy().astype(np.int32)), pa.array(flat, type=kind)
    )


def top_per_source(
    src: torch.Tensor,
    dst: torch.Tensor,
    weight: torch.Tensor,
    n: int,
    top: int,
    by_abs: bool = True,
) -> tuple[pa.Array, pa.Array]:
    """Each source's `top` edges by |weight| (or weight), as two list columns of length n."""
    key = weight.abs() if by_abs else weight
    by_key = torch.argsort(-key.double(), stable=True)
    order = by_key[torch.argsort(src[by_key], stable=True)]
    per_src = torch.bincount(src, minlength=n)
    rank = torch.arange(len(order)) - (torch.cumsum(per_src, 0) - per_src).repeat_interleave(
        per_src
    )
    keep = order[rank < top]
    counts = torch.bincount(src[keep], minlength=n)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)])
    return ragged(offsets, dst[keep].numpy()), ragged(offsets, weight[keep].float().numpy())


def edges_table(
    graph: tuple | None,
    coactivation: tuple | None,
    crosslayer: tuple | None,
    hook: str,
    target_hook: str,
) -> datasets.Dataset:
    """Each argument: (src [E], dst [E], weight [E]) or None."""
    parts = [
        (graph, "graph", hook),
        (coactivation, "coactivation", hook),
        (crosslayer, "crosslayer", target_hook),
    ]
    cols: dict[str, list] = {
        "src": [],
        "dst": [],
        "weight": [],
        "kind": [],
        "src_hook": [],
        "dst_hook": [],
    }
    for edges, kind, dst_hook in parts:
        if edges is None:
            continue
        src, dst, weight = edges
        cols["src"].append(src.numpy())
        cols["dst"].append(dst.numpy())
        cols["weight"].append(weight.float().numpy())
        cols["kind"] += [kind] * len(src)
        cols["src_hook"] += [hook] * len(src)
        cols["dst_hook"] += [dst_hook] * len(src)
    for key in ("src", "dst"):
        cols[key] = pa.array(
            np.concatenate(cols[key]) if cols[key] else np.zeros(0, np.int64), type=pa.int64()
        )
    cols["weight"] = pa.array(
        np.concatenate(cols["weight"]) if cols["weight"] else np.zeros(0, np.float32)
    )
    for key in ("kind", "src_hook", "dst_hook"):  # typed even when a lone SAE has no edges
        cols[key] = pa.array(cols[key], pa.string())
    return to_dataset(cols)


def examples_table(
    examples: Examples,
    acts: torch.Tensor,
    token_ids: torch.Tensor,
    docs: torch.Tensor,
    positions: torch.Tensor,
    vocab: np.ndarray,
) -> datasets.Dataset:
    """acts: [sum L] per-window activations; token_ids/docs/positions: [n_tokens] store columns;
    vocab: token id -> decoded string (object array)."""
    window_ids = token_ids[examples.window_rows].numpy()  # [sum L]
    return to_dataset(
        {
            "feature": pa.array(examples.feature.numpy()),
            "kind": examples.kind,
            "rank": pa.array(examples.rank.numpy()),
            "band": pa.array(examples.band.numpy()),
            "band_min": _nullable(examples.band_min),
            "band_max": _nullable(examples.band_max),
            "activation": pa.array(examples.activation.float().numpy()),
            "row": pa.array(examples.row.numpy()),
            "doc_id": pa.array(docs[examples.row].numpy()),
            "position": pa.array(positions[examples.row].numpy()),
            "focus": pa.array(examples.focus.numpy()),
            "token_ids": ragged(examples.offsets, window_ids),
            "tokens": ragged(examples.offsets, vocab[window_ids], pa.string()),
            "activations": ragged(examples.offsets, acts.float().numpy()),
        }
    )


def _nullable(values: torch.Tensor) -> pa.Array:
    """float32 column with null where values are nan (band bounds of top examples: no band)."""
    return pa.array(values.float().numpy(), mask=values.isnan().numpy())


def heuristic_labels(
    examples: Examples, token_ids: torch.Tensor, vocab: np.ndarray, n: int
) -> tuple[list[str], list[list[str]]]:
    """A short label per feature from the tokens its top-k contexts peak on, and those tokens."""
    peaks: list[Counter] = [Counter() for _ in range(n)]
    for f, kind, row in zip(
        examples.feature.tolist(), examples.kind, examples.row.tolist(), strict=True
    ):
        if kind == "top":
            peaks[f][_readable(vocab[int(token_ids[row])])] += 1
    labels, tops = [], []
    for counts in peaks:
        common = counts.most_common(3)
        tops.append([t for t, _ in common])
        labels.append(" / ".join(f"{t!r}" for t, _ in common) if common else "(never fired)")
    return labels, tops


def _readable(token: str) -> str:
    stripped = token.strip()
    return stripped if stripped else {"\n": "⏎", " ": "␣", "\t": "⇥"}.get(token[:1], "␣")


def features_table(
    scan,
    logits: dict[str, torch.Tensor],
    vocab: np.ndarray,
    neighbours: dict[str, tuple],
    labels: list[str],
    top_tokens: list[list[str]],
    scored: int,
) -> datasets.Dataset:
    """scan: the finished ScanState;
    logits: {top_ids, top_values, bottom_ids, bottom_values} [n, k]."""
    n = len(scan.fire_counts)
    fired = scan.fire_counts.clamp_min(1).double()
    columns = {
        "feature": pa.array(np.arange(n, dtype=np.int64)),
        "density": pa.array((scan.fire_counts.double() / max(scored, 1)).numpy()),
        "fire_count": pa.array(scan.fire_counts.numpy()),
        "mean_activation": pa.array((scan.act_sum / fired).float().numpy()),
        "max_activation": pa.array(scan.act_max.numpy()),
        "dead": pa.array((scan.fire_counts == 0).numpy()),
        "hist_counts": pa.array(list(scan.hist.numpy())),
    }
    for side in ("top", "bottom"):
        ids = logits[f"{side}_ids"]  # [n, k]
        columns[f"{side}_logit_tokens"] = pa.array([list(vocab[row]) for row in ids.numpy()])
        columns[f"{side}_logit_ids"] = pa.array(list(ids.numpy()))
        columns[f"{side}_logit_values"] = pa.array(list(logits[f"{side}_values"].float().numpy()))
    for name, (targets, weights) in neighbours.items():
        columns[name], columns[f"{name}_weight"] = targets, weights
    columns.update(label=labels, label_is_heuristic=[True] * n, top_tokens=top_tokens)
    return to_dataset(columns)


def dataset_card(card: dict, counts: dict[str, int], has_graph: bool = True) -> str:
    """README.md: YAML header (one config per table), what the release holds, the metric card."""
    header = [
        "---",
        f"license: {card['license']}",
        "tags: [sparse-autoencoder, interpretability, greylens]",
        "configs:",
    ]
    for name in ("features", "examples", "edges"):
        header += [f"- config_name: {name}", f"  data_files: data/{name}.parquet"]
    holds = "statistics, activating contexts, logits" + (
        " and feature-graph edges" if has_graph else f". Feature graph: {NO_GRAPH}"
    )
    rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in card.items() if k != "title")
    circuits = "- `circuits/<slug>.json`: circuit-tracer-style graph JSON of explained prompts"
    lines = [
        "---",
        "",
        f"# {card['title']}",
        "",
        f"Sparse-autoencoder features with their {holds}, released by "
        "[greylens](https://github.com/greylens). Load everything with "
        "`graphs.load_release(path)`, or one table with "
        "`datasets.load_dataset('parquet', data_files='data/features.parquet')`.",
        "",
        "## Metric card",
        "",
        "| field | value |",
        "|---|---|",
        rows,
        "",
        "## Tables",
        "",
        *(f"- `{name}`: {count} rows" for name, count in counts.items()),
        "",
        f"See `docs/release.md` in greylens for every column. `label` is heuristic: "
        f"{HEURISTIC_LABEL}.",
        "",
        "## Other files",
        "",
        "- `saelens/<hook>/`: the SAE in SAELens's layout (`SAE.load_from_disk`)",
        "- `neuronpedia/<feature>.json`: Neuronpedia-style feature JSON",
        *([circuits] if has_graph else []),
        "- `dashboard/index.html`: the offline dashboard (open it in a browser)",
        "",
    ]
    return "\n".join(header + lines)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def neuronpedia_feature(
    row: dict, examples: list[dict], model: str, source: str, edges: list[float]
) -> dict:
    """One feature in Neuronpedia's export shape (plus a `greylens` block for what it has no field
    for)."""
    centres = [float(np.sqrt(a * b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    return {
        "modelId": model,
        "layer": source,
        "index": str(row["feature"]),
        "maxActApprox": row["max_activation"],
        "frac_nonzero": row["density"],
        "pos_str": row["top_logit_tokens"],
        "pos_values": row["top_logit_values"],
        "neg_str": row["bottom_logit_tokens"],
        "neg_values": row["bottom_logit_values"],
        "freq_hist_data_bar_heights": row["hist_counts"],
        "freq_hist_data_bar_values": centres,
        "activations": [
            {
                "tokens": e["tokens"],
                "values": e["activations"],
                "maxValue": e["activation"],
                "maxValueTokenIndex": e["focus"],
                "binMin": -1 if e["kind"] == "top" else e["band_min"],
                "binMax": -1 if e["kind"] == "top" else e["band_max"],
                "binContains": e["kind"],
            }
            for e in examples
        ],
        "explanations": [
            {
                "description": row["label"],
                "explanationModelName": "greylens-heuristic-top-tokens",
                "typeName": "heuristic",
            }
        ],
        "greylens": {
            k: row[k]
            for k in (
                "graph_out",
                "graph_out_weight",
                "graph_in",
                "graph_in_weight",
                "coactivation",
                "coactivation_weight",
                "crosslayer_out",
                "crosslayer_out_weight",
            )
            if k in row
        },
    }


def dumps(payload: dict) -> str:
    return json.dumps(payload, ensure_ascii=False, allow_nan=False, default=float)
