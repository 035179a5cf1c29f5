"""The table of scripts/graph_quality.py: (a) TopK, (b) its post-hoc graph, (c) the graph
autoencoder, (c) without its edges, [(c)'s gates-shut control,] (m) a Matryoshka BatchTopK SAE of
the same width and tokens; written between markers into a doc."""

from __future__ import annotations

from pathlib import Path

from _cache import RECORD, commands


def _fmt(v, digits=3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _seeds(values: list[float]) -> str:
    """One value, or the mean over seeds with each seed in brackets."""
    if len(values) == 1:
        return _fmt(values[0])
    return f"{_fmt(sum(values) / len(values))} ({', '.join(map(_fmt, values))})"


def _letter(let: dict, key: str, field: str, k: str | None = None) -> str:
    if key not in let and f"{key}_seeds" not in let:  # the control without --parents
        return "—"
    if f"{key}_seeds" not in let:
        value = let[key][field]
        return _fmt(value[k] if k else value)
    return _seeds([(r[field][k] if k else r[field]) for r in let[f"{key}_seeds"]])


def markdown(args, rows, let, stab, post_stab, faith, commands: list[str]) -> str:
    """The comparison table; with --parents, a column for the gates-shut control and (c)'s letter
    rows as the mean over seeds (each seed in brackets); last, the Matryoshka column (m), mean
    over its seeds. Above it, the commands that produced the cached results."""
    head = (
        "| | (a) TopK | (b) TopK + post-hoc graph | (c) graph autoencoder "
        f"| (c) seed {args.seeds[0]}, edges removed |"
    )

    def extra(cell) -> str:  # the control's column
        return f" {cell} |" if args.parents else ""

    body = [
        *_sae_rows(args, rows, let, extra),
        *_graph_rows(args, rows, stab, post_stab, faith, extra),
    ]
    m_cells = _matryoshka_cells(args, rows, let, len(body))
    table = [
        head + extra("(c)'s control: same fine-tune, gates shut") + " (m) Matryoshka BatchTopK |",
        "|---|---|---|---|---|" + ("---|" if args.parents else "") + "---|",
        *[f"{line} {cell} |" for line, cell in zip(body, m_cells, strict=True)],
    ]
    lead = (
        "Produced by:" if len(commands) == 1 else "Produced by (cached parts keep their command):"
    )
    return "\n".join([lead, "", "```bash", *commands, "```", "", *table])


def _matryoshka_cells(args, rows, let, n_rows: int) -> list[str]:
    """(m)'s cell of every row of _sae_rows then _graph_rows, in their order: the mean over seeds
    with each seed in brackets; CE loss recovered from its first seed; no graph rows."""
    ms = [rows[f"m{s}"] for s in args.seeds]
    lm = let["m_seeds"]
    cells = [
        _seeds([r["l0"] for r in ms]),
        _seeds([r["fvu"] for r in ms]),
        _seeds([r["dead_fraction"] for r in ms]),
        _fmt(ms[0].get("ce_loss_recovered")),
        *[_seeds([r[key] for r in lm]) for key in LETTER_KEYS],
        *[_seeds([r["sparse_probe"][str(k)] for r in lm]) for k in (1, 2, 5)],
        _fmt(lm[0]["dense_probe"]),
    ]
    graph = ["—", "0", "—", "—", "—", "—", "—"]  # (m) has no graph
    cells += graph
    if len(cells) != n_rows:
        raise AssertionError(f"{len(cells)} Matryoshka cells for {n_rows} rows")
    return cells


LETTER_KEYS = ("absorption", "full_absorption", "absorption_fraction")


def _sae_rows(args, rows, let, extra) -> list[str]:
    """Reconstruction, first-letter absorption and probing rows."""
    a, c, bare, lb = rows["a"], rows[f"c{args.seeds[0]}"], rows["c_no_edges"], let["c_no_edges"]
    cs = [rows[f"c{s}"] for s in args.seeds]
    ctl = [rows[f"ctl{s}"] for s in args.seeds] if args.parents else []
    return [
        f"| L0 after propagation (before) | {_fmt(a['l0'], 1)} | {_fmt(a['l0'], 1)} | "
        f"{_fmt(c['l0'], 1)} ({_fmt(c['l0_evidence'], 1)}) | {_fmt(bare['l0'], 1)} |"
        + extra(ctl and _fmt(ctl[0]["l0"], 1)),
        f"| FVU (held-out) | {_fmt(a['fvu'])} | {_fmt(a['fvu'])} | {_fmt(c['fvu'])} (seeds: "
        f"{', '.join(_fmt(r['fvu'], 4) for r in cs)}) | {_fmt(bare['fvu'])} |"
        + extra(
            ctl and f"{_fmt(ctl[0]['fvu'])} (seeds: {', '.join(_fmt(r['fvu'], 4) for r in ctl)})"
        ),
        f"| dead latents (silent on the held-out tokens) | {_fmt(a['dead_fraction'])} | "
        f"{_fmt(a['dead_fraction'])} | {_fmt(c['dead_fraction'])} | "
        f"{_fmt(bare['dead_fraction'])} |" + extra(ctl and _fmt(ctl[0]["dead_fraction"])),
        f"| CE loss recovered | {_fmt(a['ce_loss_recovered'])} | "
        f"{_fmt(a['ce_loss_recovered'])} | {_fmt(c.get('ce_loss_recovered'))} | — |"
        + extra(ctl and _fmt(ctl[0].get("ce_loss_recovered"))),
        *[
            f"| {label} (lower is better) | {_fmt(let['a'][key])} | {_fmt(let['a'][key])} | "
            f"{_letter(let, 'c', key)} | {_fmt(lb[key])} |" + extra(_letter(let, "ctl", key))
            for label, key in (
                ("first-letter absorption (upper bound)", "absorption"),
                ("absorption, Chanin et al.'s full rate", "full_absorption"),
                ("absorption fraction (SAEBench-style)", "absorption_fraction"),
            )
        ],
        *[
            f"| sparse probe accuracy, k = {k} | {_fmt(let['a']['sparse_probe'][str(k)])} | "
            f"{_fmt(let['a']['sparse_probe'][str(k)])} | "
            f"{_letter(let, 'c', 'sparse_probe', str(k))} | "
            f"{_fmt(lb['sparse_probe'][str(k)])} |"
            + extra(_letter(let, "ctl", "sparse_probe", str(k)))
            for k in (1, 2, 5)
        ],
        f"| dense probe accuracy (reference) | {_fmt(let['a']['dense_probe'])} | "
        f"{_fmt(let['a']['dense_probe'])} | {_fmt(let['c']['dense_probe'])} | — |" + extra("—"),
    ]


def _graph_rows(args, rows, stab, post_stab, faith, extra) -> list[str]:
    """The graph's size, stability and faithfulness rows."""
    cs = [rows[f"c{s}"] for s in args.seeds]
    ctl = [rows[f"ctl{s}"] for s in args.seeds] if args.parents else []
    n_edges = stab["edges"][0]

    def mean(key: str) -> float:
        return sum(r[key] for r in cs) / len(cs)

    fa, fc = faith["a"], faith["c"]
    return [
        f"| implied features per held-out token | — | — | {_fmt(mean('implied_per_token'), 4)} "
        "| 0 |" + extra(ctl and _fmt(ctl[0]["implied_per_token"], 4)),
        f"| mean out-degree (edges) | — | {_fmt(n_edges / args.n_latents, 3)} ({n_edges}, "
        f"cut to (c)'s count) | {_fmt(mean('mean_degree'), 3)} "
        f"({', '.join(map(str, stab['edges']))}) | 0 |" + extra("0"),
        f"| edge stability, Jaccard over {len(args.seeds)} seeds (shuffled null) | — | "
        f"{_fmt(post_stab['jaccard'])} (data thirds) | {_fmt(stab['jaccard'])} "
        f"({_fmt(stab['null'], 4)}) | — |" + extra("—"),
        "| cross-layer edges confirmed by ablation (null) | "
        f"{_fmt(fa['edge_confirmed_fraction'])} ({_fmt(fa['null_confirmed_fraction'])}) | "
        f"same as (a) | {_fmt(fc['edge_confirmed_fraction'])} "
        f"({_fmt(fc['null_confirmed_fraction'])}) | — |" + extra("—"),
        f"| paths confirmed on the logit | {_fmt(fa['path_confirmed_fraction'])} | same as "
        f"(a) | {_fmt(fc['path_confirmed_fraction'])} | — |" + extra("—"),
        f"| path score vs grad × act (Pearson) | {_fmt(fa['attribution_pearson'])} | same "
        f"as (a) | {_fmt(fc['attribution_pearson'])} | — |" + extra("—"),
        "| transition L15 → L18: code FVU, nonzero weights | "
        f"{_fmt(fa['transition_code_fvu'])}, {fa['transition_nonzero']} | same as "
        f"(a) | {_fmt(fc['transition_code_fvu'])}, {fc['transition_nonzero']} | — |" + extra("—"),
    ]


def write_table(doc: Path, table: str, tag: str) -> None:
    """Replace the text between `<!-- table{tag} -->` and `<!-- /table{tag} -->` in doc (the prose
    around it stays); a doc without those markers gets the table appended under them."""
    start, end = f"<!-- table{tag} -->", f"<!-- /table{tag} -->"
    text = doc.read_text() if doc.exists() else ""
    if start in text and end in text:
        text = (
            text[: text.index(start) + len(start)] + "\n" + table + "\n" + text[text.index(end) :]
        )
    else:
        text += f"\n{start}\n{table}\n{end}\n"
    doc.write_text(text)


def made_by(dirs: dict[str, Path], *results: dict) -> list[str]:
    """The distinct commands that trained the artefacts and computed the cached results."""
    found = commands([d if (d / RECORD).exists() else d.parent for d in dirs.values()])

    def walk(value) -> None:
        if isinstance(value, dict):
            if "_command" in value:
                found.append(value["_command"])
            for inner in value.values():
                walk(inner)
        elif isinstance(value, list):
            for inner in value:
                walk(inner)

    for result in results:
        walk(result)
    return list(dict.fromkeys(found))
