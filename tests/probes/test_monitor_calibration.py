"""Calibration on the score a monitor acts on: the running pooled score, pinned against
`Lens.monitor`; and a planted prose-vs-code probe whose monitor stays silent on held-out prose."""

from __future__ import annotations

import random

import datasets
import pytest
import torch

from probes.activations import Ragged, collect, pool
from probes.fit import calibrate, peak_running, running_pool
from probes.lens import Lens
from probes.tasks import load_task
from probes.train import ProbeTrainConfig, fit_probe, split_calibration, train_probe

HOOK = "blocks.1.hook_resid_post"
PROSE = (
    "the weather today is warm and sunny so we will walk to the park after lunch with friends "
    "could you tell me where the station is please i think my train leaves at noon"
).split()
CODE = "def return import self ( ) [ ] { } = == += : , . _ x0 y1 None True lambda".split()


def test_running_pool_hand_example() -> None:
    scores = Ragged(torch.tensor([1.0, -3.0, 5.0, -10.0, 2.0, 0.0]), torch.tensor([0, 4, 6]))
    assert running_pool(scores, "mean").values.tolist() == [1.0, -1.0, 1.0, -1.75, 2.0, 1.0]
    assert running_pool(scores, "max").values.tolist() == [1.0, 1.0, 5.0, 5.0, 2.0, 2.0]
    assert running_pool(scores, "last").values.tolist() == scores.values.tolist()
    assert peak_running(scores, "mean").tolist() == [1.0, 2.0]
    assert peak_running(scores, "mean", min_tokens=2).tolist() == [1.0, 1.0]
    assert peak_running(scores, "mean", min_tokens=4).tolist() == [-1.75, 1.0]  # 2nd: its end
    with pytest.raises(ValueError, match="min_tokens"):
        peak_running(scores, "mean", min_tokens=0)


@pytest.mark.parametrize("aggregation", ["mean", "max", "last"])
def test_running_pool_is_what_the_monitor_tracks(tiny, marker_task, aggregation: str) -> None:
    _, y, features = marker_task
    probe = fit_probe("linear", features, y, hook=HOOK, aggregation=aggregation, l2=1e-2)
    probe.name = "p"
    watched = Lens(tiny, probes=[probe]).monitor("the king of the land", max_new_tokens=6)
    scores = torch.tensor(watched.scores["p"])  # [n_tokens]
    expected = running_pool(Ragged(scores, torch.tensor([0, scores.numel()])), aggregation)
    assert watched.running["p"] == pytest.approx(expected.values.tolist(), abs=1e-5)


def _texts(words: list[str], n: int, rng: random.Random) -> list[str]:
    """n texts of 6-14 words; the first word comes from a short list, as sentences open with a few
    common words (so a handful of calibration texts covers what a monitor reads first)."""
    return [
        " ".join([rng.choice(words[:3])] + [rng.choice(words) for _ in range(rng.randint(5, 13))])
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def planted(tiny, tmp_path_factory):
    """A code probe on the tiny model, trained on planted prose (0) vs code-token (1) texts and
    calibrated on the monitor's score; plus held-out prose of the same distribution."""
    rng = random.Random(0)
    n = 200  # per class: ~40 negatives calibrate the threshold
    texts = _texts(PROSE, n, rng) + _texts(CODE, n, rng)
    data = datasets.Dataset.from_dict(
        {"text": texts, "label": [0] * n + [1] * n, "group": [str(i // 4) for i in range(2 * n)]}
    )
    cfg = ProbeTrainConfig(
        hook=HOOK,
        model="tiny",
        out=str(tmp_path_factory.mktemp("probe") / "code"),
        l2=1e-2,
        calibrate_on="monitor",
    )
    probe = train_probe(cfg, tiny, data=data)
    return cfg, data, probe, _texts(PROSE, 40, random.Random(1))


def _calibration_scores(tiny, cfg: ProbeTrainConfig, data, probe) -> Ragged:
    """By hand: train_probe's split of the dataset, its calibration groups, and the probe's token
    scores on their negatives."""
    split = load_task(data, seed=cfg.seed)["train"]
    _, calib = split_calibration(list(split["group"]), cfg.calibration_fraction, cfg.seed)
    negatives = [split[i]["text"] for i in calib.tolist() if split[i]["label"] == 0]
    acts, _ = collect(tiny, negatives, [HOOK], max_tokens=cfg.max_tokens, progress=False)
    return Ragged(probe.token_scores(acts[HOOK].values), acts[HOOK].offsets)


def test_threshold_is_the_calibration_of_the_monitor_score(tiny, planted) -> None:
    cfg, data, probe, _ = planted
    assert cfg.calibrate_on == "monitor" and probe.calibration["on"] == "monitor"
    scores = _calibration_scores(tiny, cfg, data, probe)
    expected, _ = calibrate(peak_running(scores, "mean"), cfg.fpr)  # each text's peak running mean
    assert probe.calibration["n_negatives"] == scores.n_texts
    assert probe.threshold == pytest.approx(expected, abs=1e-5)
    whole_text, _ = calibrate(pool(scores, "mean"), cfg.fpr)
    assert probe.threshold > whole_text  # short prefixes peak higher than whole texts


def test_monitor_is_silent_on_heldout_prose_and_fires_on_code(tiny, planted) -> None:
    cfg, data, probe, heldout = planted
    acts, _ = collect(tiny, heldout, [HOOK], max_tokens=128, progress=False)
    peaks = peak_running(
        Ragged(probe.token_scores(acts[HOOK].values), acts[HOOK].offsets), "mean"
    )  # [40]: the highest score a monitor reading each text would check
    assert (peaks <= probe.threshold).all(), (peaks.max(), probe.threshold)
    # A threshold calibrated on whole texts only would have let the monitor fire on this prose.
    whole_text, _ = calibrate(pool(_calibration_scores(tiny, cfg, data, probe), "mean"), cfg.fpr)
    assert (peaks > whole_text).any()
    lens = Lens(tiny, probes=[probe])
    for text in heldout[:5]:  # the monitor reads the prompt, then checks (no generation)
        assert lens.monitor(text, max_new_tokens=0, trigger="code").triggered is None
    code = " ".join(CODE[:12])
    assert lens.monitor(code, max_new_tokens=0, trigger="code").triggered is not None
