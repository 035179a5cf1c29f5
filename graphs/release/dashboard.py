"""The release's offline dashboard: a static HTML site, no network, no CDN.

    dashboard/index.html          metric card, plots, and every feature (search + sort, in JS)
    dashboard/features/<i>.html   one page per feature: stats, histogram, logits, neighbours,
                                  contexts
    dashboard/graph.html          graph viewer: a prompt's reasoning paths (circuits/*.json), in
                                  SVG; not written for a lone SAE's release (no graph, no paths)
    dashboard/assets/             site.css, index.js, graph.js (copied from dashboard_assets/)
    dashboard/data/*.js           the data the pages read, as scripts (file:// pages can't fetch
                                  JSON)
    dashboard/plots/              matplotlib PNGs: training L0/FVU curves, feature density,
                                  activations (per-feature histograms are inline SVG)

`write_dashboard(release_dir)` reads only what the release holds, so it can rebuild the dashboard of
any release (`python -m graphs dashboard --release DIR`).
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from graphs.release.load import NO_GRAPH, Release, load_release

ASSETS = Path(__file__).with_name("dashboard_assets")
E = html.escape


def write_dashboard(release_dir: str | Path) -> Path:
    """Write release_dir/dashboard/ and return the path of its index.html."""
    release = load_release(release_dir, require_complete=False)
    out = Path(release_dir) / "dashboard"
    for sub in ("assets", "data", "features", "plots"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for asset in ASSETS.iterdir():
        shutil.copyfile(asset, out / "assets" / asset.name)
    features = release.data["features"].data.table.to_pylist()
    circuits = release.circuits()
    plots = _summary_plots(release, features, out / "plots")
    _write_index(out, release.card, features, plots, sorted(circuits), release.has_graph)
    if release.has_graph:
        _write_graph_viewer(out, release.card, circuits)
    _feature_pages(out, release, features)
    return out / "index.html"


def _page(
    title: str, body: str, has_graph: bool, depth: int = 0, scripts: tuple[str, ...] = ()
) -> str:
    up = "../" * depth
    links = [f'<a href="{up}index.html">features</a>']
    if has_graph:  # a lone SAE's release has no graph viewer to link to
        links.append(f'<a href="{up}graph.html">graph viewer</a>')
    tags = "".join(f'<script src="{up}{s}"></script>' for s in scripts)
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{E(title)}</title>'
        f'<link rel="stylesheet" href="{up}assets/site.css"></head><body>'
        f"<nav>{' · '.join(links)}</nav>{body}{tags}</body></html>"
    )


def _card_table(card: dict) -> str:
    rows = "".join(
        f"<tr><th>{E(str(k))}</th><td>{E(_fmt(v))}</td></tr>"
        for k, v in card.items()
        if k != "title"
    )
    return f'<table class="card" id="metric-card">{rows}</table>'


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "not measured" if value is None else str(value)


def _data_script(path: Path, name: str, payload) -> None:
    """data/*.js: `window.NAME = {...};` ('</' escaped so no string can close a script tag)."""
    text = json.dumps(payload, ensure_ascii=False).replace("</", "<\\/")
    path.write_text(f"window.{name} = {text};\n")


def _write_index(
    out: Path,
    card: dict,
    features: list[dict],
    plots: list[str],
    slugs: list[str],
    has_graph: bool,
) -> None:
    rows = [
        [
            f["feature"],
            f["label"],
            round(f["density"], 6),
            round(f["max_activation"], 4),
            round(f["mean_activation"], 4),
            " ".join(f["top_logit_tokens"][:5]),
        ]
        for f in features
    ]
    _data_script(out / "data" / "features.js", "GREYLENS_FEATURES", rows)
    images = "".join(f'<img src="{p}" alt="{E(Path(p).stem)}">' for p in plots)
    prompts = "".join(f'<li><a href="graph.html#{E(s)}">{E(s)}</a></li>' for s in slugs)
    explained = (
        f'<h2>Explained prompts</h2><ul id="prompts">{prompts}</ul>'
        if has_graph
        else f'<p class="note" id="no-graph">Feature graph: {E(NO_GRAPH)}.</p>'
    )
    body = (
        f'<h1>{E(card["title"])}</h1>{_card_table(card)}<div class="plots">{images}</div>'
        f"{explained}<h2>Features</h2>"
        '<p class="note">Labels are <span class="heuristic">heuristic</span>: the tokens the top '
        "contexts peak on.</p>"
        '<div class="controls">'
        '<input id="search" type="search" placeholder="search labels, logits, ids">'
        '<select id="sort"><option value="feature">feature id</option>'
        '<option value="density">density ↓</option>'
        '<option value="max">max activation ↓</option>'
        '<option value="mean">mean activation ↓</option>'
        '<option value="label">label</option></select> <span id="count"></span></div>'
        '<table id="features"><thead><tr><th>feature</th><th>label</th><th>density</th>'
        "<th>max act</th><th>mean act</th><th>top logits</th></tr></thead><tbody></tbody></table>"
    )
    scripts = ("data/features.js", "assets/index.js")
    (out / "index.html").write_text(_page(card["title"], body, has_graph, scripts=scripts))


def _write_graph_viewer(out: Path, card: dict, circuits: dict[str, dict]) -> None:
    _data_script(out / "data" / "circuits.js", "GREYLENS_CIRCUITS", circuits)
    body = (
        f"<h1>Reasoning paths · {E(card['hook'])}</h1>"
        '<div class="controls"><select id="prompt"></select> <span id="prompt-text"></span></div>'
        '<p class="note">Click a token: its evidence features, the features the graph implied, '
        "and the paths to the predicted token. Blue links raise, red links lower.</p>"
        '<div id="tokens"></div><div class="viewer"><div id="paths"></div><div class="svg-scroll">'
        '<svg id="graph" xmlns="http://www.w3.org/2000/svg"></svg></div></div>'
    )
    scripts = ("data/circuits.js", "assets/graph.js")
    (out / "graph.html").write_text(_page("graph viewer", body, True, scripts=scripts))


def _summary_plots(release: Release, features: list[dict], out: Path) -> list[str]:
    """plots/training.png (L0 and FVU against training tokens) and plots/density.png."""
    import matplotlib  # here, not at the top: the backend must be chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    curves = {
        name: [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for name in ("sae", "graph")
        if (path := release.path / "training" / f"{name}_metrics.jsonl").exists()
    }
    if any(curves.values()):
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        for ax, key in zip(axes, ("l0", "fvu"), strict=True):
            for name, rows in curves.items():
                points = [(r["tokens"], r[key]) for r in rows if key in r and "tokens" in r]
                ax.plot(
                    [p[0] for p in points],
                    [p[1] for p in points],
                    marker="o" if len(points) < 20 else None,
                    label=name,
                )
            ax.set(title=key.upper() + " during training", xlabel="tokens")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "training.png", dpi=90)
        plt.close(fig)
        written.append("plots/training.png")
    density = np.array([f["density"] for f in features])
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    alive = density[density > 0]
    left.hist(np.log10(alive) if len(alive) else [], bins=40, color="#4c72b0")
    left.set(
        title=f"feature density ({int((density == 0).sum())} never fired)",
        xlabel="log10 firing rate",
        ylabel="features",
    )
    edges = np.array(release.meta["histogram_edges"])
    # [bins] every feature's activations
    total = np.sum([f["hist_counts"] for f in features], axis=0)
    right.bar(edges[:-1], total, width=np.diff(edges), align="edge", color="#dd8452")
    right.set(
        xscale="log",
        title="activations of all features",
        xlabel="activation",
        ylabel="(token, feature) pairs",
    )
    fig.tight_layout()
    fig.savefig(out / "features.png", dpi=90)
    plt.close(fig)
    return [*written, "plots/features.png"]


def histogram_svg(
    counts: list[int], edges: list[float], width: int = 340, height: int = 120
) -> str:
    """A feature's activation histogram as inline SVG (log-spaced bins, the used range only).

    Inline vector rather than a matplotlib PNG per feature: those cost ~70 ms each (10 minutes for
    9,216 features); the summary plots of the index are matplotlib PNGs."""
    counts_a = np.asarray(counts)
    used = counts_a.nonzero()[0]
    if len(used) == 0:
        return "<p>never fired</p>"
    lo, hi = int(used[0]), int(used[-1]) + 1
    shown, top = counts_a[lo:hi], max(int(counts_a.max()), 1)
    plot_h, bar_w = height - 36, (width - 10) / len(shown)
    bars = "".join(
        f'<rect x="{5 + i * bar_w:.1f}" y="{16 + plot_h * (1 - c / top):.1f}" '
        f'width="{max(bar_w - 1, 1):.1f}" height="{plot_h * c / top:.1f}">'
        f"<title>[{edges[lo + i]:.3g}, {edges[lo + i + 1]:.3g}): {c}</title></rect>"
        for i, c in enumerate(shown.tolist())
    )
    return (
        '<svg class="hist" role="img" aria-label="activation histogram" '
        f'width="{width}" height="{height}" '
        f'xmlns="http://www.w3.org/2000/svg"><g fill="#dd8452">{bars}</g>'
        f'<line x1="5" x2="{width - 5}" y1="{16 + plot_h}" y2="{16 + plot_h}" stroke="#555"/>'
        f'<text x="5" y="11">activations (log bins; tallest bin {top} tokens)</text>'
        f'<text x="5" y="{height - 6}">{edges[lo]:.3g}</text><text x="{width - 5}" '
        f'y="{height - 6}" text-anchor="end">'
        f"{edges[hi]:.3g}</text></svg>"
    )


def _feature_pages(out: Path, release: Release, features: list[dict]) -> None:
    examples = release.data["examples"].data.table
    offsets = release.meta["example_offsets"]
    chunk = 256
    for start in tqdm(
        range(0, len(features), chunk), desc="dashboard: feature pages", unit="chunk"
    ):
        lo, hi = offsets[start], offsets[min(start + chunk, len(features))]
        contexts = examples.slice(lo, hi - lo).to_pylist()
        for f in features[start : start + chunk]:
            i = f["feature"]
            page = _feature_body(
                f,
                contexts[offsets[i] - lo : offsets[i + 1] - lo],
                release.card,
                release.meta["histogram_edges"],
            )
            html_page = _page(f"feature {i}", page, release.has_graph, depth=1)
            (out / "features" / f"{i}.html").write_text(html_page)


def _feature_body(f: dict, contexts: list[dict], card: dict, edges: list[float]) -> str:
    i = f["feature"]
    stats = (
        f'<table class="card" id="stats"><tr><th>density</th><td>{f["density"]:.3g}</td></tr>'
        f"<tr><th>fired on</th><td>{f['fire_count']} tokens</td></tr>"
        f"<tr><th>mean activation</th><td>{f['mean_activation']:.4g}</td></tr>"
        f"<tr><th>max activation</th><td>{f['max_activation']:.4g}</td></tr></table>"
    )
    hist = histogram_svg(f["hist_counts"], edges)
    logits = "".join(
        _logit_table(name, f[f"{side}_logit_tokens"], f[f"{side}_logit_values"])
        for side, name in (("top", "promotes"), ("bottom", "suppresses"))
    )
    tops = "".join(_context(c) for c in contexts if c["kind"] == "top")
    quantiles = "".join(_context(c) for c in contexts if c["kind"] == "quantile")
    return (
        f'<h1>feature {i} <span class="label" id="label">{E(f["label"])}</span> '
        '<span class="heuristic" title="label from the top contexts\' peak tokens, not '
        'model-written">heuristic</span></h1>'
        f'<p class="note">{E(card["model"])} · {E(card["hook"])} · {E(card["architecture"])}</p>'
        f'<div class="row">{stats}{hist}</div><div class="row">{logits}</div>{_neighbours(f)}'
        f'<h2>Top activating contexts</h2><div id="top-contexts">{tops or "<p>none</p>"}</div>'
        f'<h2>Quantile samples</h2><div id="quantile-contexts">{quantiles or "<p>none</p>"}</div>'
    )


def _logit_table(title: str, tokens: list[str], values: list[float]) -> str:
    rows = "".join(
        f"<tr><td><code>{E(repr(t))}</code></td><td>{v:+.3f}</td></tr>"
        for t, v in zip(tokens, values, strict=True)
    )
    return f'<table class="logits"><caption>{title}</caption>{rows}</table>'


def _neighbours(f: dict) -> str:
    parts = []
    for key, title, local in (
        ("graph_out", "implies (graph)", True),
        ("graph_in", "implied by (graph)", True),
        ("coactivation", "co-fires with (NPMI)", True),
        ("crosslayer_out", "predicts at the later layer", False),
    ):
        if key not in f:
            continue
        items = [
            f'<a href="{j}.html">{j}</a> <small>{w:.3g}</small>'
            if local
            else f"{j} <small>{w:.3g}</small>"
            for j, w in zip(f[key], f[f"{key}_weight"], strict=True)
        ]
        parts.append(
            f'<div class="neigh" id="{key}"><b>{title}</b>: {", ".join(items) or "none"}</div>'
        )
    if not parts:  # a lone SAE released without stats or a transition
        parts = ['<p class="note">none in this release</p>']
    return f"<h2>Neighbours</h2>{''.join(parts)}"


def _context(c: dict) -> str:
    """One context; tokens where the feature is silent stay plain text (most: keeps pages small)."""
    peak = max(max(c["activations"]), 1e-9)
    spans = []
    for t, (token, act) in enumerate(zip(c["tokens"], c["activations"], strict=True)):
        text = E(token).replace("\n", "⏎")
        if act <= 0 and t != c["focus"]:
            spans.append(text)
            continue
        cls = "tok focus" if t == c["focus"] else "tok"
        spans.append(
            f'<span class="{cls}" style="background:rgba(221,132,82,{min(1.0, act / peak):.2f})" '
            f'title="{act:.4g}">{text}</span>'
        )
    band = (
        ""
        if c["kind"] == "top"
        else f" · band {c['band']} [{c['band_min']:.3g}, {c['band_max']:.3g}]"
    )
    activation = f'<span class="act">{c["activation"]:.3g}{band}</span>'
    return f'<div class="ctx">{activation} {"".join(spans)}</div>'
