"""First-letter spelling task: sparse probing accuracy and feature absorption, to compare SAEs.

The task (Chanin et al. 2024, "A is for Absorption"): does this token start with letter L? The
stages, one module each:

    data        the store's word tokens and their letter (letter_task_data, pick_letters)
    splits      one balanced train/test task per letter, held out by token id
    codes       checks and sparse gathers over SAE codes (dense or SparseCode)
    probing     k-sparse probes on the code, the dense probe on the residual (the ceiling)
    absorption  the upper-bound rate and Chanin et al.'s full absorption / absorption fraction
    metrics     letter_metrics: every column for one SAE in one encoding pass

    from graphs.eval.letters import letter_task_data, letter_metrics
    data = letter_task_data(store, hook, tokenizer)
    letter_metrics(sae.encode, data, decoder=sae.W_dec)   # decoder: Chanin-style absorption
"""

from graphs.eval.letters.absorption import absorption_rate, chanin_absorption, chanin_cos_threshold
from graphs.eval.letters.data import LetterTaskData, letter_task_data, pick_letters
from graphs.eval.letters.metrics import letter_metrics
from graphs.eval.letters.probing import dense_probe_accuracy, sparse_probe_accuracy

__all__ = [
    "LetterTaskData",
    "absorption_rate",
    "chanin_absorption",
    "chanin_cos_threshold",
    "dense_probe_accuracy",
    "letter_metrics",
    "letter_task_data",
    "pick_letters",
    "sparse_probe_accuracy",
]
