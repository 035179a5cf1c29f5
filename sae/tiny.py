"""Tiny random models built in code: `tiny` (a 3-layer Llama) and `tiny-<family>` for every family.

No download: the tokenizer is a byte-level BPE whose merges are learned from a fixed paragraph, and
the weights are seeded. `tiny` keeps transformers' default initialisation (as the tests that pin its
numbers expect). `tiny-<family>` models get "lively" weights instead: every linear layer inside the
blocks drawn with std 1/√fan_in, so the residual stream is not drowned by the embedding and greedy
generations vary from token to token (a model that repeats one token cannot tell a correct engine
from a broken one).
"""

from __future__ import annotations

import hashlib

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from sae.families import (
    FAMILIES,
    TINY_D_MODEL,
    TINY_KV_HEADS,
    TINY_LAYERS,
    TINY_N_CTX,
    family_named,
    tiny_config,
)

# A fixed paragraph to learn the tiny tokenizer's merges from: deterministic, no download.
_TINY_TOKENIZER_TEXT = (
    "The quick brown fox jumps over the lazy dog. To be, or not to be, that is the question. "
    "In the beginning God created the heaven and the earth. And the earth was without form, "
    "and void; and darkness was upon the face of the deep. Of Man's first disobedience, and the "
    "fruit of that forbidden tree, whose mortal taste brought death into the world. Now is the "
    "winter of our discontent made glorious summer by this sun of York. What's in a name? That "
    "which we call a rose by any other name would smell as sweet. Friends, Romans, countrymen, "
    "lend me your ears; I come to bury Caesar, not to praise him. def main(): return 0\n"
)
TINY_PREFIX = "tiny-"
TINY_NAMES: tuple[str, ...] = ("tiny", *(TINY_PREFIX + name for name in FAMILIES))


def build_tiny_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes) whose merges are learned from a fixed text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TINY_TOKENIZER_TEXT], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        add_bos_token=True,
        name_or_path="tiny",
    )


def build_tiny(name: str, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerFast, str]:
    """(model, tokenizer, weights sha256) of `tiny` or `tiny-<family>`; the caller's RNG is kept."""
    tokenizer = build_tiny_tokenizer()
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if name == "tiny":
            hf = LlamaForCausalLM(_tiny_llama_config(tokenizer))
        else:
            family = family_named(name.removeprefix(TINY_PREFIX))
            config = tiny_config(
                family, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id
            )
            hf = AutoModelForCausalLM.from_config(config)  # sdpa where the family allows it
            _liven(hf, family.blocks(hf))
    finally:
        torch.random.set_rng_state(state)  # building a model must not move the user's RNG
    hf.config.architectures = [
        type(hf).__name__
    ]  # how the TransformerLens bridge picks its adapter
    hf.config.name_or_path = name
    return hf, tokenizer, state_dict_sha256(hf)


def _tiny_llama_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=TINY_D_MODEL,
        intermediate_size=4 * TINY_D_MODEL,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=TINY_KV_HEADS,  # GQA like SmolLM2 (9 heads, 3 KV heads)
        max_position_embeddings=TINY_N_CTX,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attn_implementation="sdpa",
    )


@torch.no_grad()
def _liven(hf: PreTrainedModel, blocks: torch.nn.ModuleList) -> None:
    """Draw every linear weight (and GPT-2's Conv1D) inside the blocks with std 1/√fan_in."""
    for module in blocks.modules():
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2:
            continue
        # nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out].
        fan_in = weight.shape[0] if type(module).__name__ == "Conv1D" else weight.shape[1]
        weight.normal_(0.0, fan_in**-0.5)


def state_dict_sha256(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
