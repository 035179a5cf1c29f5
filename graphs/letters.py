"""First-letter spelling task: sparse probing accuracy and feature absorption, to compare SAEs.

The task (Chanin et al. 2024, "A is for Absorption"): does this token start with letter L?
Every activation-store row keeps its token id, so labels come from the tokenizer alone.

- Sparse probing (k-sparse probes, Gurnee et al. 2023; SAEBench's selection rule): per letter,
  a balanced binary task "starts with L" vs any other letter; pick the k latents with the largest
  |class-mean difference| on the train split, fit a logistic regression on those k alone, score
  it on the held-out split.
  `dense_probe_accuracy` is the same probe on the whole standardised residual: the ceiling.
- Absorption, simplified from Chanin et al.: the main latent of L has the largest *signed* mean
  difference (it fires more on L; with |.| a latent for the other letters could win). Among
  positive test tokens the dense probe gets right (the residual does carry "starts with L"),
  the rate is the fraction on which the main latent stays silent (activation <= 0). Chanin et al.
  additionally require an absorbing latent aligned with the probe direction; counting every
  silent case makes this an upper bound on theirs (it includes plain false negatives).
- Absorption as Chanin et al. measure it (`chanin_absorption`, or `letter_metrics(decoder=...)`),
  which needs the decoder rows:
  * main latents: the latents that fire for L, by signed mean difference, are added one at a
    time while the next one raises the k-sparse probe's train F1 by more than 0.03 (their
    feature-splitting rule, tau_fs): a letter split over two latents has two main latents;
  * full absorption: among the same probe-correct test positives, the fraction on which every
    main latent is silent *and* the active latent that adds most to the probe's logit
    (a_i d_i . p, p the dense probe's direction in x's space; for a linear probe that is the
    ablation effect they compute) points along the probe, cos(d_i, p) >= tau_ps;
  * absorption fraction (after SAEBench's partial absorption): per probe-correct positive, the
    share of the positive logit contributions carried by non-main latents with cos >= tau_ps.
  tau_ps is theirs, 0.025 at d_model 2304, scaled by sqrt(2304 / d_model) so that it passes the
  same share of random directions (~12%) at any width: 0.05 for SmolLM2's 576. Unscaled, 0.025
  would pass 27% of random directions there.

Judgement calls:
- Labelled tokens are whole words of ASCII letters after leading whitespace and the 'Ġ' / '▁'
  markers, as Chanin's `get_alpha_tokens`; single letters (" a", " I") count (min_letters=1).
- `letter_task_data` keeps at most `max_per_token` occurrences of each token id, or frequent
  words ("the" for t) would make a letter's task a token-identity task.
- When token ids are known (`groups`), train and test split by token id: the probes are scored
  on tokens they never saw, like Chanin's held-out vocabulary. The layer-15 residual identifies
  the token itself, so a row-level split would reward memorising token identities.
- Every split is class-balanced (the larger class subsampled), so chance accuracy is 0.5.
- Codes are a dense [N, n_latents] tensor or a `SparseCode`; `letter_metrics` keeps them sparse
  because 100k tokens x 9216 latents would be 3.7 GB dense. Nothing copies the code per letter:
  mean differences are one weighted sum over rows, then only the chosen columns are gathered.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from graphs.logistic import Logistic, fit_logistic
from sae.sae import SparseCode
from sae.store import ActivationStore

LETTERS = string.ascii_lowercase
MIN_POSITIVES = 50  # letters=None keeps letters with at least this many positive tokens ...
MAX_LETTERS = 10  # ... at most this many, the most frequent first
MIN_TYPES = 4  # ... and, when splitting by token id, at least this many distinct positive tokens
MAX_PER_CLASS = 10_000  # per split and class: keeps an L-BFGS probe on 576 dims to seconds
SPLIT_F1_GAIN = 0.03  # Chanin et al.'s tau_fs: a further main latent must add this much train F1
MAX_MAIN_LATENTS = 5  # ... and at most this many main latents per letter
_LEADING = re.compile(r"^[\sĠ▁]+")  # whitespace and the byte-BPE / SentencePiece space markers

Codes = Tensor | SparseCode  # dense [N, n_latents] (non-negative) or row-sorted COO


class LetterTaskData(NamedTuple):
    x: Tensor  # [N, d_model] float32 raw activations
    labels: Tensor  # [N] int64 in 0..25
    token_ids: Tensor | None = None  # [N] int64; when given, splits hold out whole token ids


# --------------------------------------------------------------------------- labels and data


def first_letter_labels(token_ids: Tensor, tokenizer, min_letters: int = 1) -> Tensor:
    """Letter 0..25 of each token (case-insensitive); -1 unless the token is a word of letters.

    A token counts when its decoded text, with leading whitespace / 'Ġ' / '▁' removed, is at
    least `min_letters` ASCII letters and nothing else; special tokens never count."""
    ids = torch.as_tensor(token_ids).long()
    unique, inverse = ids.unique(return_inverse=True)  # decode each distinct id once
    special = set(getattr(tokenizer, "all_special_ids", []))
    ids_list = unique.tolist()
    texts = tokenizer.batch_decode([[i] for i in ids_list], clean_up_tokenization_spaces=False)
    table = [
        -1 if i in special else _letter_of(t, min_letters)
        for i, t in zip(ids_list, texts, strict=True)
    ]
    return torch.tensor(table, dtype=torch.int64)[inverse]  # same shape as token_ids


def _letter_of(text: str, min_letters: int) -> int:
    word = _LEADING.sub("", text)
    if len(word) < max(min_letters, 1) or not all(c in string.ascii_letters for c in word):
        return -1
    return ord(word[0].lower()) - ord("a")


def letter_task_data(
    store: ActivationStore,
    hook: str,
    tokenizer,
    max_tokens: int = 100_000,
    seed: int = 0,
    max_per_token: int | None = 32,
    chunk: int = 16_384,
) -> LetterTaskData:
    """The store's letter-labelled rows: a seeded subsample, in store order, x in float32."""
    if hook not in store.hooks:
        raise ValueError(f"{store.directory} has no hook {hook!r}; pass one of {store.hooks}")
    token_ids = torch.cat(
        [store.shard(s)["token_ids"].long() for s in range(len(store.manifest.shards))]
    )  # [n_rows], read alone so no activation is touched before the subsample is known
    labels = first_letter_labels(token_ids, tokenizer)
    rows = (labels >= 0).nonzero().squeeze(1)
    if len(rows) == 0:
        raise ValueError(f"{store.directory} has no token that is a word of letters: harvest text")
    g = torch.Generator().manual_seed(seed)
    rows = rows[torch.randperm(len(rows), generator=g)]  # random order: the caps keep a random set
    if max_per_token is not None:
        rows = rows[_rank_in_group(token_ids[rows]) < max_per_token]
    rows = rows[:max_tokens].sort().values  # [N], sorted so shard reads stay sequential
    bar = tqdm(range(0, len(rows), chunk), desc="letter rows", leave=False)
    x = torch.cat([store.rows(rows[i : i + chunk], [hook])[hook] for i in bar])  # [N, d_model]
    return LetterTaskData(x, labels[rows], token_ids[rows])


