"""First-letter task: labels from the tokenizer, store data, sparse/dense probes, absorption."""

from __future__ import annotations

import pytest
import torch

from graphs.letters import (
    LETTERS,
    LetterTaskData,
    _fit_logistic,
    _letter_split,
    absorption_rate,
    chanin_absorption,
    chanin_cos_threshold,
    dense_probe_accuracy,
    first_letter_labels,
    letter_metrics,
    letter_task_data,
    pick_letters,
    sparse_probe_accuracy,
)
from sae.sae import SparseCode

HOOK = "blocks.1.hook_resid_post"
N, N_LETTERS, D, N_TYPES, N_LATENTS = 6000, 6, 16, 120, 40
TASK_LETTERS = [0, 1, 2]


def _task(seed: int = 0, separation: float = 3.0) -> LetterTaskData:
    """Tokens of N_TYPES types, each type with a fixed first letter; x clusters by letter."""
    g = torch.Generator().manual_seed(seed)
    token_ids = torch.randint(0, N_TYPES, (N,), generator=g)
    labels = token_ids % N_LETTERS  # [N] the letter is a property of the token, as in real text
    means = separation * torch.randn(N_LETTERS, D, generator=g)
    x = means[labels] + torch.randn(N, D, generator=g)  # [N, D]
    return LetterTaskData(x, labels, token_ids)


def _noise_codes(seed: int = 1) -> torch.Tensor:
    """[N, N_LATENTS] non-negative codes, ~20% active, unrelated to any label."""
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(N, N_LATENTS, generator=g)
    return values * (torch.rand(N, N_LATENTS, generator=g) < 0.2)


def _indicator_codes(labels: torch.Tensor) -> torch.Tensor:
    """Noise codes plus latent 10 + L firing exactly on letter L (for each letter L), and a
    strong always-on latent 39 that carries no label (a selection rule must not pick it)."""
    codes = _noise_codes()
    codes[:, 39] = 3.0 + torch.rand(N, generator=torch.Generator().manual_seed(2))
    for letter in range(N_LETTERS):
        codes[:, 10 + letter] = (labels == letter).float() * (1.0 + torch.rand(N))
    return codes


def _to_sparse(dense: torch.Tensor) -> SparseCode:
    rows, cols = dense.nonzero(as_tuple=True)
    return SparseCode(dense[rows, cols], cols, rows, dense.shape[0])


# --------------------------------------------------------------------------- labels


def test_first_letter_labels_on_tiny_tokenizer(tiny) -> None:
    tok = tiny.tokenizer
    ids = tok(" The quick, 123 jumps! I a Caesar's é", add_special_tokens=False)["input_ids"]
    texts = [tok.decode([i]) for i in ids]
    labels = first_letter_labels(torch.tensor(ids), tok).tolist()
    expected = {" quick": "q", " jumps": "j", " I": "i", " a": "a", " Caesar": "c"}
    for text, label in zip(texts, labels, strict=True):
        if text in expected:  # leading space stripped, case folded
            assert label == LETTERS.index(expected[text]), text
        elif not text.strip().isascii() or not text.strip().isalpha():
            assert label == -1, text  # ",", " ", digits, "!", "'s", the bytes of "é"
    assert sum(label >= 0 for label in labels) >= len(expected)
    assert all(label == -1 for text, label in zip(texts, labels, strict=True) if text in ",!'s123")
    assert first_letter_labels(torch.tensor([tok.bos_token_id]), tok).item() == -1
    assert first_letter_labels(torch.tensor(ids), tok, min_letters=2)[texts.index(" I")] == -1


class _RawTokenizer:
    """Decodes to the raw byte-BPE / SentencePiece form, markers and all."""

    all_special_ids = [0]
    vocab = ["<s>", "Ġthe", "▁Zebra", "ĠĠx", "Ġ", "Ġ1st", "apple", "Ġno-go", "\n\tWord"]

    def batch_decode(self, ids: list[list[int]], **_: object) -> list[str]:
        return [self.vocab[i[0]] for i in ids]


def test_first_letter_labels_strips_space_markers_and_keeps_shape() -> None:
    ids = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    labels = first_letter_labels(ids, _RawTokenizer())
    letter = LETTERS.index
    expected = [
        [-1, letter("t"), letter("z")],
        [letter("x"), -1, -1],
        [letter("a"), -1, letter("w")],
    ]
    assert labels.tolist() == expected


# --------------------------------------------------------------------------- probes


def test_sparse_probe_finds_the_indicator_latent_and_is_chance_on_noise() -> None:
    data = _task()
    perfect = sparse_probe_accuracy(_indicator_codes(data.labels), data.labels, TASK_LETTERS)
    assert set(perfect) == {1, 2, 5}
    assert all(acc > 0.99 for acc in perfect.values()), perfect
    noise = sparse_probe_accuracy(_noise_codes(), data.labels, TASK_LETTERS)
    assert all(abs(acc - 0.5) < 0.07 for acc in noise.values()), noise


