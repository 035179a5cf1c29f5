"""Model identity: the `model` record every artefact keeps, and the one check that an artefact
(activation store, SAE, probe) belongs to the model it is about to be used with.

The record is `LoadedModel.identity()`:

    {"spec": "org/name", "family": "llama", "revision": "<hub commit or ''>",
     "weights_sha256": "<64 hex>", "dtype": "float32"}

It is written into a store's manifest.json (`model_record`), an SAE's cfg.json (`model_record`), a
probe's probe.json (`model_record`) and a release's card. Artefacts written before the record
existed still load: their missing fields count as unknown and are not checked (the older
top-level `weights_sha256` is used when present).
"""

from __future__ import annotations

import warnings

from sae.models import LoadedModel


class ModelMismatchError(ValueError):
    """An artefact made from one model is being used with another."""


def check_model_matches(
    what: str,
    model: LoadedModel,
    record: dict | None = None,
    d_model: int | None = None,
    hooks: list[str] | tuple[str, ...] = (),
    weights_sha256: str = "",
) -> None:
    """Refuse, before any work, to use artefact `what` with a model it was not made from.

    Checks d_model, that every hook is a hook point of the model, the family, and the weights
    hash (from the record, else the artefact's legacy `weights_sha256`). The compute dtype and the
    spec's spelling are not checked: the same weights in bf16, or by path instead of hub id, are the
    same model.
    """
    record = record or {}
    if d_model is not None and d_model != model.d_model:
        raise ModelMismatchError(
            f"{what} has d_model {d_model} but {model.name} has {model.d_model}: it was made "
            f"from another model{_made_from(record)}; load that model instead"
        )
    missing = [h for h in hooks if h not in model.bridge.hook_dict]
    if missing:
        raise ModelMismatchError(
            f"{what} reads hook point(s) {', '.join(missing)}, which {model.name} does not have "
            f"(layers 0..{model.n_layers - 1}){_made_from(record)}"
        )
    family = record.get("family")
    if family and family != model.family.name:
        raise ModelMismatchError(
            f"{what} was made from a {family} model{_made_from(record)}; {model.name} is a "
            f"{model.family.name} model. Load the model it was made from"
        )
    expected = record.get("weights_sha256") or weights_sha256
    if expected and expected != model.weights_sha256:
        raise ModelMismatchError(
            f"{what} was made from other weights{_made_from(record)} (sha256 {expected[:12]}…) "
            f"than {model.name}'s ({model.weights_sha256[:12]}…); load the model it was made "
            "from, or re-make it from this one"
        )
    if not expected:
        warnings.warn(
            f"{what} does not record which weights it was made from; assuming it fits "
            f"{model.name} (d_model and hook points do match)",
            stacklevel=2,
        )


def _made_from(record: dict) -> str:
    return f" ({record['spec']})" if record.get("spec") else ""