def _rank_in_group(groups: Tensor) -> Tensor:
    """[n] how many earlier rows share each row's group (0 for a group's first row)."""
    n = len(groups)
    order = torch.argsort(groups, stable=True)
    sorted_groups = groups[order]
    starts = torch.ones(n, dtype=torch.bool)
    starts[1:] = sorted_groups[1:] != sorted_groups[:-1]
    first_of_group = torch.arange(n)[starts][starts.cumsum(0) - 1]  # [n] start of each row's run
    rank = torch.empty(n, dtype=torch.int64)
    rank[order] = torch.arange(n) - first_of_group
    return rank


# --------------------------------------------------------------------------- balanced splits


class _Split(NamedTuple):
    train: Tensor  # [n_train] row indices
    y_train: Tensor  # [n_train] bool: starts with the letter
    test: Tensor  # [n_test]
    y_test: Tensor  # [n_test]


def _letter_split(
    labels: Tensor, letter: int, train_frac: float, seed: int, groups: Tensor | None
) -> _Split:
    """The balanced task for one letter; the same (seed, letter) gives the same split everywhere,
    so sparse probes, the dense probe and absorption all see the same tokens."""
    g = torch.Generator().manual_seed(seed * len(LETTERS) + letter)
    pos = (labels == letter).nonzero().squeeze(1)
    neg = ((labels >= 0) & (labels != letter)).nonzero().squeeze(1)
    pos_train, pos_test = _split_rows(pos, train_frac, g, groups, f"letter {LETTERS[letter]!r}")
    neg_train, neg_test = _split_rows(neg, train_frac, g, groups, f"not-{LETTERS[letter]!r}")
    return _Split(*_balance(pos_train, neg_train, g), *_balance(pos_test, neg_test, g))


