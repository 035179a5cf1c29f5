"""The stages of a release export, in order (`graphs.release.export` runs them, skipping finished
ones):

    scan         stream the store through the SAE (graphs.release.scan) -> work/scan.safetensors
    contexts     token-level activations of every chosen context window -> work/contexts.safetensors
    logits       top / bottom logits of every feature (graphs.explain.top_logits)
                                                                        -> work/logits.safetensors
    metrics      the metric card: FVU, L0, dead / dense from the scan, CE by splicing
                                                                        -> work/card.json
    tables       features / examples / edges parquet, README.md, release.json (complete: false)
    saelens      saelens/<hook>/ (sae.io.export_saelens)
    neuronpedia  neuronpedia/<feature>.json
    circuits     circuits/<slug>.json for each prompt (graphs.explain); none without a graph
    dashboard    dashboard/ (graphs.release.dashboard), last: it reads everything above

Every stage reads what earlier stages wrote to disk, so any of them can start in a fresh process.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from graphs.explain import load_explainer, top_logits
from graphs.release import tables
from graphs.release.circuits import circuit_json
from graphs.release.dashboard import write_dashboard
from graphs.release.inputs import Inputs
from graphs.release.load import FORMAT_VERSION, NO_GRAPH, RELEASE_JSON, load_release
from graphs.release.scan import (
    CONTEXTS_FILE,
    SCAN_FILE,
    Examples,
    ScanState,
    choose_examples,
    run_contexts,
    run_scan,
    store_columns,
)
from sae import metrics
from sae.evaluate import splice_metrics
from sae.identity import check_model_matches
from sae.io import export_saelens
from sae.models import load_model

STAGES = (
    "scan",
    "contexts",
    "logits",
    "metrics",
    "tables",
    "saelens",
    "neuronpedia",
    "circuits",
    "dashboard",
)


class Builder:
    def __init__(
        self, cfg, inputs: Inputs, staging: Path, log: Callable[[dict], None], model=None
    ) -> None:
        self.cfg, self.inputs, self.staging, self.log = cfg, inputs, staging, log
        self.work = staging / "work"
        self.sae = inputs.sae
        self._model = model

    @property
    def model(self):
        """The model, loaded on first use (a resumed export past the model stages never loads
        it)."""
        if self._model is None:
            self._model = load_model(self.inputs.model_name, self.cfg.device, self.cfg.dtype)
        if self._model.name != self.inputs.model_name:
            raise ValueError(
                f"the export reads {self.inputs.model_name}; the model passed in is "
                f"{self._model.name}"
            )
        sae = self.sae.cfg
        check_model_matches(
            f"the SAE {self.cfg.sae}",
            self._model,
            sae.model_record,
            sae.d_in,
            [sae.hook],
            sae.weights_sha256,
        )
        return self._model

    @cached_property
    def columns(self) -> dict[str, torch.Tensor]:
        return store_columns(self.inputs.store, self.inputs.n_tokens)

    @cached_property
    def vocab(self) -> np.ndarray:
        """Token id -> its decoded text, for every id the model can read or predict."""
        tokenizer = self.model.tokenizer
        size = max(len(tokenizer), self.model.hf.config.vocab_size)
        decoded = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        return np.array(decoded + [f"<{i}>" for i in range(len(tokenizer), size)], dtype=object)

    def scan_state(self) -> ScanState:
        c = self.cfg
        state = ScanState.empty(
            self.sae.cfg.n_latents, self.sae.cfg.d_in, c.bins, c.top_k, c.reservoir
        )
        state.restore(self.work / SCAN_FILE)
        return state

    def examples(self) -> Examples:
        c = self.cfg
        return choose_examples(
            self.scan_state(),
            c.quantiles,
            c.per_quantile,
            self.columns["first"],
            self.columns["last"],
            c.context_left,
            c.context_right,
        )

    # ------------------------------------------------------------------ stages

    def scan(self) -> None:
        c = self.cfg
        run_scan(
            self.sae,
            self.inputs.store,
            self.work / SCAN_FILE,
            self.inputs.n_tokens,
            c.batch_size,
            c.bins,
            c.top_k,
            c.reservoir,
            c.seed,
            c.checkpoint_every,
            self.log,
        )

    def contexts(self) -> None:
        run_contexts(
            self.sae,
            self.inputs.store,
            self.examples(),
            self.work / CONTEXTS_FILE,
            self.cfg.batch_size,
            self.cfg.checkpoint_every,
            self.log,
        )

    def logits(self) -> None:
        out = top_logits(
            self.model, self.sae, torch.arange(self.sae.cfg.n_latents), k=self.cfg.logits
        )
        tensors = {
            "top_values": out["top"][0],
            "top_ids": out["top"][1],
            "bottom_values": out["bottom"][0],
            "bottom_ids": out["bottom"][1],
        }
        save_file({k: v.contiguous() for k, v in tensors.items()}, self.work / "logits.safetensors")

    def metrics(self) -> None:
        state, sae, store = self.scan_state(), self.sae, self.inputs.store
        scored = state.fvu.n
        recon = state.fvu.result()
        manifest = store.manifest
        card = {
            "title": f"greylens {self.inputs.model_name} {sae.cfg.hook} {sae.cfg.arch} "
            f"{sae.cfg.n_latents}",
            "model": self.inputs.model_name,
            "weights_sha256": sae.cfg.weights_sha256 or manifest.weights_sha256,
            "model_record": sae.cfg.model_record or manifest.model_record,
            "hook": sae.cfg.hook,
            "width": sae.cfg.n_latents,
            "d_in": sae.cfg.d_in,
            "architecture": sae.cfg.arch + (f" (k={sae.cfg.k})" if sae.cfg.arch != "relu" else ""),
            "training_tokens": _training_tokens(Path(self.cfg.sae), sae.cfg.hook),
            "tokens": scored,
            "passthrough_tokens": state.passthrough,
            "max_input_norm": sae.cfg.max_input_norm,  # SAELens can't apply it: say it here too
            "fvu": recon["fvu"],
            "explained_variance": recon["explained_variance"],
            "l0": recon["l0"],
            "dead_fraction": metrics.dead_fraction(
                torch.where(state.fire_counts == 0, scored, 0), window=max(scored, 1)
            ),
            "dense_fraction": metrics.dense_fraction(state.fire_counts, scored),
        }
        card.update(self._ce())
        graph = self.inputs.graph_edges
        card.update(
            corpus=f"{manifest.corpus} ({manifest.split} split, context {manifest.context_size})",
            feature_graph=NO_GRAPH if graph is None else "graph autoencoder",
            graph_edges=0 if graph is None else len(graph[0]),
            license=self.cfg.license,
        )
        (self.work / "card.json").write_text(json.dumps(card, indent=2))

    def _ce(self) -> dict:
        """CE loss recovered on whole store windows (BOS restored), the SAE spliced at its hook."""
        if not self.cfg.ce_tokens:
            return {"ce_loss_recovered": None}
        cols = self.columns
        length = int((cols["last"] - cols["first"]).max()) + 1
        starts = (
            (
                (cols["first"] == torch.arange(len(cols["first"])))
                & (cols["last"] - cols["first"] + 1 == length)
            )
            .nonzero()
            .squeeze(1)
        )
        needs_bos = int(cols["positions"][0]) == 1
        n_windows = max(1, -(-self.cfg.ce_tokens // (length + needs_bos - 2)))
        rows = starts[:n_windows, None] + torch.arange(length)  # [w, length]
        windows = cols["token_ids"][rows]
        if needs_bos:
            windows = torch.cat(
                [torch.full((len(windows), 1), self.model.bos_token_id), windows], 1
            )
        result = splice_metrics(self.model, self.sae, windows)
        return {
            "ce_loss_recovered": result["ce_loss_recovered"],
            "delta_ce": result["delta_ce"],
            "kl": result["kl_spliced"],
            "ce_tokens": result["predictions"],
        }

    def tables(self) -> None:
        examples, state, cols, vocab = self.examples(), self.scan_state(), self.columns, self.vocab
        # finished: read back, nothing re-encoded
        acts = run_contexts(
            self.sae,
            self.inputs.store,
            examples,
            self.work / CONTEXTS_FILE,
            self.cfg.batch_size,
            self.cfg.checkpoint_every,
            self.log,
        )
        n = self.sae.cfg.n_latents
        labels, top_tokens = tables.heuristic_labels(examples, cols["token_ids"], vocab, n)
        logits = load_file(self.work / "logits.safetensors")
        data = {
            "features": tables.features_table(
                state, logits, vocab, self._neighbours(), labels, top_tokens, state.fvu.n
            ),
            "examples": tables.examples_table(
                examples, acts, cols["token_ids"], cols["doc_ids"], cols["positions"], vocab
            ),
            "edges": tables.edges_table(
                self.inputs.graph_edges,
                self.inputs.coactivation,
                self.inputs.crosslayer,
                self.sae.cfg.hook,
                self.inputs.target_hook,
            ),
        }
        (self.staging / "data").mkdir(exist_ok=True)
        for name, dataset in data.items():
            dataset.to_parquet(str(self.staging / "data" / f"{name}.parquet"))
        card = json.loads((self.work / "card.json").read_text())
        counts = {name: len(d) for name, d in data.items()}
        has_graph = self.inputs.graph_edges is not None
        readme = tables.dataset_card(card, counts, has_graph=has_graph)
        (self.staging / "README.md").write_text(readme)
        # [n + 1] examples are stored feature-major
        offsets = torch.cat(
            [
                torch.zeros(1, dtype=torch.int64),
                torch.cumsum(torch.bincount(examples.feature, minlength=n), 0),
            ]
        )
        meta = {
            "format_version": FORMAT_VERSION,
            "complete": False,
            "card": card,
            "counts": counts,
            "histogram_edges": state.edges.tolist(),
            "example_offsets": offsets.tolist(),
            "target_hook": self.inputs.target_hook,
            "label_method": tables.HEURISTIC_LABEL,
            "graph": has_graph,
        }
        (self.staging / RELEASE_JSON).write_text(json.dumps(meta, indent=2))
        self._copy_training_metrics()

    def _neighbours(self) -> dict[str, tuple]:
        """Each neighbour column pair (targets, weights) of the features table, for the edges
        given."""
        graph = self.inputs.graph_edges
        reversed_graph = None if graph is None else (graph[1], graph[0], graph[2])
        return {
            name: tables.top_per_source(*edges, self.sae.cfg.n_latents, self.cfg.neighbours)
            for name, edges in (
                ("graph_out", graph),
                ("graph_in", reversed_graph),
                ("coactivation", self.inputs.coactivation),
                ("crosslayer_out", self.inputs.crosslayer),
            )
            if edges is not None
        }

    def _copy_training_metrics(self) -> None:
        out = self.staging / "training"
        out.mkdir(exist_ok=True)
        sources = [("sae", [Path(self.cfg.sae), Path(self.cfg.sae).parent])]
        if self.cfg.graph:
            sources.append(("graph", [Path(self.cfg.graph)]))
        for name, candidates in sources:
            for directory in candidates:
                if (directory / "metrics.jsonl").exists():
                    rows = [
                        r
                        for r in (directory / "metrics.jsonl").read_text().splitlines()
                        if json.loads(r).get("hook", self.sae.cfg.hook) == self.sae.cfg.hook
                    ]
                    (out / f"{name}_metrics.jsonl").write_text("".join(r + "\n" for r in rows))
                    break

    def saelens(self) -> None:
        export_saelens(self.sae, self.staging / "saelens" / self.sae.cfg.hook)

    def neuronpedia(self) -> None:
        release = load_release(self.staging, require_complete=False)
        out = self.staging / "neuronpedia"
        out.mkdir(exist_ok=True)
        features, examples = (
            release.data["features"].data.table,
            release.data["examples"].data.table,
        )
        offsets, edges = release.meta["example_offsets"], release.meta["histogram_edges"]
        source = f"{self.sae.cfg.hook}-greylens-{self.sae.cfg.n_latents}"
        chunk = 256
        for start in tqdm(
            range(0, len(features), chunk), desc="release: neuronpedia json", unit="chunk"
        ):
            rows = features.slice(start, chunk).to_pylist()
            lo, hi = offsets[start], offsets[min(start + chunk, len(features))]
            contexts = examples.slice(lo, hi - lo).to_pylist()
            for row in rows:
                f = row["feature"]
                mine = contexts[offsets[f] - lo : offsets[f + 1] - lo]
                payload = tables.neuronpedia_feature(
                    row, mine, self.inputs.model_name, source, edges
                )
                (out / f"{f}.json").write_text(tables.dumps(payload))

    def circuits(self) -> None:
        if self.inputs.graph_edges is None:
            return  # a lone SAE: no graph, so no reasoning paths to explain
        out = self.staging / "circuits"
        out.mkdir(exist_ok=True)
        explainer = load_explainer(self.model, self.cfg.graph, self.cfg.transition or None)
        labels = tables_labels(self.staging)
        for i, prompt in enumerate(
            tqdm(self.inputs.prompts, desc="release: explain prompts", unit="prompt")
        ):
            slug = f"{i:02d}-" + (
                re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "prompt"
            )
            explained = explainer.explain(prompt, top_features=6, top_paths=4)
            graph = circuit_json(explained, slug, labels, self.model.n_layers)
            graph["greylens_explanation"] = explained
            (out / f"{slug}.json").write_text(tables.dumps(graph))

    def dashboard(self) -> None:
        write_dashboard(self.staging)

    def release_meta(self) -> dict:
        return json.loads((self.staging / RELEASE_JSON).read_text())


def tables_labels(staging: Path) -> list[str]:
    return (
        pq.read_table(staging / "data" / "features.parquet", columns=["label"])
        .column("label")
        .to_pylist()
    )


def _training_tokens(sae_dir: Path, hook: str) -> int | None:
    for directory in (sae_dir, sae_dir.parent):
        path = directory / "metrics.jsonl"
        if path.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            tokens = [r["tokens"] for r in rows if r.get("hook", hook) == hook and "tokens" in r]
            return max(tokens) if tokens else None
    return None
