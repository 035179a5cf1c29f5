"""`python -m graphs eval`: every evaluation of a trained graph autoencoder, as one JSON report.

    reconstruction  always: FVU, L0 before / after the graph step, graph size (`reconstruction`);
                    with --model also CE loss recovered, the graph spliced into the model
    --letters       first-letter sparse probing and absorption on the store's words (`letters`)
    --planted       edge recovery against the planted hierarchy of a synthetic store (`recovery`)
    --transition T  faithfulness of the reasoning paths through T (`faithfulness`)

The reconstruction keys sit at the top level of the report; each option adds one section.
"""

from __future__ import annotations

from dataclasses import dataclass

from graphs.coders import AsSAE
from graphs.eval.faithfulness import attribution_correlation, edge_interventions
from graphs.eval.letters import letter_metrics, letter_task_data
from graphs.eval.planted import hierarchy_from_store
from graphs.eval.reconstruction import graph_metrics
from graphs.eval.recovery import edge_recovery
from graphs.explain import load_explainer
from graphs.io import load_graph_sae
from graphs.model import SparseGraphAutoencoder
from sae.device import ComputeDtype
from sae.evaluate import heldout_windows, splice_metrics
from sae.models import LoadedModel, load_model
from sae.store import ActivationStore

DEFAULT_TEXTS = (
    "And God said, Let there be light: and there was light.|"
    "To be, or not to be, that is the question."
)


@dataclass
class EvalConfig:
    graph: str = ""
    """Graph autoencoder directory (`python -m graphs train`)."""
    store: str = ""
    """Held-out activation store for reconstruction metrics (and the first-letter task)."""
    model: str = ""
    """Also splice into this model for CE loss recovered (a model spec: smollm2-135m,
    tiny-<family>, a local HF directory, a .gguf, org/name). --letters and --transition read it
    too (default there: the store's model)."""
    device: str = "auto"
    """Device of the model: cpu, cuda, cuda:N, or auto (cuda when there is one)."""
    dtype: ComputeDtype = "auto"
    """Compute dtype of the model: auto is float32 on CPU, bfloat16 on CUDA."""
    tokens: int = 8192
    """Held-out tokens to score when splicing."""
    max_store_tokens: int = 0
    """Cap on store tokens (0: all)."""
    letters: bool = False
    """Also first-letter sparse probing and feature absorption of the graph's code
    (graphs.eval.letters), on the store's word tokens."""
    letter_tokens: int = 100_000
    """Store tokens the first-letter task samples."""
    planted: bool = False
    """Also edge recovery against the planted hierarchy of a synthetic store (one written by
    graphs.eval.planted.write_store)."""
    transition: str = ""
    """Also faithfulness of reasoning paths through this transition directory (`python -m graphs
    transition` from this graph): edges checked by ablation, paths against grad × activation."""
    texts: str = DEFAULT_TEXTS
    """Texts whose predictions the faithfulness checks explain, separated by '|'."""


def evaluate(cfg: EvalConfig) -> dict:
    """The report: reconstruction keys at the top, then one section per requested evaluation."""
    if not cfg.graph or not cfg.store:
        raise ValueError("pass --graph DIR (a graph autoencoder) and --store DIR (held-out text)")
    model, store = load_graph_sae(cfg.graph), ActivationStore(cfg.store)
    hierarchy = hierarchy_from_store(store) if cfg.planted else None  # refuses before any work
    result = {"graph": cfg.graph, **graph_metrics(model, store, cfg.max_store_tokens or None)}
    lm = _model(cfg, store) if cfg.model or cfg.letters or cfg.transition else None
    if cfg.model:
        result.update(splice_metrics(lm, AsSAE(model), heldout_windows(lm, cfg.tokens)))
    if cfg.letters:
        result["letters"] = letters_report(model, store, lm, cfg.letter_tokens)
    if hierarchy is not None:
        edges, strengths = model.active_edges()
        result["planted"] = edge_recovery(edges, strengths, model.sae.W_dec.detach(), hierarchy)
    if cfg.transition:
        explainer = load_explainer(lm, cfg.graph, cfg.transition)
        texts = [t.strip() for t in cfg.texts.split("|") if t.strip()]
        result["faithfulness"] = {
            **edge_interventions(explainer, texts),
            **attribution_correlation(explainer, texts),
        }
    return result


def letters_report(
    model: SparseGraphAutoencoder, store: ActivationStore, lm: LoadedModel, max_tokens: int
) -> dict:
    """`letter_metrics` of the graph's post-propagation code, with Chanin-style absorption."""
    data = letter_task_data(store, model.sae.cfg.hook, lm.tokenizer, max_tokens=max_tokens)
    return letter_metrics(AsSAE(model).encode, data, decoder=model.sae.W_dec.detach())


def _model(cfg: EvalConfig, store: ActivationStore) -> LoadedModel:
    return load_model(cfg.model or store.manifest.model, cfg.device, cfg.dtype)