def _split_rows(
    rows: Tensor, train_frac: float, g: torch.Generator, groups: Tensor | None, what: str
) -> tuple[Tensor, Tensor]:
    units = rows if groups is None else groups[rows].unique()  # what gets assigned to a side
    if len(units) < 2:
        kind = "tokens" if groups is None else "distinct token ids"
        raise ValueError(f"{what} has {len(units)} {kind}, a split needs 2: drop it or add tokens")
    n_train = min(max(round(train_frac * len(units)), 1), len(units) - 1)
    train_units = units[torch.randperm(len(units), generator=g)[:n_train]]
    in_train = torch.isin(rows if groups is None else groups[rows], train_units)
    return rows[in_train], rows[~in_train]


def _balance(pos: Tensor, neg: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
    n = min(len(pos), len(neg), MAX_PER_CLASS)
    pos = pos[torch.randperm(len(pos), generator=g)[:n]]
    neg = neg[torch.randperm(len(neg), generator=g)[:n]]
    y = torch.arange(2 * n) < n  # [2n] positives first
    return torch.cat([pos, neg]), y


# --------------------------------------------------------------------------- codes and probes


def _mean_difference(codes: Codes, rows: Tensor, y: Tensor) -> Tensor:
    """[n_latents] mean code on positive rows minus mean on negative rows, rows not copied."""
    weight = torch.zeros(_n_rows(codes), dtype=torch.float64)  # +1/n_pos, -1/n_neg, 0 elsewhere
    weight[rows[y]] = 1.0 / max(int(y.sum()), 1)
    weight[rows[~y]] = -1.0 / max(int((~y).sum()), 1)
    if isinstance(codes, SparseCode):
        contrib = weight[codes.rows] * codes.values.double()  # [nnz]
        n_latents = int(codes.cols.max()) + 1 if len(codes.cols) else 1
        return torch.zeros(n_latents, dtype=torch.float64).index_add_(0, codes.cols, contrib)
    return weight.to(codes.dtype) @ codes


def _gather(codes: Codes, rows: Tensor, cols: Tensor) -> Tensor:
    """[len(rows), len(cols)] float32 sub-matrix of the code (rows distinct)."""
    if not isinstance(codes, SparseCode):
        return codes[rows[:, None], cols[None, :]].float()
    slot = torch.full((codes.n_rows,), -1, dtype=torch.int64)
    slot[rows] = torch.arange(len(rows))
    keep = torch.isin(codes.cols, cols) & (slot[codes.rows] >= 0)  # [nnz]
    col_slot = (codes.cols[keep, None] == cols[None, :]).int().argmax(1)
    out = torch.zeros(len(rows), len(cols))
    index = (slot[codes.rows[keep]], col_slot)
    return out.index_put_(index, codes.values[keep].float(), accumulate=True)


PROBE_L2 = 5e-4  # L2 strength of every letter probe: keeps separable tasks finite


def _fit_logistic(x: Tensor, y: Tensor) -> Logistic:
    """A letter probe: `graphs.logistic.fit_logistic` on float32 x with the sample std."""
    return fit_logistic(x, y, PROBE_L2, correction=1)


def _accuracy(pred: Tensor, y: Tensor) -> float:
    return float((pred == y).float().mean())


def _sparse_probe(codes: Codes, split: _Split, ks: Sequence[int]) -> tuple[dict[int, float], int]:
    """Held-out accuracy of the k-sparse probe for each k, and the main latent (largest signed
    mean difference: the one that fires *for* the letter)."""
    diff = _mean_difference(codes, split.train, split.y_train)  # [n_latents]
    diff = F.pad(diff, (0, max(max(ks) - len(diff), 0)))  # silent tail latents of a SparseCode
    top = torch.sort(diff.abs(), descending=True, stable=True).indices[: max(ks)]  # nested k-sets
    train_x, test_x = _gather(codes, split.train, top), _gather(codes, split.test, top)  # [n, k]
    accuracy = {}
    for k in ks:
        probe = _fit_logistic(train_x[:, :k], split.y_train)
        accuracy[k] = _accuracy(probe.predict(test_x[:, :k]), split.y_test)
    return accuracy, int(torch.argmax(diff))


def _fit_dense(x: Tensor, split: _Split) -> Logistic:
    """The dense probe: a logistic regression on the whole residual, fitted on the train rows."""
    return _fit_logistic(x[split.train].float(), split.y_train)


def _dense_probe(x: Tensor, split: _Split) -> Tensor:
    """[n_test] bool: the dense probe's predictions on the test rows."""
    return _fit_dense(x, split).predict(x[split.test].float())


def chanin_cos_threshold(d_model: int) -> float:
    """tau_ps: Chanin et al.'s 0.025 at d_model 2304, scaled to keep its share of random cosines."""
    return 0.025 * math.sqrt(2304 / d_model)


def _f1(pred: Tensor, y: Tensor) -> float:
    tp = int((pred & y).sum())
    return 2 * tp / max(int(pred.sum()) + int(y.sum()), 1)


def _main_latents(codes: Codes, split: _Split) -> Tensor:
    """[k] the letter's main latents by Chanin et al.'s feature-splitting rule: candidates in order
    of signed mean difference (latents that fire *for* the letter), added while the next one
    raises the k-sparse probe's train F1 by more than SPLIT_F1_GAIN."""
    diff = _mean_difference(codes, split.train, split.y_train)
    order = torch.sort(diff, descending=True, stable=True).indices[:MAX_MAIN_LATENTS]
    train_x = _gather(codes, split.train, order)  # [n_train, MAX_MAIN_LATENTS]
    f1 = [
        _f1(_fit_logistic(train_x[:, :k], split.y_train).predict(train_x[:, :k]), split.y_train)
        for k in range(1, len(order) + 1)
    ]
    k = 1
    while k < len(order) and f1[k] - f1[k - 1] > SPLIT_F1_GAIN:
        k += 1
    return order[:k]


def _active_entries(codes: Codes, rows: Tensor) -> SparseCode:
    """The active entries of the given (distinct) rows, re-indexed 0..len(rows)-1."""
    if not isinstance(codes, SparseCode):
        sub = codes[rows]
        r, c = sub.nonzero(as_tuple=True)
        return SparseCode(sub[r, c].float(), c, r, len(rows))
    slot = torch.full((codes.n_rows,), -1, dtype=torch.int64)
    slot[rows] = torch.arange(len(rows))
    keep = (slot[codes.rows] >= 0) & (codes.values > 0)
    return SparseCode(
        codes.values[keep].float(), codes.cols[keep], slot[codes.rows[keep]], len(rows)
    )


def _chanin_absorption(
    codes: Codes, mains: Tensor, probe: Logistic, known: Tensor, decoder: Tensor, cos_min: float
) -> tuple[float, float]:
    """(full absorption, absorption fraction) of one letter over its probe-correct positives
    `known`; decoder: [n_latents, d_model] rows in x's space (any common scale)."""
    if len(known) == 0:
        return float("nan"), float("nan")
    direction = probe.w / probe.std  # the probe's logit is direction . x + const
    direction = direction / direction.norm()
    active = _active_entries(codes, known)
    rows_dec = decoder.float().index_select(0, active.cols)  # [nnz, d]
    along = rows_dec @ direction  # [nnz] d_i . p
    cos = along / rows_dec.norm(dim=1).clamp_min(1e-12)
    contrib = active.values * along  # [nnz] what each active latent adds to the probe's logit
    is_main = torch.isin(active.cols, mains)
    n = len(known)
    main_fires = torch.zeros(n, dtype=torch.bool).index_fill_(0, active.rows[is_main], True)
    # the top contributor of each row (Chanin: the latent whose ablation moves the probe most)
    best = torch.full((n,), -float("inf")).scatter_reduce(0, active.rows, contrib, "amax")
    top = contrib == best[active.rows]
    aligned_top = torch.zeros(n, dtype=torch.bool).index_fill_(
        0, active.rows[top & (cos >= cos_min) & (contrib > 0)], True
    )
    full = float((~main_fires & aligned_top).float().mean())
    positive = contrib.clamp_min(0)
    absorbing = positive * (~is_main & (cos >= cos_min))
    total = torch.zeros(n).index_add_(0, active.rows, positive)
    carried = torch.zeros(n).index_add_(0, active.rows, absorbing)
    fraction = float(torch.where(total > 0, carried / total.clamp_min(1e-12), 0.0).mean())
    return full, fraction


def _absorption(codes: Codes, split: _Split, main: int, dense_pred: Tensor) -> float:
    """Fraction of test positives the dense probe gets right on which the main latent is 0."""
    known = split.test[split.y_test & dense_pred]  # [n_known] rows
    if len(known) == 0:
        return float("nan")  # the residual does not carry the letter here: nothing to absorb
    return float((_gather(codes, known, torch.tensor([main]))[:, 0] <= 0).float().mean())


# --------------------------------------------------------------------------- public metrics


def _n_rows(codes: Codes) -> int:
    return codes.n_rows if isinstance(codes, SparseCode) else codes.shape[0]


def _check(
    codes: Codes | None,
    labels: Tensor,
    letters: Sequence[int],
    ks: Sequence[int] = (1,),
    x: Tensor | None = None,
) -> None:
    """Fail before any probe is fitted, naming the fix."""
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D [N], got shape {tuple(labels.shape)}")
    if bad := [L for L in letters if not 0 <= int(L) < len(LETTERS)]:
        raise ValueError(f"letters must be indices 0..25 (a..z); got {bad}")
    if not letters:
        raise ValueError("no letters to evaluate: pass letters, or letter_metrics(letters=None)")
    if x is not None and (x.ndim != 2 or len(x) != len(labels)):
        raise ValueError(f"x must be [N={len(labels)}, d_model], got {tuple(x.shape)}")
    if codes is None:
        return
    if _n_rows(codes) != len(labels):
        raise ValueError(f"codes have {_n_rows(codes)} rows, labels {len(labels)}: same tokens?")
    values = codes.values if isinstance(codes, SparseCode) else codes
    if values.numel() and float(values.min()) < 0:
        raise ValueError("codes are negative somewhere: pass post-activation SAE codes")
    # a SparseCode does not know its width (its top latents may never fire), so only dense is capped
    top = codes.shape[1] if not isinstance(codes, SparseCode) else float("inf")
    if bad_k := [k for k in ks if not 1 <= k <= top]:
        raise ValueError(f"ks must be in 1..n_latents ({top}); got {bad_k}")


def sparse_probe_accuracy(
    codes: Codes,
    labels: Tensor,
    letters: Sequence[int],
    ks: Sequence[int] = (1, 2, 5),
    train_frac: float = 0.7,
    seed: int = 0,
    groups: Tensor | None = None,
) -> dict[int, float]:
    """Mean over letters of the balanced held-out accuracy of a k-sparse probe, for each k."""
    _check(codes, labels, letters, ks)
    splits = [_letter_split(labels, L, train_frac, seed, groups) for L in letters]
    per_letter = [_sparse_probe(codes, split, ks)[0] for split in splits]
    return {k: sum(a[k] for a in per_letter) / len(per_letter) for k in ks}


def dense_probe_accuracy(
    x: Tensor,
    labels: Tensor,
    letters: Sequence[int],
    train_frac: float = 0.7,
    seed: int = 0,
    groups: Tensor | None = None,
) -> float:
    """Mean over letters of the balanced held-out accuracy of a logistic probe on the residual."""
    _check(None, labels, letters, x=x)
    accuracies = []
    for L in letters:
        split = _letter_split(labels, L, train_frac, seed, groups)
        accuracies.append(_accuracy(_dense_probe(x, split), split.y_test))
    return sum(accuracies) / len(accuracies)


def absorption_rate(
    codes: Codes,
    x: Tensor,
    labels: Tensor,
    letters: Sequence[int],
    seed: int = 0,
    train_frac: float = 0.7,
    groups: Tensor | None = None,
) -> dict:
    """{"absorption": mean over letters, "per_letter": {L: rate}, "main_feature": {L: latent}}.

    A letter whose dense probe gets no test positive right has rate NaN, left out of the mean."""
    _check(codes, labels, letters, x=x)
    per_letter, main_feature = {}, {}
    for L in letters:
        split = _letter_split(labels, L, train_frac, seed, groups)
        _, main_feature[L] = _sparse_probe(codes, split, (1,))
        per_letter[L] = _absorption(codes, split, main_feature[L], _dense_probe(x, split))
    rates = list(per_letter.values())
    return {"absorption": _nanmean(rates), "per_letter": per_letter, "main_feature": main_feature}


def chanin_absorption(
    codes: Codes,
    x: Tensor,
    labels: Tensor,
    letters: Sequence[int],
    decoder: Tensor,
    seed: int = 0,
    train_frac: float = 0.7,
    groups: Tensor | None = None,
    cos_min: float | None = None,
) -> dict:
    """{"full_absorption", "absorption_fraction": means over letters, "per_letter": {L: {...}}}.

    Absorption as Chanin et al. measure it (module docstring); decoder: [n_latents, d_model] rows in
    x's space; cos_min: tau_ps (default `chanin_cos_threshold(d_model)`)."""
    _check(codes, labels, letters, x=x)
    _check_decoder(decoder, x.shape[1], codes)
    cos_min = chanin_cos_threshold(x.shape[1]) if cos_min is None else cos_min
    per_letter = {
        L: _chanin_letter(
            codes, x, _letter_split(labels, L, train_frac, seed, groups), decoder, cos_min
        )
        for L in letters
    }
    return {
        "full_absorption": _nanmean([p["full_absorption"] for p in per_letter.values()]),
        "absorption_fraction": _nanmean([p["absorption_fraction"] for p in per_letter.values()]),
        "per_letter": per_letter,
    }


def _check_decoder(decoder: Tensor, d_model: int, codes: Codes | None = None) -> None:
    if decoder.ndim != 2 or decoder.shape[1] != d_model:
        raise ValueError(
            f"decoder must be [n_latents, d_model={d_model}] rows in x's space, got {tuple(decoder.shape)}"
        )
    if codes is not None:
        width = (
            (int(codes.cols.max()) + 1 if len(codes.cols) else 0)
            if isinstance(codes, SparseCode)
            else codes.shape[1]
        )
        if width > decoder.shape[0]:
            raise ValueError(
                f"the codes use latent {width - 1} but the decoder has {decoder.shape[0]} rows: same SAE?"
            )


def _chanin_letter(
    codes: Codes,
    x: Tensor,
    split: _Split,
    decoder: Tensor,
    cos_min: float,
    probe: Logistic | None = None,
) -> dict:
    probe = probe or _fit_dense(x, split)
    known = split.test[split.y_test & probe.predict(x[split.test].float())]
    mains = _main_latents(codes, split)
    full, fraction = _chanin_absorption(codes, mains, probe, known, decoder, cos_min)
    return {
        "full_absorption": full,
        "absorption_fraction": fraction,
        "main_features": mains.tolist(),
    }


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if v == v]
    return sum(kept) / len(kept) if kept else float("nan")


