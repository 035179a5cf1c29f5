"""Every first-letter column for one SAE in one pass: sparse probing, dense ceiling, absorption."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from graphs.coders import encode_codes
from graphs.eval.letters.absorption import absorption, chanin_cos_threshold, chanin_letter
from graphs.eval.letters.codes import Codes, check_decoder, check_task, nanmean
from graphs.eval.letters.data import LetterTaskData, pick_letters
from graphs.eval.letters.probing import accuracy, fit_dense, sparse_probe
from graphs.eval.letters.splits import letter_split
from sae.sae import SparseCode


def letter_metrics(
    encode: Callable[[Tensor], Tensor | SparseCode],
    data: LetterTaskData,
    letters: Sequence[int] | None = None,
    ks: Sequence[int] = (1, 2, 5),
    batch_size: int = 4096,
    train_frac: float = 0.7,
    seed: int = 0,
    decoder: Tensor | None = None,
) -> dict:
    """Both evaluation columns for one SAE: encode maps raw x [B, d] to codes [B, n_latents].

    Returns {"sparse_probe": {k: acc}, "dense_probe": acc, "absorption": rate, "letters": [...],
    "per_letter": {L: {...}}}; every split is shared between the measurements. With decoder
    ([n_latents, d_model] rows in x's space) also Chanin et al.'s "full_absorption" and
    "absorption_fraction" (`chanin_absorption`) and each letter's "main_features"."""
    groups = data.token_ids
    letters = list(letters) if letters is not None else pick_letters(data.labels, groups)
    if decoder is not None:  # before the encoding pass
        check_decoder(decoder, data.x.shape[1])
    codes = encode_codes(encode, data.x, batch_size)
    check_task(codes, data.labels, letters, ks, data.x)
    if decoder is not None:
        check_decoder(decoder, data.x.shape[1], codes)
    per_letter = {L: _letter_row(codes, data, L, ks, train_frac, seed, decoder) for L in letters}
    rows = list(per_letter.values())
    result = {
        "sparse_probe": {k: sum(p["sparse_probe"][k] for p in rows) / len(rows) for k in ks},
        "dense_probe": sum(p["dense_probe"] for p in rows) / len(rows),
        "absorption": nanmean([p["absorption"] for p in rows]),
        "letters": letters,
        "per_letter": per_letter,
    }
    if decoder is not None:
        for key in ("full_absorption", "absorption_fraction"):
            result[key] = nanmean([p[key] for p in rows])
    return result


def _letter_row(
    codes: Codes,
    data: LetterTaskData,
    letter: int,
    ks: Sequence[int],
    train_frac: float,
    seed: int,
    decoder: Tensor | None,
) -> dict:
    """One letter's measurements, all on one split and one dense probe."""
    split = letter_split(data.labels, letter, train_frac, seed, data.token_ids)
    sparse, main = sparse_probe(codes, split, ks)
    probe = fit_dense(data.x, split)
    dense_pred = probe.predict(data.x[split.test].float())
    row = {
        "sparse_probe": sparse,
        "dense_probe": accuracy(dense_pred, split.y_test),
        "absorption": absorption(codes, split, main, dense_pred),
        "main_feature": main,
        "n_train": len(split.train),
        "n_test": len(split.test),
    }
    if decoder is not None:
        cos_min = chanin_cos_threshold(data.x.shape[1])
        row |= chanin_letter(codes, data.x, split, decoder, cos_min, probe)
    return row
