"""A probe: a per-token score s_t = u_t · w + b, pooled over a text and compared to a threshold.

Every kind is linear in its own per-token input u_t:

| kind        | u_t                                     | trained by                             |
|-------------|-----------------------------------------|----------------------------------------|
| `linear`    | the residual x_t [d_model]              | L2 logistic regression (the baseline)  |
| `mean_diff` | x_t, with w fixed along μ₊ − μ₋         | class-mean difference; scale, bias fit |
| `sparse`    | z_t[features], k SAE latents            | k by class-mean difference; logistic   |
| `graph`     | min of z_t over a feature set/path [1]  | best set/edge of the feature graph     |

A trained probe clips s_t to `score_range`: the 0.5%-99.5% range of its training tokens' scores,
widened by its own width on each side. A token whose residual is a massive-activation outlier
(in SmolLM2 the first token after a chat marker reaches norms of ~25,000 against a median of ~170)
would otherwise score in the hundreds and decide a whole conversation's mean on its own.

The text's score S = pool_t(s_t) (mean, max or last token) is a logit: sigmoid(S) is the
probability, and the probe *fires* when S > threshold, the threshold calibrated to a target
false-positive rate on held-out negatives. `mean_diff` keeps the raw difference μ₊ − μ₋ as
`direction`: a steering vector (`Lens.monitor`).

Saved as `probe.safetensors` (weight, features, direction) + `probe.json` (everything else).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from probes.activations import Aggregation, Features, Ragged, pool
from sae.sae import SparseCode

Kind = Literal["linear", "mean_diff", "sparse", "graph"]
KINDS: tuple[str, ...] = ("linear", "mean_diff", "sparse", "graph")
DENSE_KINDS = ("linear", "mean_diff")  # read the residual; the others read an SAE's code
FORMAT_VERSION = 1
PROBE_JSON, PROBE_FILE = "probe.json", "probe.safetensors"


@dataclass
class Probe:
    kind: Kind
    hook: str
    d_model: int
    aggregation: Aggregation
    weight: Tensor  # [d_model] (dense kinds), [k] (sparse), [1] (graph)
    bias: float
    # [k] latent ids
    features: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    edges: list[list[int]] = field(default_factory=list)  # graph: the query's edges [[i, j], ...]
    direction: Tensor | None = None  # mean_diff: μ₊ − μ₋ in raw residual space [d_model]
    score_range: list[float] = field(default_factory=list)  # [lo, hi] s_t is clipped to; [] none
    threshold: float = 0.0  # on the pooled score S (a logit); fires when S > threshold
    calibration: dict = field(default_factory=dict)  # target_fpr, n_negatives, fpr on them
    name: str = ""
    sae: str = ""  # encoder directory (sparse, graph)
    sae_sha256: str = ""
    model: str = ""
    # LoadedModel.identity() of the model it was trained on ({} in older probes)
    model_record: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)  # held-out accuracy / AUROC at training time
    info: dict = field(default_factory=dict)  # task, training sizes, regularisation, ...
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown probe kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.kind not in DENSE_KINDS and not self.sae:
            raise ValueError(
                f"a {self.kind} probe reads SAE features: give it the SAE directory (sae=...)"
            )

    @property
    def needs_code(self) -> bool:
        return self.kind not in DENSE_KINDS

    # ------------------------------------------------------------------ scoring

    def inputs(self, acts: Tensor, code: SparseCode | None = None) -> Tensor:
        """u_t for each row: [n_tokens, d_model] (dense kinds), [n_tokens, k] or [n_tokens, 1]."""
        if self.kind in DENSE_KINDS:
            if acts.shape[-1] != self.d_model:
                raise ValueError(
                    f"probe {self.name or self.kind!r} expects d_model {self.d_model} at "
                    f"{self.hook}, got activations of width {acts.shape[-1]}"
                )
            return acts.float()
        if code is None:
            raise ValueError(
                f"a {self.kind} probe needs the SAE code of the activations (encode with "
                f"{self.sae})"
            )
        chosen = feature_columns(code, self.features)  # [n_tokens, k]
        if self.kind == "graph":  # soft AND: positive only on tokens where every feature is active
            return chosen.min(dim=1, keepdim=True).values
        return chosen

    def token_scores(self, acts: Tensor, code: SparseCode | None = None) -> Tensor:
        """s_t = u_t · w + b for every row, clipped to score_range: [n_tokens]."""
        scores = self.inputs(acts, code) @ self.weight + self.bias
        return scores.clamp(*self.score_range) if self.score_range else scores

    def set_score_range(self, features: Features) -> Probe:
        """score_range from the token scores of the texts the probe was fit on."""
        self.score_range = []
        scores = self.token_scores(features.acts.values, features.code)  # [n_tokens]
        # Quantiles, not min/max: training texts hold a few outlier tokens themselves.
        lo, hi = scores.float().quantile(torch.tensor([0.005, 0.995])).tolist()
        self.score_range = [lo - (hi - lo), hi + (hi - lo)]
        return self

    def text_scores(self, features: Features) -> Tensor:
        """S per text: [n_texts] logits."""
        scores = self.token_scores(features.acts.values, features.code)
        return pool(Ragged(scores, features.acts.offsets), self.aggregation)

    def fires(self, scores: Tensor) -> Tensor:
        return scores > self.threshold

    # ------------------------------------------------------------------ files

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            "weight": self.weight.float().contiguous(),
            "features": self.features.long().contiguous(),
        }
        if self.direction is not None:
            tensors["direction"] = self.direction.float().contiguous()
        tmp = directory / (PROBE_FILE + ".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(directory / PROBE_FILE)
        meta = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in tensors and f.name != "direction"
        }
        tmp = directory / (PROBE_JSON + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        tmp.replace(directory / PROBE_JSON)  # last: a directory with probe.json is complete
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Probe:
        directory = Path(directory)
        if not (directory / PROBE_JSON).exists() or not (directory / PROBE_FILE).exists():
            raise FileNotFoundError(
                f"{directory} holds no probe ({PROBE_JSON} + {PROBE_FILE}); "
                "train one with `python -m probes train ... --out DIR`"
            )
        meta = json.loads((directory / PROBE_JSON).read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{directory / PROBE_JSON} has format_version {meta.get('format_version')}, "
                f"this greylens reads {FORMAT_VERSION}"
            )
        tensors = load_file(str(directory / PROBE_FILE))
        known = {f.name for f in fields(cls)}
        return cls(
            **{k: v for k, v in meta.items() if k in known},
            weight=tensors["weight"],
            features=tensors["features"],
            direction=tensors.get("direction"),
        )

    def summary(self) -> dict:
        """JSON-safe description (no tensors)."""
        meta = {
            k: v for k, v in asdict(self).items() if not isinstance(v, Tensor) and v is not None
        }
        meta["features"] = self.features.tolist()
        return meta


def feature_columns(code: SparseCode, features: Tensor) -> Tensor:
    """Dense [n_rows, k] activations of the chosen latents (0 where a latent did not fire)."""
    k = features.numel()
    out = code.values.new_zeros(code.n_rows, k)
    if k == 0 or code.values.numel() == 0:
        return out
    order = features.argsort()
    ordered = features[order]
    position = torch.searchsorted(ordered, code.cols).clamp_max(k - 1)  # [nnz]
    keep = ordered[position] == code.cols  # entries of latents the probe reads
    return out.index_put(
        (code.rows[keep], order[position[keep]]), code.values[keep], accumulate=True
    )
