"""Next-token sampling: the one rule every generator in greylens uses (`Lens.monitor`, the engine).

Temperature 0 is greedy (the argmax of the logits). Otherwise the logits are divided by the
temperature, optionally cut to the `top_k` largest and then to the smallest head of tokens whose
probability reaches `top_p`, and one token is drawn from the softmax of what is left with the
caller's generator. The draw runs in fp32 on CPU, so a seeded request yields the same tokens on
any device and after a preemption (the generator carries on where it stopped).
"""

from __future__ import annotations

import torch
from torch import Tensor


def sample_token(
    logits: Tensor,
    generator: torch.Generator,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> int:
    """One token id from a logits row [vocab]; top_k 0 and top_p 1 keep every token."""
    if temperature <= 0:
        return int(logits.argmax())
    scaled = logits.float().cpu() / temperature  # [vocab]
    if top_k and top_k < scaled.numel():
        kth = scaled.topk(top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = scaled.sort(descending=True)
        probs = ordered.softmax(-1)
        # Keep a token while the mass before it is under top_p: the smallest head reaching top_p.
        outside = probs.cumsum(-1) - probs > top_p
        scaled[order[outside]] = float("-inf")
    return int(torch.multinomial(scaled.softmax(-1), 1, generator=generator))