def test_sparse_probe_same_for_dense_and_sparse_codes_and_deterministic() -> None:
    data = _task()
    codes = _indicator_codes(data.labels)
    codes[:, 10] *= torch.rand(N) < 0.6  # an imperfect main latent, so accuracies are not all 1
    kwargs = dict(ks=(1, 2, 5), groups=data.token_ids)
    dense = sparse_probe_accuracy(codes, data.labels, TASK_LETTERS, **kwargs)
    sparse = sparse_probe_accuracy(_to_sparse(codes), data.labels, TASK_LETTERS, **kwargs)
    assert dense == pytest.approx(sparse, abs=1e-6)
    assert dense == sparse_probe_accuracy(codes, data.labels, TASK_LETTERS, **kwargs)
    assert dense[1] < 0.95  # the weakened latent shows up ...
    assert dense[5] > dense[1]  # ... and |diff| also picks the other letters' indicators


def test_splits_are_balanced_and_hold_out_whole_tokens() -> None:
    data = _task()
    split = _letter_split(data.labels, 2, 0.7, seed=0, groups=data.token_ids)
    for y in (split.y_train, split.y_test):
        assert int(y.sum()) == int((~y).sum()) > 0
    assert (data.labels[split.train] == 2).eq(split.y_train).all()
    shared = set(data.token_ids[split.train].tolist()) & set(data.token_ids[split.test].tolist())
    assert not shared
    row_split = _letter_split(data.labels, 2, 0.7, seed=0, groups=None)
    assert set(data.token_ids[row_split.train].tolist()) & set(
        data.token_ids[row_split.test].tolist()
    )


def test_dense_probe_separates_clusters_and_not_noise() -> None:
    data = _task()
    assert dense_probe_accuracy(data.x, data.labels, TASK_LETTERS, groups=data.token_ids) > 0.97
    noise = torch.randn(N, D, generator=torch.Generator().manual_seed(7))
    assert abs(dense_probe_accuracy(noise, data.labels, TASK_LETTERS) - 0.5) < 0.07


# --------------------------------------------------------------------------- absorption


