"""`Lens`: probes and SAEs on a model at inference time.

    lens = Lens(model, probes=["out/probes/code"], saes=["out/sae/blocks.15.hook_resid_post"])
    lens.score(["def f(x): return x", "In the beginning"])   # per-token + pooled scores, features
    lens.monitor("Write a poem", trigger="code", action="stop")  # probes on every generated token

For each text and probe, `score` returns the per-token scores s_t, the pooled score S (a logit),
its probability, whether S crossed the calibrated threshold, and the features that drove S:
for sparse and graph probes the probe's own latents (w_i · z_i); for dense probes, when an SAE
of the same hook is attached, the decomposition w · x = Σ_i z_i (w · d_i) + w · (error) through
the SAE's decoder rows d_i. Feature contributions are pooled like the score (mean over tokens,
the max token, or the last token), so they add up to S − b − (w · error).

`monitor` generates token by token with a KV cache. After each forward it scores the new token
and updates each probe's running pooled score; when the trigger probe fires it either stops or
adds a steering vector (by default the trigger probe's mean-difference direction) at a hook
for every later token. Probes read their hook *before* the steering edit, so a trigger never
reacts to its own intervention.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from probes.activations import (
    Features,
    Ragged,
    collect,
    encode,
    encoder_sha256,
    load_encoder,
    tokenize,
)
from probes.probe import Probe, feature_columns
from probes.sampling import sample_token
from sae.hooks import hook_layer, recording, validate_hooks
from sae.identity import check_model_matches
from sae.models import LoadedModel, load_model
from sae.sae import SparseCode

Action = Literal["stop", "steer", "none"]


@dataclass
class ProbeResult:
    token_scores: list[float]  # s_t per token (BOS excluded)
    score: float  # pooled S (a logit)
    probability: float
    fired: bool
    threshold: float
    top_features: list[dict] = field(default_factory=list)  # {feature, activation, contribution}


@dataclass
class TextResult:
    text: str
    tokens: list[str]
    probes: dict[str, ProbeResult]
    features: dict[str, dict[str, list[list]]] = field(
        default_factory=dict
    )  # hook -> {indices, values} [T][top_n]

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class MonitorResult:
    prompt: str
    text: str  # the generated continuation
    token_ids: list[int]  # generated
    scores: dict[str, list[float]]  # probe -> s_t for every prompt (non-BOS) and generated token
    running: dict[str, list[float]]  # probe -> pooled score after each of those tokens
    triggered: dict | None = None  # {probe, token (index into scores), score, action}

    def to_json(self) -> dict:
        return asdict(self)


class Lens:
    def __init__(
        self,
        model: LoadedModel | str,
        probes: Sequence[Probe | str | Path] = (),
        saes: Sequence[object | str | Path] = (),
        max_tokens: int = 256,
        batch_size: int = 8,
        top_features: int = 5,
        top_n: int = 8,
    ) -> None:
        self.model = load_model(model) if isinstance(model, str) else model
        self.max_tokens, self.batch_size, self.top_features, self.top_n = (
            max_tokens,
            batch_size,
            top_features,
            top_n,
        )
        self.probes: dict[str, Probe] = {}
        for item in probes:
            probe = item if isinstance(item, Probe) else Probe.load(item)
            name = probe.name or f"{probe.kind}-{len(self.probes)}"
            self.probes[name] = probe
        self.saes: dict[str, object] = {}  # hook -> encoder attached for feature attributions
        self._encoders: dict[str, object] = {}  # probe name -> encoder it reads
        for item in saes:
            encoder = item
            if isinstance(item, str | Path):
                encoder = load_encoder(item)
                encoder._path = str(Path(item).resolve())  # lets a probe on the same SAE reuse it
            self.saes[encoder.cfg.hook] = encoder
        self._check()

    def _check(self) -> None:
        validate_hooks(self.model, self.hooks)
        for name, probe in self.probes.items():
            # A probe records no weights hash of its own: its record is all there is.
            check_model_matches(
                f"probe {name!r}", self.model, probe.model_record, probe.d_model, [probe.hook]
            )
            if probe.needs_code:
                self._encoders[name] = self._encoder_for(name, probe)
        for hook, encoder in self.saes.items():
            cfg = encoder.cfg
            record, sha = getattr(cfg, "model_record", {}), getattr(cfg, "weights_sha256", "")
            check_model_matches(f"the SAE for {hook}", self.model, record, cfg.d_in, [hook], sha)

    def _encoder_for(self, name: str, probe: Probe) -> object:
        attached = self.saes.get(probe.hook)
        if attached is not None and getattr(attached, "_path", None) == str(
            Path(probe.sae).resolve()
        ):
            return attached
        if not Path(probe.sae).exists():
            raise FileNotFoundError(
                f"probe {name!r} reads SAE {probe.sae}, which does not exist here; "
                "copy the SAE there or retrain the probe"
            )
        if probe.sae_sha256 and encoder_sha256(probe.sae) != probe.sae_sha256:
            raise ValueError(
                f"probe {name!r} was trained on another version of SAE {probe.sae} "
                "(weights changed since): retrain the probe"
            )
        return load_encoder(probe.sae)

    @property
    def hooks(self) -> list[str]:
        return sorted({p.hook for p in self.probes.values()} | set(self.saes))

    # ------------------------------------------------------------------ offline scoring

    @torch.no_grad()
    def score(self, texts: str | Sequence[str] | Sequence[list[int]]) -> list[TextResult]:
        """Per-token and pooled scores of every probe on every text, with top features; each
        attached SAE adds its per-token top-n code. A text may be a list of token ids (no BOS)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        acts, token_ids = collect(
            self.model, texts, self.hooks, self.max_tokens, self.batch_size, progress=False
        )
        probe_codes, sae_codes = self._codes(acts)
        decode = self.model.tokenizer.decode
        results = [
            TextResult(
                t if isinstance(t, str) else decode(t),
                self.model.tokenizer.convert_ids_to_tokens(ids.tolist()),
                {},
            )
            for t, ids in zip(texts, token_ids, strict=True)
        ]
        offsets = next(iter(acts.values())).offsets.tolist() if acts else []
        for hook, code in sae_codes.items():
            ids, values = code.top(self.top_n)  # [n_tokens, top_n]
            for i, result in enumerate(results):
                rows = slice(offsets[i], offsets[i + 1])
                result.features[hook] = {
                    "indices": ids[rows].tolist(),
                    "values": values[rows].tolist(),
                }
        for name, probe in self.probes.items():
            features = Features(acts[probe.hook], probe_codes.get(name))
            token_scores = probe.token_scores(features.acts.values, features.code)  # [n_tokens]
            pooled = probe.text_scores(features)
            contributions = self._contributions(
                probe, features, sae_codes.get(probe.hook)
            )  # ([n_tok, F], ids [F])
            offsets = features.acts.offsets.tolist()
            for i, result in enumerate(results):
                s, e = offsets[i], offsets[i + 1]
                top = self._top(probe, token_scores[s:e], contributions, s, e)
                result.probes[name] = ProbeResult(
                    token_scores[s:e].tolist(),
                    float(pooled[i]),
                    float(torch.sigmoid(pooled[i])),
                    bool(probe.fires(pooled[i])),
                    probe.threshold,
                    top,
                )
        return results

    def _codes(
        self, acts: dict[str, Ragged]
    ) -> tuple[dict[str, SparseCode], dict[str, SparseCode]]:
        """({probe: the code it reads}, {hook: the attached SAE's code}); each encoder runs once."""
        done: dict[int, SparseCode] = {}

        def code_of(encoder, hook: str) -> SparseCode:
            if id(encoder) not in done:
                done[id(encoder)] = encode(encoder, acts[hook])[0]
            return done[id(encoder)]

        probe_codes = {
            name: code_of(enc, self.probes[name].hook) for name, enc in self._encoders.items()
        }
        return probe_codes, {hook: code_of(enc, hook) for hook, enc in self.saes.items()}

    def _contributions(
        self, probe: Probe, features: Features, sae_code: SparseCode | None
    ) -> tuple[Tensor, Tensor] | None:
        if probe.kind == "sparse":
            return probe.inputs(features.acts.values, features.code) * probe.weight, probe.features
        if probe.kind == "graph":  # each query feature's own activation; the min of them drives s_t
            return feature_columns(features.code, probe.features) * probe.weight, probe.features
        if sae_code is None:
            return None
        code, decoder = (
            sae_code,
            _decoder_rows(self.saes[probe.hook]),
        )  # decoder [n_latents, d_model] raw space
        per_latent = decoder @ probe.weight  # [n_latents]: w · d_i
        touched = code.cols.unique()
        lookup = torch.full((decoder.shape[0],), -1, dtype=torch.long)
        lookup[touched] = torch.arange(touched.numel())
        dense = code.values.new_zeros(code.n_rows, touched.numel())
        dense.index_put_(
            (code.rows, lookup[code.cols]), code.values * per_latent[code.cols], accumulate=True
        )
        return dense, touched

    def _top(self, probe: Probe, scores: Tensor, contributions, start: int, end: int) -> list[dict]:
        if contributions is None or end == start:
            return []
        values, ids = contributions
        weights = _pooling_weights(scores, probe.aggregation)  # [T]
        pooled = weights @ values[start:end]  # [F]
        order = pooled.abs().argsort(descending=True)[: self.top_features]
        return [
            {"feature": int(ids[j]), "contribution": float(pooled[j])}
            for j in order
            if float(pooled[j]) != 0.0
        ]

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def monitor(
        self,
        prompt: str,
        max_new_tokens: int = 32,
        trigger: str | None = None,
        action: Action = "stop",
        steering: Tensor | None = None,
        alpha: float = 1.0,
        steering_hook: str | None = None,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> MonitorResult:
        """Generate from `prompt`, scoring every token; when the trigger probe fires, stop or
        steer."""
        if trigger is not None and trigger not in self.probes:
            raise ValueError(
                f"unknown trigger probe {trigger!r}; this lens has {sorted(self.probes)}"
            )
        if action == "steer":
            steering, steering_hook = self._steering(trigger, steering, steering_hook)
        ids = tokenize(self.model.tokenizer, [prompt], self.max_tokens)[0].to(self.model.device)
        generator = torch.Generator().manual_seed(seed)
        state = _MonitorState(self, prompt)
        cache, steer = None, torch.zeros(())
        with (
            recording(self.model, self.hooks) as latest,
            _steered(self.model, steering_hook, lambda: steer),
        ):
            inputs = ids[None]
            for step in range(max_new_tokens + 1):
                out = self.model.fast(input_ids=inputs, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                rows = {
                    h: v[0, 1:] if step == 0 else v[0] for h, v in latest().items()
                }  # drop BOS once
                if state.add(rows) and trigger is not None and state.triggered is None:
                    state.check(trigger, action)
                    if state.triggered and action == "steer":
                        steer = alpha * steering.to(inputs.device)
                if step == max_new_tokens or (state.triggered and action == "stop"):
                    break
                token = sample_token(out.logits[0, -1], generator, temperature)
                state.token_ids.append(token)
                if token == self.model.tokenizer.eos_token_id:
                    break
                inputs = torch.tensor([[token]], device=ids.device)
        return state.result()

    def _steering(
        self, trigger: str | None, steering: Tensor | None, hook: str | None
    ) -> tuple[Tensor, str]:
        probe = self.probes.get(trigger) if trigger else None
        if steering is None:
            if probe is None or probe.direction is None:
                raise ValueError(
                    "action='steer' needs a steering vector: pass steering=... or a mean_diff "
                    "trigger probe"
                )
            steering = probe.direction
        hook = hook or (probe.hook if probe else None)
        if (
            hook is None
            or hook_layer(hook) is None
            or not hook.endswith(("hook_resid_post", "hook_resid_pre"))
        ):
            raise ValueError(
                "steering_hook must be a residual hook (blocks.L.hook_resid_pre/post), "
                f"got {hook!r}"
            )
        if steering.shape != (self.model.d_model,):
            raise ValueError(
                f"steering vector has shape {tuple(steering.shape)}, "
                f"expected ({self.model.d_model},)"
            )
        return steering.float(), hook


class _MonitorState:
    """Per-probe token scores and running pooled scores during `Lens.monitor`."""

    def __init__(self, lens: Lens, prompt: str) -> None:
        self.lens, self.prompt = lens, prompt
        self.token_ids: list[int] = []
        self.scores = {name: [] for name in lens.probes}
        self.running = {name: [] for name in lens.probes}
        self.triggered: dict | None = None

    def add(self, rows: dict[str, Tensor]) -> bool:
        """Score new token rows; False when there were none (a one-token prompt's prefill)."""
        n = next(iter(rows.values())).shape[0] if rows else 0
        for name, probe in self.lens.probes.items():
            x = rows[probe.hook].float()
            code = (
                encode(self.lens._encoders[name], Ragged(x, torch.tensor([0, n])))[0]
                if probe.needs_code
                else None
            )
            for score in probe.token_scores(x, code).tolist():
                self.running[name].append(self._pooled(name, probe.aggregation, score))
                self.scores[name].append(score)
        return n > 0

    def _pooled(self, name: str, how: str, score: float) -> float:
        """The pooled score once `score` joins the text's earlier token scores (O(1) per token)."""
        seen, previous = (
            len(self.scores[name]),
            self.running[name][-1] if self.running[name] else None,
        )
        if previous is None or how == "last":
            return score
        return (previous * seen + score) / (seen + 1) if how == "mean" else max(previous, score)

    def check(self, trigger: str, action: Action) -> None:
        score = self.running[trigger][-1]
        if score > self.lens.probes[trigger].threshold:
            self.triggered = {
                "probe": trigger,
                "token": len(self.running[trigger]) - 1,
                "score": score,
                "action": action,
            }

    def result(self) -> MonitorResult:
        text = self.lens.model.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        return MonitorResult(
            self.prompt, text, self.token_ids, self.scores, self.running, self.triggered
        )


def _pooling_weights(scores: Tensor, how: str) -> Tensor:
    """[T] weights with pooled(v) = weights @ v for the rows behind the pooled score."""
    weights = torch.zeros_like(scores)
    if how == "mean":
        return weights + 1.0 / scores.numel()
    weights[int(scores.argmax()) if how == "max" else -1] = 1.0
    return weights


def _decoder_rows(encoder) -> Tensor:
    sae = encoder.model.sae if hasattr(encoder, "model") else encoder
    return sae.W_dec.detach() / sae.cfg.input_scale


@contextmanager
def _steered(model: LoadedModel, hook: str | None, vector):
    """Add vector() to the residual at `hook` on every forward (vector() may be 0 until
    triggered)."""
    if hook is None:
        yield
        return
    block = model.family.blocks(model.fast)[hook_layer(hook)]

    def add_post(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + vector(), *output[1:])
        return output + vector()

    def add_pre(module, args, kwargs):
        if args:
            return (args[0] + vector(), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + vector()}

    if hook.endswith("hook_resid_post"):
        handle = block.register_forward_hook(add_post)
    else:
        handle = block.register_forward_pre_hook(add_pre, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
