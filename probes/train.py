"""Training a probe end to end: dataset → activations (+ SAE code) → fit → calibrate → evaluate →
save.

    fit_probe(kind, features, y, ...)     one probe of any kind from in-memory features (no
                                          threshold)
    calibrate_probe(probe, features, y)   threshold at the target false-positive rate on negatives
                                          (their pooled text scores, or the monitor's running
                                          pooled scores)
    evaluate_probe(probe, features, y)    accuracy (at logit 0), AUROC, TPR/FPR at the threshold
    train_probe(cfg)                      the job behind `python -m probes train`

The training split is cut by group (document, language, word) into a fit part and a calibration
part, so the threshold is set on negatives the probe never saw; the task's test split is only used
for the reported metrics.

`calibrate_on="monitor"` sets the threshold on the statistic `Lens.monitor` acts on: the running
pooled score after every token of a negative text, from `min_tokens` tokens on, at its peak. A
monitor then fires on at most `fpr` of such texts at any point of their reading, and the pooled
score of a whole text (never above its peak) is covered too. `"text"` (the default) calibrates
only the whole text's pooled score, which a monitor checking short prefixes exceeds more often.
Short prefixes are noisy (one outlier token decides a 2-token mean), so with min_tokens below ~8
the monitor threshold can sit above most positives too; the probe's metrics show its TPR.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from graphs.coactivation_scores import CoactivationStats
from graphs.io import load_graph
from probes.activations import (
    AGGREGATIONS,
    Features,
    Ragged,
    collect,
    encode,
    encoder_sha256,
    load_encoder,
    pool,
)
from probes.fit import (
    auroc,
    calibrate,
    choose_l2,
    fit_pooled_logistic,
    graph_neighbourhoods,
    mean_difference,
    peak_running,
    pooled_code,
    select_features,
)
from probes.probe import DENSE_KINDS, KINDS, Kind, Probe, feature_columns
from probes.tasks import DEFAULT_AGGREGATION, load_task
from sae.device import ComputeDtype
from sae.identity import check_model_matches
from sae.models import LoadedModel, load_model


@dataclass
class ProbeTrainConfig:
    task: str = ""
    """Built-in task (source, code, language, first_letter) or a dataset with text and label columns
    (a datasets.save_to_disk directory, .jsonl, .parquet or .csv)."""
    hook: str = "blocks.15.hook_resid_post"
    """Hook point the probe reads (TransformerLens name)."""
    kind: Kind = "linear"
    """Probe kind."""
    out: str = ""
    """Directory for probe.safetensors + probe.json."""
    model: str = "smollm2-135m"
    """Model whose activations the probe reads: a model spec: smollm2-135m, tiny-<family>, a
    local HF directory, a .gguf, or org/name from the local HF cache."""
    device: str = "auto"
    """Device of the model: cpu, cuda, cuda:N, or auto (cuda when there is one)."""
    dtype: ComputeDtype = "auto"
    """Compute dtype of the model: auto is float32 on CPU, bfloat16 on CUDA."""
    device_map: str = ""
    """accelerate device map for a model that does not fit one device (e.g. auto); empty: the
    whole model on --device."""
    sae: str = ""
    """SAE or graph autoencoder directory (per hook) for sparse and graph probes."""
    graph: str = ""
    """Feature graph for graph probes: a graph autoencoder or co-activation stats directory
    (default: the --sae directory when it is a graph autoencoder)."""
    query: str = ""
    """Graph probe: a fixed comma-separated feature set instead of searching the graph."""
    k: int = 16
    """Sparse probe: number of SAE features."""
    aggregation: str = ""
    """How token scores become a text score: mean, max or last (default: the task's own)."""
    n_train: int = 0
    """Fit on only this many training texts, balanced (0: all of the fit split)."""
    n_per_class: int = 500
    """Built-in tasks: texts per class (train + test)."""
    fpr: float = 0.01
    """Target false-positive rate of the calibrated threshold."""
    calibrate_on: Literal["text", "monitor"] = "text"
    """Score the threshold is calibrated on: each negative text's pooled score (text), or the peak
    of its running pooled score from min_tokens tokens on, which Lens.monitor checks after every
    token (monitor)."""
    min_tokens: int = 1
    """calibrate_on=monitor: the shortest prefix whose running score counts."""
    calibration_fraction: float = 0.2
    """Share of the training groups held out to calibrate the threshold."""
    max_tokens: int = 128
    """Tokens read per text (BOS included); longer texts are truncated."""
    l2: float = 0.0
    """L2 strength of logistic fits (0: chosen by 4-fold cross-validation)."""
    seed: int = 0
    """Seed of the task build, the calibration split and the n_train subsample."""


# --------------------------------------------------------------------------- fitting


def check_labels(y: Tensor, what: str = "training set") -> None:
    if y.numel() == 0:
        raise ValueError(f"the {what} is empty: a probe needs labelled texts")
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError(
            f"labels of the {what} must be 0 or 1, got values {sorted(set(y.tolist()))[:10]}"
        )
    if int((y == 1).sum()) == 0 or int((y == 0).sum()) == 0:
        raise ValueError(
            f"the {what} has only class {int(y[0])}: a probe needs positive and negative examples"
        )


def fit_probe(
    kind: Kind,
    features: Features,
    y: Tensor,
    *,
    hook: str,
    aggregation: str,
    k: int = 16,
    edges: Tensor | None = None,
    query: list[int] | None = None,
    l2: float = 0.0,
    **meta,
) -> Probe:
    """A probe of `kind` fit to texts (features) with labels y [n_texts]; threshold left at 0."""
    if kind not in KINDS:
        raise ValueError(f"unknown probe kind {kind!r}; choose one of {', '.join(KINDS)}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(
            f"unknown aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}"
        )
    check_labels(y)
    acts = features.acts
    info = meta.pop("info", {})
    base = dict(kind=kind, hook=hook, d_model=acts.values.shape[1], aggregation=aggregation, **meta)
    if kind == "linear":
        l2 = l2 or choose_l2(acts, y, aggregation)
        weight, bias = fit_pooled_logistic(acts, y, aggregation, l2)
        return Probe(weight=weight, bias=bias, info={**info, "l2": l2}, **base)
    if kind == "mean_diff":
        direction = mean_difference(acts, y, aggregation)
        unit = direction / direction.norm().clamp_min(1e-12)
        scale, bias = fit_pooled_logistic(
            Ragged(acts.values @ unit[:, None], acts.offsets), y, aggregation, 1e-4
        )
        return Probe(weight=unit * scale, bias=bias, direction=direction, info=info, **base)
    if features.code is None:
        raise ValueError(
            f"a {kind} probe reads SAE features: encode the activations with an SAE first"
        )
    pooled = pooled_code(features.code, acts.offsets, features.n_latents, aggregation)
    if kind == "sparse":
        chosen = select_features(pooled, y, k)
        u = Ragged(feature_columns(features.code, chosen), acts.offsets)
        l2 = l2 or choose_l2(u, y, aggregation)
        weight, bias = fit_pooled_logistic(u, y, aggregation, l2)
        return Probe(weight=weight, bias=bias, features=chosen, info={**info, "l2": l2}, **base)
    chosen, score = (
        (torch.tensor(sorted(query)), None)
        if query
        else _best_query(features, pooled, y, edges, aggregation)
    )
    return _graph_probe(
        features, y, chosen, aggregation, {**info, "query_train_auroc": score}, base
    )


def _graph_probe(
    features: Features, y: Tensor, chosen: Tensor, aggregation: str, info: dict, base: dict
) -> Probe:
    """The graph probe reading the soft AND (min activation) of the chosen features."""
    u = Ragged(
        feature_columns(features.code, chosen).min(dim=1, keepdim=True).values,
        features.acts.offsets,
    )
    weight, bias = fit_pooled_logistic(u, y, aggregation, 1e-4)
    edge_list = [[int(chosen[0]), int(chosen[1])]] if chosen.numel() == 2 else []
    return Probe(weight=weight, bias=bias, features=chosen, edges=edge_list, info=info, **base)


def _best_query(
    features: Features, pooled: Tensor, y: Tensor, edges: Tensor | None, aggregation: str
) -> tuple[Tensor, float]:
    """The feature or graph edge whose soft AND (min activation), pooled per text, best ranks y."""
    if edges is None:
        raise ValueError(
            "a graph probe needs a feature graph (graph=... or --graph DIR) or a fixed --query"
        )
    best: tuple[float, int, list[int]] = (-1.0, 0, [])
    for i, neighbours in graph_neighbourhoods(pooled, y, edges):
        ids = torch.tensor([i, *neighbours])
        cols = feature_columns(features.code, ids)  # [n_tokens, 1 + deg]
        soft_and = torch.minimum(cols[:, :1], cols)  # column 0: {i} alone; column c: {i, ids[c]}
        # [n_texts, 1 + deg]
        text_values = pool(Ragged(soft_and, features.acts.offsets), aggregation)
        for c in range(ids.numel()):
            query = [i] if c == 0 else sorted([i, int(ids[c])])
            candidate = (auroc(text_values[:, c], y), -len(query), query)
            best = max(best, candidate)  # ties: fewer features
    return torch.tensor(best[2]), best[0]


def calibrate_probe(
    probe: Probe,
    features: Features,
    y: Tensor,
    fpr: float,
    on: Literal["text", "monitor"] = "text",
    min_tokens: int = 1,
) -> Probe:
    """Set probe.threshold so at most fpr of the negatives among `features` score above it: their
    pooled text scores (on="text") or their peak running pooled scores (on="monitor")."""
    if on not in ("text", "monitor"):
        raise ValueError(f"calibrate on 'text' or 'monitor', not {on!r}")
    negatives = features.select((y == 0).nonzero().squeeze(1))
    if on == "text":
        scores = probe.text_scores(negatives)  # [n_negatives]
    else:
        token_scores = probe.token_scores(negatives.acts.values, negatives.code)  # [n_tokens]
        scores = peak_running(
            Ragged(token_scores, negatives.acts.offsets), probe.aggregation, min_tokens
        )
    probe.threshold, probe.calibration = calibrate(scores, fpr)
    probe.calibration.update(on=on, **({"min_tokens": min_tokens} if on == "monitor" else {}))
    return probe


def evaluate_probe(probe: Probe, features: Features, y: Tensor) -> dict:
    scores = probe.text_scores(features)
    fired = probe.fires(scores)
    return {
        "accuracy": float(((scores > 0).long() == y).float().mean()),
        "auroc": auroc(scores, y),
        "tpr_at_threshold": float(fired[y == 1].float().mean()),
        "fpr_at_threshold": float(fired[y == 0].float().mean()),
        "n": int(y.numel()),
    }


# --------------------------------------------------------------------------- the job


def graph_edges(path: str | Path) -> Tensor:
    """Edges [2, E] of a graph autoencoder's learned graph or of co-activation candidates."""
    path = Path(path)
    if (path / "graph.json").exists():
        return load_graph(path).edge_index
    stats = CoactivationStats.load(path)
    return stats.candidates(stats.meta.get("config", {}).get("m", 32))[0]


def split_calibration(groups: list[str], fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Row indices (fit, calibration): whole groups go to calibration until `fraction` is
    reached."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"calibration_fraction must be in (0, 1), got {fraction}")
    unique = sorted(set(groups))
    order = torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed)).tolist()
    held = {unique[i] for i in order[: max(1, round(fraction * len(unique)))]}
    is_held = torch.tensor([g in held for g in groups])
    return (~is_held).nonzero().squeeze(1), is_held.nonzero().squeeze(1)


