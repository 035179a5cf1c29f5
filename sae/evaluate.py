"""SAE evaluation: reconstruction metrics over a store, and CE/KL by splicing into the model.

    reconstruction_metrics(sae, store)   FVU, explained variance, MSE, L0, dead and dense fractions
    splice_metrics(model, sae, tokens)   CE clean / spliced / zero-ablated, CE loss recovered, ΔCE,
                                         KL

Splicing replaces the hook's activation by the SAE reconstruction (or by zeros) at every position
but BOS, which the SAE never saw in training, and scores next-token CE from the position after
BOS on. Rows above the SAE's `max_input_norm` (massive activations) pass through the SAE
unchanged, and reconstruction metrics leave them out (their share is reported). All definitions
live in sae.metrics.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from sae import metrics
from sae.corpus import load_corpus
from sae.hooks import editing, fast_point
from sae.models import LoadedModel
from sae.sae import SAE
from sae.store import ActivationStore
from sae.windows import make_windows


@torch.no_grad()
def reconstruction_metrics(
    sae: SAE, store: ActivationStore, max_tokens: int | None = None, batch_size: int = 4096
) -> dict:
    hook = sae.cfg.hook
    if hook not in store.hooks:
        raise ValueError(f"the store has no {hook} (it holds {', '.join(store.hooks)})")
    if sae.cfg.weights_sha256:  # an imported SAE may not know its model's weights
        store.check_model(sae.cfg.model, sae.cfg.weights_sha256, sae.cfg.d_in)
    elif store.d_model != sae.cfg.d_in:
        raise ValueError(
            f"the SAE reads d_in {sae.cfg.d_in}, the store holds d_model {store.d_model}"
        )
    n_tokens = min(len(store), max_tokens or len(store))
    accumulator = metrics.FVUAccumulator(sae.cfg.d_in)
    fire_counts = torch.zeros(sae.cfg.n_latents, dtype=torch.int64)
    passed_through = 0
    for start in tqdm(range(0, n_tokens, batch_size), desc="eval reconstruction", unit="batch"):
        x = store.rows(torch.arange(start, min(start + batch_size, n_tokens)), hooks=[hook])[hook]
        skipped = sae.passthrough(x)  # massive activations: not the SAE's to reconstruct
        passed_through += int(skipped.sum())
        x = x[~skipped]
        code = sae.encode(x)
        active = code.values > 0
        accumulator.update(x, sae.decode(code), int(active.sum()))
        fire_counts += torch.bincount(code.cols[active], minlength=sae.cfg.n_latents)
    result = accumulator.result()
    scored = n_tokens - passed_through
    # Over the evaluation window a latent that never fired has been silent for all scored tokens.
    silent_for = torch.where(fire_counts == 0, scored, 0)
    result["dead_fraction"] = metrics.dead_fraction(silent_for, window=scored)
    result["dense_fraction"] = metrics.dense_fraction(fire_counts, scored)
    result["tokens"] = scored
    result["passthrough_fraction"] = passed_through / n_tokens
    return result


@torch.no_grad()
def splice_metrics(model: LoadedModel, sae: SAE, tokens: torch.Tensor, batch_size: int = 8) -> dict:
    """tokens: [n_windows, context] BOS-first windows of held-out text."""
    hook = sae.cfg.hook
    totals = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "kl_spliced": 0.0, "kl_zero": 0.0}
    n_predictions = 0
    for start in tqdm(range(0, len(tokens), batch_size), desc="eval splice", unit="batch"):
        batch = tokens[start : start + batch_size].to(model.device)  # [b, ctx]
        clean = _logits(model, batch, hook, None)
        spliced = _logits(
            model, batch, hook, lambda x: sae(x.reshape(-1, x.shape[-1])).reshape(x.shape)
        )
        zero = _logits(model, batch, hook, torch.zeros_like)
        n = batch[:, 2:].numel()  # predictions of tokens 2.. from positions 1.. (BOS left clean)
        for name, logits in (("clean", clean), ("spliced", spliced), ("zero", zero)):
            totals[name] += _ce(logits, batch) * n
        totals["kl_spliced"] += metrics.kl_divergence(clean[:, 1:-1], spliced[:, 1:-1]) * n
        totals["kl_zero"] += metrics.kl_divergence(clean[:, 1:-1], zero[:, 1:-1]) * n
        n_predictions += n
    ce = {k: v / n_predictions for k, v in totals.items()}
    return {
        "ce_clean": ce["clean"],
        "ce_spliced": ce["spliced"],
        "ce_zero_ablated": ce["zero"],
        "ce_loss_recovered": metrics.ce_loss_recovered(ce["clean"], ce["spliced"], ce["zero"]),
        "delta_ce": ce["spliced"] - ce["clean"],
        "kl_spliced": ce["kl_spliced"],
        "kl_zero_ablated": ce["kl_zero"],
        "predictions": n_predictions,
    }


def heldout_windows(
    model: LoadedModel,
    n_tokens: int,
    context_size: int = 128,
    seed: int = 0,
    corpus: str = "default",
) -> torch.Tensor:
    """[n_windows, context_size] BOS-first windows of `corpus`'s held-out documents, enough to
    score n_tokens."""
    n_windows = -(
        -n_tokens // (context_size - 2)
    )  # each window scores context_size - 2 predictions
    docs = load_corpus(corpus, split="heldout")
    return make_windows(docs, model.tokenizer, context_size, seed, n_windows).tokens


def _logits(model: LoadedModel, tokens: torch.Tensor, hook: str, replace) -> torch.Tensor:
    if replace is None:
        if fast_point(hook):  # the same modules as the spliced run below
            return model.fast(tokens, use_cache=False).logits.float()
        return model.bridge(tokens, return_type="logits").float()

    def splice(activation: torch.Tensor, hook=None) -> torch.Tensor:  # [b, ctx, d]
        out = activation.clone()
        out[:, 1:] = replace(activation[:, 1:].float()).to(activation.dtype)
        return out

    if fast_point(hook):  # block points: edited on the plain HF modules (see sae.hooks.editing)
        with editing(model, hook, splice):
            return model.fast(tokens, use_cache=False).logits.float()
    return model.bridge.run_with_hooks(
        tokens, fwd_hooks=[(hook, splice)], return_type="logits"
    ).float()


def _ce(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    """Mean next-token CE of tokens[:, 2:] given logits at positions 1..ctx-2."""
    predicted = logits[:, 1:-1].reshape(-1, logits.shape[-1])
    return torch.nn.functional.cross_entropy(predicted, tokens[:, 2:].reshape(-1)).item()
