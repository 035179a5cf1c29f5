"""The whole pipeline from the command line, once per family, in-process (each CLI's `main(argv)`):

    python -m sae harvest -> python -m sae train -> python -m sae eval (store + splice)
    -> python -m graphs stats -> python -m probes train (sparse, on the SAE) -> probes score (Lens)
    -> Lens.monitor (generation, probe-triggered steering)

Sizes are minimal (hundreds of tokens, a few SAE steps): this checks that every stage runs on and
agrees about each architecture, not what the numbers are.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from graphs.__main__ import main as graphs_main
from probes.__main__ import main as probes_main
from probes.lens import Lens
from sae.__main__ import main as sae_main
from sae.corpus import is_heldout
from sae.families import FAMILIES

HOOK = "blocks.1.hook_resid_post"
MLP_IN = "blocks.1.mlp.hook_in"
WORDS = "the a fox dog king queen earth heaven light dark man sword rose night day".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A directory of small .txt documents, some of which fall in the held-out split."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    heldout = train = 0
    for i in range(200):
        if heldout >= 2 and train >= 8:
            break
        name = f"doc{i}.txt"
        if is_heldout(root.name, name):  # a .txt directory's source is its own name
            if heldout >= 2:
                continue
            heldout += 1
        else:
            if train >= 8:
                continue
            train += 1
        (root / name).write_text(" ".join(rng.choice(WORDS) for _ in range(600)) + ".")
    assert heldout == 2 and train == 8
    return str(root)


@pytest.fixture(scope="module")
def probe_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("probe") / "zebra.jsonl"
    rows = []
    for i in range(40):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 8))]
        if i % 2:
            words.insert(rng.randrange(len(words)), "zebra")
        rows.append(json.dumps({"text": " ".join(words), "label": i % 2}))
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def _run(main, argv: list[str], capsys: pytest.CaptureFixture) -> dict | list:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, f"{argv[0]} failed: {captured.err[-2000:]}"
    return json.loads(captured.out)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pipeline_runs_for_every_family(
    family: str, corpus: str, probe_data: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model = f"tiny-{family}"
    store, saes = str(tmp_path / "store"), tmp_path / "saes"
    sae = str(saes / HOOK)
    harvested = _run(
        sae_main,
        ["harvest", "--out", store, "--model", model, "--hooks", f"{HOOK},{MLP_IN}"]
        + ["--tokens", "620", "--context-size", "32", "--corpus", corpus, "--dtype", "float32"],
        capsys,
    )
    assert harvested["n_tokens"] >= 620
    _run(
        sae_main,
        ["train", "--store", store, "--out", str(saes), "--hooks", HOOK, "--k", "4"]
        + ["--expansion", "2", "--tokens", "1240", "--batch-size", "124", "--wandb", "disabled"],
        capsys,
    )
    evaluated = _run(
        sae_main,
        ["eval", "--sae", sae, "--store", store, "--model", model, "--tokens", "60"]
        + ["--context-size", "32", "--corpus", corpus],
        capsys,
    )
    for key in ("fvu", "ce_clean", "ce_spliced", "ce_zero_ablated"):
        assert math.isfinite(evaluated[key]), (key, evaluated)
    assert evaluated["ce_zero_ablated"] != evaluated["ce_clean"]  # the splice reached the model
    stats = _run(
        graphs_main,
        ["stats", "--store", store, "--sae", sae, "--out", str(tmp_path / "stats")]
        + ["--min-count", "1", "--m", "4"],
        capsys,
    )
    assert stats
    probe = str(tmp_path / "probe")
    trained = _run(
        probes_main,
        ["train", "--task", probe_data, "--model", model, "--hook", HOOK, "--kind", "sparse"]
        + ["--sae", sae, "--k", "4", "--l2", "1.0", "--fpr", "0.1", "--out", probe],
        capsys,
    )
    assert trained["kind"] == "sparse"
    [scored] = _run(
        probes_main,
        ["score", "--probe", probe, "--model", model, "--text", "the zebra saw the king"]
        + ["--sae", sae],
        capsys,
    )
    scores = scored["probes"]["probe"]
    assert len(scores["token_scores"]) == len(scored["tokens"]) > 0
    assert math.isfinite(scores["score"])
    # generation with the Lens: probes on every token through the KV-cached fast path, steering
    # at a residual hook from the first token on (threshold -inf: the trigger fires at once)
    lens = Lens(model, probes=[probe])
    lens.probes["probe"].threshold = -math.inf
    steered = lens.monitor(
        "the zebra saw",
        max_new_tokens=3,
        trigger="probe",
        action="steer",
        steering=torch.ones(lens.model.d_model),
        steering_hook=HOOK,
    )
    assert steered.triggered is not None and len(steered.token_ids) == 3
    assert len(steered.scores["probe"]) == len(steered.running["probe"]) > 3