def balanced_subset(y: Tensor, n: int, seed: int) -> Tensor:
    """n indices, half of each class (as far as the classes allow), in a seeded random order."""
    generator = torch.Generator().manual_seed(seed)
    picks = []
    for label, want in ((1, n // 2), (0, n - n // 2)):
        members = (y == label).nonzero().squeeze(1)
        picks.append(members[torch.randperm(members.numel(), generator=generator)[:want]])
    return torch.cat(picks).sort().values


def train_probe(cfg: ProbeTrainConfig, model: LoadedModel | None = None, data=None) -> Probe:
    """Fit, calibrate and evaluate one probe; save it to cfg.out. Returns the probe (metrics
    inside). `model` (already loaded, must be cfg.model) saves loading it again; `data` (a
    datasets.Dataset or DatasetDict with text and label columns) replaces cfg.task."""
    _check_config(cfg, data)
    aggregation = cfg.aggregation or DEFAULT_AGGREGATION.get(cfg.task, "mean")
    encoder = load_encoder(cfg.sae) if cfg.sae else None
    edges = graph_edges(cfg.graph or cfg.sae) if cfg.kind == "graph" and not cfg.query else None
    task = load_task(cfg.task if data is None else data, n_per_class=cfg.n_per_class, seed=cfg.seed)
    train, test = task["train"], task["test"]
    y_train, y_test = torch.tensor(list(train["label"])), torch.tensor(list(test["label"]))
    check_labels(y_train), check_labels(y_test, "test set")
    if model is None:
        model = load_model(cfg.model, cfg.device, cfg.dtype, cfg.device_map or None)
    elif model.name != cfg.model:
        raise ValueError(f"train_probe got model {model.name!r} but cfg.model is {cfg.model!r}")
    if encoder is not None:
        _check_encoder(encoder, cfg.sae, cfg.hook, model)
    features = _features(model, encoder, list(train["text"]) + list(test["text"]), cfg)
    n_train = len(train)
    fit_rows, calib_rows = split_calibration(
        list(train["group"]), cfg.calibration_fraction, cfg.seed
    )
    if cfg.n_train:
        fit_rows = fit_rows[balanced_subset(y_train[fit_rows], cfg.n_train, cfg.seed)]
    meta = dict(
        sae=str(cfg.sae),
        sae_sha256=encoder_sha256(cfg.sae) if cfg.sae else "",
        model=cfg.model,
        model_record=model.identity(),
        name=Path(cfg.out).name,
        info={"task": cfg.task or "in-memory dataset", "n_fit": int(fit_rows.numel())},
    )
    query = [int(q) for q in cfg.query.split(",")] if cfg.query else None
    probe = fit_probe(
        cfg.kind,
        features.select(fit_rows),
        y_train[fit_rows],
        hook=cfg.hook,
        aggregation=aggregation,
        k=cfg.k,
        edges=edges,
        query=query,
        l2=cfg.l2,
        **meta,
    )
    probe.set_score_range(features.select(fit_rows))
    calibrate_probe(
        probe,
        features.select(calib_rows),
        y_train[calib_rows],
        cfg.fpr,
        cfg.calibrate_on,
        cfg.min_tokens,
    )
    probe.metrics = evaluate_probe(
        probe, features.select(torch.arange(n_train, n_train + len(test))), y_test
    )
    probe.save(cfg.out)
    return probe


def _check_config(cfg: ProbeTrainConfig, data) -> None:
    """Refuse a config that could not finish, before any text is read."""
    if not (cfg.task or data is not None) or not cfg.out:
        raise ValueError("pass --task NAME_OR_PATH and --out DIR")
    if cfg.kind not in DENSE_KINDS and not cfg.sae:
        raise ValueError(
            f"a {cfg.kind} probe reads SAE features: pass --sae DIR (the per-hook SAE directory)"
        )
    if cfg.calibrate_on not in ("text", "monitor") or cfg.min_tokens < 1:
        raise ValueError(
            f"calibrate_on={cfg.calibrate_on!r}, min_tokens={cfg.min_tokens}: calibrate on 'text' "
            "or 'monitor', from min_tokens >= 1"
        )


def _features(model, encoder, texts: list[str], cfg: ProbeTrainConfig) -> Features:
    acts, _ = collect(model, texts, [cfg.hook], max_tokens=cfg.max_tokens)
    ragged = acts[cfg.hook]
    if encoder is None or cfg.kind in DENSE_KINDS:
        return Features(ragged)
    code, n_latents = encode(encoder, ragged)
    return Features(ragged, code, n_latents)


def _check_encoder(encoder, path: str, hook: str, model) -> None:
    cfg = encoder.cfg
    check_model_matches(
        f"the SAE {path}",
        model,
        getattr(cfg, "model_record", {}),
        cfg.d_in,
        [cfg.hook] if cfg.hook else [],
        getattr(cfg, "weights_sha256", ""),
    )
    if encoder.cfg.hook and encoder.cfg.hook != hook:
        raise ValueError(
            f"SAE {path} was trained on {encoder.cfg.hook}, not on --hook {hook}; "
            "pass the SAE of that hook or change --hook"
        )