def _absorbed_codes(labels: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indicator codes where, on `fraction` of letter-0 tokens, latent 30 fires instead of 10."""
    codes = _indicator_codes(labels)
    pos = (labels == 0).nonzero().squeeze(1)
    taken = pos[torch.randperm(len(pos), generator=torch.Generator().manual_seed(3))]
    taken = taken[: round(fraction * len(pos))]
    codes[taken, 30] = codes[taken, 10]
    codes[taken, 10] = 0.0
    return codes


def test_absorption_is_zero_when_the_main_latent_always_fires() -> None:
    data = _task()
    result = absorption_rate(_absorbed_codes(data.labels, 0.0), data.x, data.labels, TASK_LETTERS)
    assert result["main_feature"] == {0: 10, 1: 11, 2: 12}
    assert result["absorption"] == 0.0
    assert all(rate == 0.0 for rate in result["per_letter"].values())


def test_absorption_recovers_the_planted_fraction() -> None:
    data = _task()
    codes = _absorbed_codes(data.labels, 0.3)
    result = absorption_rate(codes, data.x, data.labels, TASK_LETTERS, groups=data.token_ids)
    assert result["main_feature"][0] == 10  # 70% firing still beats the 30% absorber
    assert result["per_letter"][0] == pytest.approx(0.3, abs=0.06)
    assert result["per_letter"][1] == result["per_letter"][2] == 0.0
    assert result["absorption"] == pytest.approx(0.1, abs=0.02)


def _probe_direction(data: LetterTaskData, letter: int) -> torch.Tensor:
    """The unit direction in x's space of the dense probe the metric fits for this letter."""
    split = _letter_split(data.labels, letter, 0.7, seed=0, groups=data.token_ids)
    probe = _fit_logistic(data.x[split.train], split.y_train)
    direction = probe.w / probe.std
    return direction / direction.norm()


def _decoder(
    data: LetterTaskData, aligned: list[int], weak: list[int] | None = None
) -> torch.Tensor:
    """[N_LATENTS, D] unit rows: the `aligned` latents point along letter 0's probe, the `weak`
    ones have cos 0.1 with it (below tau_ps = 0.3 at D = 16), every other row is orthogonal to it
    (so only the planted latents can carry the letter)."""
    p = _probe_direction(data, 0)
    rows = torch.randn(N_LATENTS, D, generator=torch.Generator().manual_seed(5))
    rows -= (rows @ p)[:, None] * p
    rows = rows / rows.norm(dim=1, keepdim=True)
    weak = weak or []
    rows[weak] = 0.1 * p + (1 - 0.1**2) ** 0.5 * rows[weak]
    rows[aligned] = p
    return rows


ABSORBERS = list(range(20, 36))


def _spread_absorbed_codes(labels: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indicator codes where, on `fraction` of letter-0 tokens, one of 16 absorbing latents (each
    on ~2% of the letter, like token-specific latents) fires instead of main latent 10."""
    codes = _indicator_codes(labels)
    codes[:, ABSORBERS] = 0.0  # silent elsewhere, so they carry the letter only where they absorb
    g = torch.Generator().manual_seed(3)
    pos = (labels == 0).nonzero().squeeze(1)
    taken = pos[torch.randperm(len(pos), generator=g)][: round(fraction * len(pos))]
    absorber = torch.tensor(ABSORBERS)[torch.randint(0, len(ABSORBERS), (len(taken),), generator=g)]
    codes[taken, absorber] = codes[taken, 10]
    codes[taken, 10] = 0.0
    return codes


def test_chanin_absorption_counts_only_absorbers_aligned_with_the_probe() -> None:
    data = _task()
    codes = _spread_absorbed_codes(data.labels, 0.3)
    kwargs = dict(groups=data.token_ids)
    aligned = chanin_absorption(
        codes, data.x, data.labels, TASK_LETTERS, _decoder(data, [10, *ABSORBERS]), **kwargs
    )
    letter = aligned["per_letter"][0]
    assert letter["main_features"] == [10]
    assert letter["full_absorption"] == pytest.approx(0.3, abs=0.06)
    assert letter["absorption_fraction"] == pytest.approx(0.3, abs=0.06)
    assert (
        aligned["per_letter"][1]["full_absorption"]
        == aligned["per_letter"][2]["full_absorption"]
        == 0.0
    )
    # the same codes, but the absorbers barely point along the probe (cos 0.1 < tau_ps): plain false
    # negatives of the main latent, which the upper bound counts and Chanin's measure does not
    weak = _decoder(data, [10], weak=ABSORBERS)
    plain = chanin_absorption(codes, data.x, data.labels, TASK_LETTERS, weak, **kwargs)
    assert plain["per_letter"][0]["full_absorption"] == 0.0
    assert plain["per_letter"][0]["absorption_fraction"] == 0.0
    upper = absorption_rate(codes, data.x, data.labels, TASK_LETTERS, **kwargs)["per_letter"][0]
    assert upper == pytest.approx(0.3, abs=0.06)


def test_chanin_main_latents_follow_feature_splitting() -> None:
    """Letter 0 split by token type over latents 10 and 31: two main latents, nothing absorbed,
    where the single-main-latent upper bound reports half the letter absorbed."""
    data = _task()
    codes = _indicator_codes(data.labels)
    second = (data.labels == 0) & (data.token_ids % 12 == 6)  # half of letter 0's token types
    codes[second, 31] = codes[second, 10]
    codes[second, 10] = 0.0
    decoder = _decoder(data, [10, 31])
    result = chanin_absorption(codes, data.x, data.labels, [0], decoder, groups=data.token_ids)
    letter = result["per_letter"][0]
    assert sorted(letter["main_features"]) == [10, 31]
    assert letter["full_absorption"] == letter["absorption_fraction"] == 0.0
    upper = absorption_rate(codes, data.x, data.labels, [0], groups=data.token_ids)["per_letter"][0]
    assert upper > 0.3


def test_chanin_threshold_keeps_the_share_of_random_cosines() -> None:
    assert chanin_cos_threshold(2304) == pytest.approx(0.025)
    g = torch.Generator().manual_seed(0)
    shares = []
    for d in (64, 576, 2304):
        a, b = torch.randn(20_000, d, generator=g), torch.randn(20_000, d, generator=g)
        cos = torch.nn.functional.cosine_similarity(a, b)
        shares.append(float((cos >= chanin_cos_threshold(d)).float().mean()))
    assert max(shares) - min(shares) < 0.02, shares
    assert 0.08 < shares[0] < 0.16


def test_bad_inputs_fail_early() -> None:
    data = _task()
    with pytest.raises(ValueError, match="post-activation"):
        sparse_probe_accuracy(-_noise_codes(), data.labels, TASK_LETTERS)
    with pytest.raises(ValueError, match="rows"):
        sparse_probe_accuracy(_noise_codes()[:-1], data.labels, TASK_LETTERS)
    with pytest.raises(ValueError, match="0..25"):
        dense_probe_accuracy(data.x, data.labels, [26])
    with pytest.raises(ValueError, match="split needs 2"):
        dense_probe_accuracy(data.x, data.labels, [N_LETTERS])  # a letter with no tokens at all
    with pytest.raises(ValueError, match="rows in x's space"):
        chanin_absorption(
            _noise_codes(), data.x, data.labels, TASK_LETTERS, torch.randn(N_LATENTS, D + 1)
        )
    with pytest.raises(ValueError, match="same SAE"):
        chanin_absorption(
            _noise_codes(), data.x, data.labels, TASK_LETTERS, torch.randn(N_LATENTS - 1, D)
        )

    def encode(x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("a bad decoder must fail before the encoding pass")

    with pytest.raises(ValueError, match="rows in x's space"):
        letter_metrics(encode, data, letters=TASK_LETTERS, decoder=torch.randn(N_LATENTS, D + 1))


# --------------------------------------------------------------------------- end to end


def test_pick_letters_by_frequency() -> None:
    labels = torch.tensor([3] * 80 + [1] * 120 + [7] * 49 + [-1] * 500)
    assert pick_letters(labels) == [1, 3]
    with pytest.raises(ValueError, match="more tokens"):
        pick_letters(torch.tensor([2] * 10))


def test_letter_metrics_matches_the_single_metrics() -> None:
    data = _task()
    codes = _absorbed_codes(data.labels, 0.3)
    weight = torch.randn(D, N_LATENTS)
    lookup = {tuple(row.tolist()): i for i, row in enumerate(data.x)}

    def encode(x: torch.Tensor) -> torch.Tensor:  # the planted code, found by row lookup
        return codes[[lookup[tuple(row.tolist())] for row in x]] + 0 * (x @ weight)

    result = letter_metrics(encode, data, letters=TASK_LETTERS, batch_size=1000)
    kwargs = dict(groups=data.token_ids)
    assert result["letters"] == TASK_LETTERS
    assert result["sparse_probe"] == sparse_probe_accuracy(
        codes, data.labels, TASK_LETTERS, **kwargs
    )
    assert result["dense_probe"] == dense_probe_accuracy(
        data.x, data.labels, TASK_LETTERS, **kwargs
    )
    expected = absorption_rate(codes, data.x, data.labels, TASK_LETTERS, **kwargs)
    assert result["absorption"] == pytest.approx(expected["absorption"])
    assert result["per_letter"][0]["main_feature"] == 10
    assert "full_absorption" not in result  # needs the decoder
    decoder = _decoder(data, [10, 30])
    with_decoder = letter_metrics(
        encode, data, letters=TASK_LETTERS, batch_size=1000, decoder=decoder
    )
    chanin = chanin_absorption(codes, data.x, data.labels, TASK_LETTERS, decoder, **kwargs)
    for key in ("full_absorption", "absorption_fraction"):
        assert with_decoder[key] == pytest.approx(chanin[key])
    # one latent on 30% of the letter adds > 0.03 F1: by Chanin's rule a split, not an absorber
    assert with_decoder["per_letter"][0]["main_features"] == [10, 30]
    assert with_decoder["full_absorption"] == 0.0
    assert with_decoder["absorption"] == result["absorption"]
    assert sorted(letter_metrics(encode, data)["letters"]) == list(range(N_LETTERS))  # all 50+


def test_letter_task_data_reads_only_labelled_rows(tiny, tiny_store) -> None:
    token_ids = torch.cat(
        [tiny_store.shard(s)["token_ids"].long() for s in range(len(tiny_store.manifest.shards))]
    )
    labelled = (first_letter_labels(token_ids, tiny.tokenizer) >= 0).nonzero().squeeze(1)
    assert 0 < len(labelled) < len(token_ids)
    full = letter_task_data(tiny_store, HOOK, tiny.tokenizer, max_per_token=None)
    assert len(full.labels) == len(labelled)
    assert torch.equal(full.token_ids, token_ids[labelled])
    assert torch.equal(full.x, tiny_store.rows(labelled, [HOOK])[HOOK])
    assert (full.labels >= 0).all()

    small = letter_task_data(tiny_store, HOOK, tiny.tokenizer, max_tokens=150, max_per_token=5)
    again = letter_task_data(tiny_store, HOOK, tiny.tokenizer, max_tokens=150, max_per_token=5)
    other = letter_task_data(
        tiny_store, HOOK, tiny.tokenizer, max_tokens=150, max_per_token=5, seed=1
    )
    assert small.x.shape == (150, tiny.d_model) and small.x.dtype == torch.float32
    assert torch.equal(small.x, again.x) and torch.equal(small.token_ids, again.token_ids)
    assert not torch.equal(small.token_ids, other.token_ids)
    assert int(torch.bincount(small.token_ids).max()) <= 5
    assert torch.equal(small.labels, first_letter_labels(small.token_ids, tiny.tokenizer))
    with pytest.raises(ValueError, match="no hook"):
        letter_task_data(tiny_store, "blocks.9.hook_resid_post", tiny.tokenizer)