def pick_letters(labels: Tensor, groups: Tensor | None = None) -> list[int]:
    """Letters with MIN_POSITIVES+ tokens (and MIN_TYPES+ token ids), most frequent first, at most
    MAX_LETTERS of them."""
    counts = torch.bincount(labels[labels >= 0], minlength=len(LETTERS))  # [26]
    order = torch.sort(counts, descending=True, stable=True).indices.tolist()
    picked = [L for L in order if counts[L] >= MIN_POSITIVES]
    if groups is not None:
        picked = [L for L in picked if len(groups[labels == L].unique()) >= MIN_TYPES]
    if not picked:
        counted = dict(zip(LETTERS, counts.tolist(), strict=True))
        raise ValueError(
            f"no letter has {MIN_POSITIVES}+ labelled tokens ({counted}): use more tokens "
            "(letter_task_data max_tokens) or pass letters explicitly"
        )
    return picked[:MAX_LETTERS]


@torch.no_grad()
def encode_codes(
    encode: Callable[[Tensor], Tensor | SparseCode],
    x: Tensor,
    batch_size: int = 4096,
    progress: bool = True,
) -> SparseCode:
    """All rows of x encoded batch by batch, kept sparse (a dense 100k x 9216 code is 3.7 GB)."""
    values, cols, rows = [], [], []
    for start in tqdm(
        range(0, len(x), batch_size), desc="encode", leave=False, disable=not progress
    ):
        out = encode(x[start : start + batch_size])
        if not isinstance(out, SparseCode):
            out = out.detach()
            r, c = out.nonzero(as_tuple=True)
            out = SparseCode(out[r, c], c, r, out.shape[0])
        values.append(out.values.float())
        cols.append(out.cols.long())
        rows.append(out.rows.long() + start)
    return SparseCode(torch.cat(values), torch.cat(cols), torch.cat(rows), len(x))


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
        _check_decoder(decoder, data.x.shape[1])
    codes = encode_codes(encode, data.x, batch_size)
    _check(codes, data.labels, letters, ks, data.x)
    if decoder is not None:
        _check_decoder(decoder, data.x.shape[1], codes)
    per_letter = {}
    for L in letters:
        split = _letter_split(data.labels, L, train_frac, seed, groups)
        sparse, main = _sparse_probe(codes, split, ks)
        probe = _fit_dense(data.x, split)
        dense_pred = probe.predict(data.x[split.test].float())
        per_letter[L] = {
            "sparse_probe": sparse,
            "dense_probe": _accuracy(dense_pred, split.y_test),
            "absorption": _absorption(codes, split, main, dense_pred),
            "main_feature": main,
            "n_train": len(split.train),
            "n_test": len(split.test),
        }
        if decoder is not None:
            cos_min = chanin_cos_threshold(data.x.shape[1])
            per_letter[L] |= _chanin_letter(codes, data.x, split, decoder, cos_min, probe)
    rows = list(per_letter.values())
    result = {
        "sparse_probe": {k: sum(p["sparse_probe"][k] for p in rows) / len(rows) for k in ks},
        "dense_probe": sum(p["dense_probe"] for p in rows) / len(rows),
        "absorption": _nanmean([p["absorption"] for p in rows]),
        "letters": letters,
        "per_letter": per_letter,
    }
    if decoder is not None:
        for key in ("full_absorption", "absorption_fraction"):
            result[key] = _nanmean([p[key] for p in rows])
    return result
