"""greylens.sae: models, hook points, corpus, harvesting and the activation store.

from sae import load_model, HarvestConfig, harvest, ActivationStore
"""

from sae.corpus import load_corpus
from sae.harvest import HarvestConfig, harvest, harvest_stream
from sae.models import LoadedModel, load_model
from sae.store import ActivationStore, StoreError

__all__ = [
    "ActivationStore",
    "HarvestConfig",
    "LoadedModel",
    "StoreError",
    "harvest",
    "harvest_stream",
    "load_corpus",
    "load_model",
]
