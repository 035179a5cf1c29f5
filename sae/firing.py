"""Which latents fire: the dead-latent and dense-latent tracker every trainer keeps per hook.

A latent is dead when it has not fired in the last `dead_window` tokens (AuxK then trains it, and
the log reports the dead fraction); dense when it fires on more than 10% of the tokens since the
last log row (`sae.metrics.dense_fraction`). Both counters are checkpointed, so a resumed run sees
the same dead latents as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sae.codes import SparseCode
from sae.distributed import Distributed
from sae.metrics import dead_fraction, dense_fraction


def dead_window(dead_tokens: int, tokens: int, batch_size: int) -> int:
    """Tokens without firing after which a latent counts as dead: `dead_tokens`, or when it is 0 a
    fifth of the run's `tokens` (at least one batch, at most 1M), so that AuxK acts in short runs
    too."""
    return dead_tokens or min(1_000_000, max(batch_size, tokens // 5))


@dataclass
class FiringTracker:
    # [n_latents] int64: tokens seen since each latent last fired
    tokens_since_fired: torch.Tensor
    # [n_latents] int64: tokens each latent fired on since the last log row
    fire_counts: torch.Tensor

    @classmethod
    def zeros(cls, n_latents: int, device: torch.device | str = "cpu") -> FiringTracker:
        zeros = torch.zeros(n_latents, dtype=torch.int64, device=device)
        return cls(zeros.clone(), zeros.clone())

    def dead(self, window: int) -> torch.Tensor:
        """[n_latents] bool: latents that have not fired in the last `window` tokens."""
        return self.tokens_since_fired >= window

    def update(self, code: SparseCode, n_tokens: int, dist: Distributed | None = None) -> None:
        """Count one step's firings; n_tokens is the global batch's row count (all ranks).

        Fixed shapes only (a scatter-add of 0/1 and a masked fill, no boolean indexing and no
        bincount, whose CUDA kernel reads the largest id back), so the host never waits here."""
        fired = (code.values > 0).to(torch.int64)  # [nnz]
        counts = torch.zeros_like(self.fire_counts).scatter_add_(0, code.cols, fired)
        counts = (dist or Distributed()).sum(counts)  # every rank keeps the global counts
        self.fire_counts += counts
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired.masked_fill_(counts > 0, 0)

    def log_fractions(self, window: int, tokens_logged: int) -> dict[str, float]:
        """Dead and dense fractions for a log row, then a new dense-count window starts.

        tokens_logged: tokens since the previous log row (what fire_counts counted over)."""
        fractions = {
            "dead_fraction": dead_fraction(self.tokens_since_fired, window),
            "dense_fraction": dense_fraction(self.fire_counts, tokens_logged),
        }
        self.fire_counts.zero_()
        return fractions
