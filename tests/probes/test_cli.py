"""`python -m probes train|score` on the tiny model with a user dataset, and its early errors."""

from __future__ import annotations

import json

import pytest

from probes.__main__ import main
from probes.probe import Probe
from tests.probes.conftest import HOOK, PLANTED, marker_texts


def write_jsonl(path, texts, labels) -> str:
    path.write_text(
        "".join(
            json.dumps({"text": t, "label": int(y)}) + "\n"
            for t, y in zip(texts, labels, strict=True)
        )
    )
    return str(path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    texts, labels = marker_texts(120, seed=5)
    return write_jsonl(tmp_path_factory.mktemp("data") / "marker.jsonl", texts, labels.tolist())


@pytest.mark.parametrize("kind", ["linear", "sparse", "graph"])
def test_train_then_score(kind, dataset, planted_sae_dir, tmp_path, capsys):
    """Sparse and graph probes read the SAE whose latents 3 and 5 fire on the marker word alone:
    the sparse probe must pick exactly those two, and both must separate the held-out texts."""
    out = tmp_path / kind
    extra = ["--sae", str(planted_sae_dir)] if kind != "linear" else []
    extra += ["--query", "3,5"] if kind == "graph" else []  # a fixed feature set (no graph on disk)
    code = main(
        [
            "train",
            "--task",
            dataset,
            "--model",
            "tiny",
            "--hook",
            HOOK,
            "--kind",
            kind,
            "--k",
            "2",
            "--out",
            str(out),
            "--fpr",
            "0.05",
            *extra,
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    probe = Probe.load(out)
    assert summary["kind"] == probe.kind == kind and probe.hook == HOOK
    assert 0.0 <= probe.metrics["auroc"] <= 1.0 and probe.metrics["n"] > 0
    assert probe.calibration["target_fpr"] == 0.05 and probe.calibration["fpr"] <= 0.05
    if kind == "linear":  # a marker word is easy even for a random model's residual stream
        assert probe.metrics["auroc"] > 0.9
    else:  # the planted latents, found (sparse) or queried (graph), separate every held-out text
        assert probe.features.tolist() == list(PLANTED)
        assert probe.metrics["auroc"] == 1.0 and probe.metrics["accuracy"] == 1.0
    for text, marked in (("the zebra was green", True), ("the king was green", False)):
        assert main(["score", "--probe", str(out), "--model", "tiny", "--text", text]) == 0
        [result] = json.loads(capsys.readouterr().out)
        scores = result["probes"][out.name]
        assert len(scores["token_scores"]) == len(result["tokens"]) > 0
        assert scores["fired"] == (scores["score"] > probe.threshold)
        if kind != "linear":
            assert scores["fired"] == marked, text


def test_bad_input_is_reported_before_work(tmp_path, capsys, tiny_sae_dir):
    one_class = write_jsonl(tmp_path / "one.jsonl", ["a b", "c d", "e f"], [1, 1, 1])
    assert (
        main(
            [
                "train",
                "--task",
                one_class,
                "--model",
                "tiny",
                "--hook",
                HOOK,
                "--out",
                str(tmp_path / "p"),
            ]
        )
        == 2
    )
    assert "only label 1" in capsys.readouterr().err
    assert (
        main(["train", "--task", "nonsense-task", "--model", "tiny", "--out", str(tmp_path / "p")])
        == 2
    )
    assert "nonsense-task" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--task",
                one_class,
                "--kind",
                "sparse",
                "--model",
                "tiny",
                "--out",
                str(tmp_path / "p"),
            ]
        )
        == 2
    )
    assert "--sae" in capsys.readouterr().err
    good = write_jsonl(tmp_path / "good.jsonl", *marker_texts(20))
    assert (
        main(
            [
                "train",
                "--task",
                good,
                "--model",
                "tiny",
                "--hook",
                "blocks.7.hook_resid_post",
                "--out",
                str(tmp_path / "p"),
            ]
        )
        == 2
    )
    assert "unknown hook point" in capsys.readouterr().err
    other_hook = "blocks.0.hook_resid_post"
    assert (
        main(
            [
                "train",
                "--task",
                good,
                "--model",
                "tiny",
                "--hook",
                other_hook,
                "--kind",
                "sparse",
                "--sae",
                str(tiny_sae_dir),
                "--out",
                str(tmp_path / "p"),
            ]
        )
        == 2
    )
    assert "trained on" in capsys.readouterr().err
    assert not (tmp_path / "p").exists(), "nothing is written when the input is bad"
    assert (
        main(["score", "--probe", str(tmp_path / "missing"), "--model", "tiny", "--text", "x"]) == 2
    )
    assert "holds no probe" in capsys.readouterr().err


def test_train_probe_from_an_in_memory_dataset(tiny, tmp_path):
    import datasets

    from probes.train import ProbeTrainConfig, train_probe

    texts, labels = marker_texts(100, seed=7)
    data = datasets.Dataset.from_dict({"text": texts, "label": labels.tolist()})
    cfg = ProbeTrainConfig(hook=HOOK, model="tiny", out=str(tmp_path / "p"), kind="mean_diff")
    probe = train_probe(cfg, tiny, data=data)
    # ~75/25 split by row
    assert probe.info["task"] == "in-memory dataset" and 20 <= probe.metrics["n"] <= 30
    assert probe.direction is not None and Probe.load(tmp_path / "p").kind == "mean_diff"
    with pytest.raises(ValueError, match="only label"):
        train_probe(
            cfg, tiny, data=datasets.Dataset.from_dict({"text": ["a b", "c d"], "label": [0, 0]})
        )
