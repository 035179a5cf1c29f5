"""The vLLM plugin: its encoder equals greylens's, its bookkeeping maps flattened rows to requests
and positions (chunks, batches, recompute, prefix pages, missing positions), its op survives
torch.compile, and — with the vLLM side venv — features from vLLM equal greylens's own engine.
Reading the sink is tested in test_vllm_features."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sae.io import save_sae
from sae.sae import SAE, SAEConfig
from serve_hooks import vllm_plugin
from serve_hooks.vllm_features import read_features
from serve_hooks.vllm_plugin import Tap, TapEncoder, layer_of

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("GREYLENS_CACHE") or Path.home() / ".cache" / "greylens")
VENV_PY = CACHE / "venvs" / "vllm" / "bin" / "python"
HF_DIR = CACHE / "hf" / "smollm2-135m-instruct"
HOOK = "blocks.15.hook_resid_post"


def reference_top(sae: SAE, x: torch.Tensor, top_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What serve_hooks.hook.FeatureHook stores for rows x: dense code, top-n."""
    dense = sae.encode(x.float()).to_dense(sae.cfg.n_latents)
    top = dense.topk(min(top_n, dense.shape[1]), dim=1)
    return top.indices, top.values


def random_sae(d: int, n: int, arch: str, hook: str = HOOK, seed: int = 0, **cfg) -> SAE:
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=d, n_latents=n, arch=arch, k=12, hook=hook, **cfg))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
        if arch in ("batchtopk", "matryoshka"):
            sae.threshold.fill_(0.4)
        if arch == "jumprelu":
            sae.log_threshold.normal_(-1.0, 0.3)
    return sae


# --------------------------------------------------------------------------- encode equality


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka", "jumprelu", "relu"])
def test_tap_encoder_equals_greylens(tmp_path, arch):
    sae = random_sae(48, 160, arch, input_scale=0.02, max_input_norm=900.0)
    save_sae(sae, tmp_path / "sae")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 48, generator=g) * 60  # residual-like norms (≈400)...
    x[3] *= 40  # ...and one massive activation over max_input_norm: no code
    tap = TapEncoder(tmp_path / "sae")
    for top_n in (5, 12):
        idx, val = tap.top(x, top_n)
        ref_idx, ref_val = reference_top(sae, x, top_n)
        assert torch.equal(val, ref_val), arch
        assert torch.equal(idx, ref_idx), arch
    assert tap.top(x, 5)[1][3].abs().sum() == 0


def test_tap_encoder_refuses_graph_and_bad_dirs(tmp_path):
    (tmp_path / "graph.json").write_text("{}")
    with pytest.raises(ValueError, match="graph autoencoder"):
        TapEncoder(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a greylens SAE"):
        TapEncoder(tmp_path / "nothing")


def test_layer_of():
    assert layer_of("blocks.15.hook_resid_post") == 15
    assert layer_of("blocks.16.hook_resid_pre") == 15
    for bad in ("blocks.0.hook_resid_pre", "blocks.3.attn.hook_z", "blocks.x.hook_resid_post"):
        with pytest.raises(ValueError, match="decoder-layer outputs"):
            layer_of(bad)


# ------------------------------------------------------------------ bookkeeping (fake runner)


class FakeRunner:
    """The attributes of vLLM's GPUModelRunner that Tap.begin reads, for one step."""

    def __init__(self, prompts: dict[str, list[int]]) -> None:
        self.requests = {r: SimpleNamespace(prompt_token_ids=p) for r, p in prompts.items()}

    def step(self, batch: list[tuple[str, int, list[int]]]) -> None:
        """batch: (req_id, num_computed_tokens, token ids fed this step)."""
        lengths = [len(ids) for _, _, ids in batch]
        self.input_batch = SimpleNamespace(
            num_reqs=len(batch),
            req_ids=[r for r, _, _ in batch],
            num_computed_tokens_cpu=np.array([c for _, c, _ in batch]),
        )
        self.query_start_loc = SimpleNamespace(
            np=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        )
        flat = [t for _, _, ids in batch for t in ids]
        # Padded past the batch, as vLLM's persistent buffers are.
        self.input_ids = SimpleNamespace(cpu=torch.tensor(flat + [0] * 5, dtype=torch.int32))


def residual(tokens: list[int], d: int) -> torch.Tensor:
    """A fake causal residual: row p depends on tokens[:p + 1] only (as a real model's would)."""
    ids = torch.tensor(tokens, dtype=torch.float32)
    basis = torch.linspace(-1, 1, d)
    return torch.cumsum(torch.sin(ids[:, None] * basis[None, :] * 7.0), 0) * 30.0  # [n, d]


def run_step(tap: Tap, runner: FakeRunner, batch, full: dict[str, list[int]], d: int) -> None:
    """One step: begin, the op on (hidden, residual) halves of the padded rows, end."""
    runner.step(batch)
    tap.begin(runner)
    rows = torch.cat([residual(full[r], d)[c : c + len(ids)] for r, c, ids in batch])
    rows = torch.cat([rows, torch.full((5, d), 1e6)])  # padding rows must be ignored
    torch.ops.greylens.tap(rows * 0.25, rows * 0.75, 15)  # hidden + residual = rows
    tap.end()


@pytest.fixture
def tap_setup(tmp_path, monkeypatch):
    sae = random_sae(32, 64, "topk", input_scale=0.05)
    save_sae(sae, tmp_path / "sae")
    vllm_plugin._register_op()

    def make(max_pages: int) -> Tap:
        tap = Tap([str(tmp_path / "sae")], tmp_path / "sink", top_n=4, max_pages=max_pages)
        tap.block_size = 8
        monkeypatch.setattr(vllm_plugin, "_TAP", tap)
        return tap

    return sae, make, tmp_path / "sink"


def test_rows_map_to_requests_and_prefix_pages(tap_setup):
    sae, make, sink = tap_setup
    tap = make(max_pages=100)
    a = list(range(3, 23))  # 20 prompt tokens
    b = list(range(50, 61))
    full = {"A-aaaaaaaa": a + [7, 8, 9], "B-bbbbbbbb": b + [5, 6], "C-cccccccc": a + [11, 12]}
    runner = FakeRunner({"A-aaaaaaaa": a, "B-bbbbbbbb": b, "C-cccccccc": a})
    run_step(tap, runner, [("A-aaaaaaaa", 0, a[:12])], full, 32)  # chunked prefill
    batched_with_b = [("A-aaaaaaaa", 12, a[12:]), ("B-bbbbbbbb", 0, b)]
    run_step(tap, runner, batched_with_b, full, 32)
    decode_other_order = [("B-bbbbbbbb", 11, [5]), ("A-aaaaaaaa", 20, [7])]
    run_step(tap, runner, decode_other_order, full, 32)
    preempted_recomputed = [("A-aaaaaaaa", 0, full["A-aaaaaaaa"][:21])]
    run_step(tap, runner, preempted_recomputed, full, 32)
    run_step(tap, runner, [("A-aaaaaaaa", 21, [8]), ("B-bbbbbbbb", 12, [6])], full, 32)
    # C: vLLM served 16 tokens (two blocks of A) from its cache; the hook only sees the rest
    run_step(tap, runner, [("C-cccccccc", 16, full["C-cccccccc"][16:21])], full, 32)
    for r in full:
        tap.finish(r)
    for r, n in (("A-aaaaaaaa", 22), ("B-bbbbbbbb", 13), ("C-cccccccc", 21)):
        got = read_features(sink, r[0], timeout=0)  # by the external id
        ref_idx, ref_val = reference_top(sae, residual(full[r], 32)[:n], 4)
        idx, val = got.codes[HOOK]
        assert got.request_id == r and idx.shape == (n, 4) and got.missing == []
        assert got.token_ids.tolist() == full[r][:n]
        torch.testing.assert_close(val, ref_val)
        assert torch.equal(idx, ref_idx)


def test_prefix_without_pages_is_reported_missing(tap_setup):
    sae, make, sink = tap_setup
    tap = make(max_pages=0)
    a = list(range(3, 23))
    full = {"A-aaaaaaaa": a + [7], "C-cccccccc": a + [9]}
    runner = FakeRunner({"A-aaaaaaaa": a, "C-cccccccc": a})
    run_step(tap, runner, [("A-aaaaaaaa", 0, a)], full, 32)
    run_step(tap, runner, [("C-cccccccc", 16, a[16:])], full, 32)  # 16 cached tokens, no pages kept
    tap.finish("C-cccccccc")
    got = read_features(sink, "C", timeout=0)
    assert got.missing == list(range(16))
    assert got.computed[16:].all() and got.codes[HOOK][0].shape == (20, 4)
    ref_idx, _ = reference_top(sae, residual(a, 32), 4)
    assert torch.equal(got.codes[HOOK][0][16:], ref_idx[16:])


def test_op_survives_inductor_dead_code_elimination(tap_setup, monkeypatch):
    """The op returns nothing; Inductor's DCE keeps it only because it is marked side-effectful."""
    seen: list[torch.Tensor] = []
    monkeypatch.setattr(
        vllm_plugin, "_TAP", SimpleNamespace(record=lambda layer, rows: seen.append(rows.clone()))
    )

    class Layer(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x * 2, x + 1

    layer = Layer()
    layer.register_forward_hook(vllm_plugin._layer_hook(3))
    compiled = torch.compile(lambda x: sum(layer(x)), backend="inductor", fullgraph=True)
    x = torch.randn(4, 8)
    torch.testing.assert_close(compiled(x), 3 * x + 1)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], 3 * x + 1)


@pytest.mark.parametrize("shape", [(6, 8), (1, 6, 8)], ids=["gpt2-block", "hf-layer"])
def test_layers_returning_the_stream_are_tapped(monkeypatch, shape):
    """GPT-2 blocks in vLLM return the stream [n, d]; HF layers under vLLM's Transformers backend
    (OLMo-2, GPT-NeoX) return it as [1, n, d]: the op gets those rows, flattened."""
    vllm_plugin._register_op()
    seen: list[torch.Tensor] = []
    monkeypatch.setattr(
        vllm_plugin, "_TAP", SimpleNamespace(record=lambda layer, rows: seen.append(rows.clone()))
    )
    stream = torch.randn(shape)
    layer = torch.nn.Identity()
    layer.register_forward_hook(vllm_plugin._layer_hook(2))
    layer(stream)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], stream.reshape(6, 8))


# --------------------------------------------------------------------------- vLLM (side venv)

PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg, "
    "a goldsmith from Mainz, combined several existing technologies into a practical system for "
    "printing books with movable metal type."
)
TOP_N = 8


def run_vllm(sae_dir: Path, sink: Path, *extra: str) -> dict:
    """The same prompt twice (the second hits vLLM's prefix cache), greedy, 4 tokens."""
    cmd = [
        str(VENV_PY),
        str(REPO / "scripts" / "_vllm_features.py"),
        "--sae",
        str(sae_dir),
        "--sink",
        str(sink),
        "--top-n",
        str(TOP_N),
        "--max-tokens",
        "4",
        "--block-size",
        "32",
        "--prompt",
        PROMPT,
        "--prompt",
        PROMPT,
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=env, cwd=REPO)
    print(
        f"[vllm {' '.join(extra) or 'compiled'}] {time.perf_counter() - started:.0f} s",
        file=sys.stderr,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith('{"requests"')]
    assert done.returncode == 0 and lines, done.stderr[-4000:] + done.stdout[-2000:]
    return json.loads(lines[-1])


def assert_codes_match(idx, val, ref_idx, ref_val, rel: float) -> float:
    """Values within rel·(the row's largest value); indices equal wherever the reference's top-(n+1)
    values are not near-tied (closer than twice that). Returns the largest error / row scale."""
    n = idx.shape[1]
    scale = ref_val.abs().amax(1, keepdim=True).clamp_min(1e-6)  # [rows, 1]
    err, tol = (val - ref_val[:, :n]).abs() / scale, rel * scale  # [rows, n], [rows, 1]
    assert bool((err <= rel).all()), (
        f"values differ by up to {err.max():.3g} of the row scale (allowed {rel})"
    )
    gaps = ref_val[:, :-1] - ref_val[:, 1:]  # [rows, n]: gap below each slot
    tied = gaps[:, :n] <= 2 * tol  # near-tied with the slot below (or with latent n+1)
    tied[:, 1:] |= gaps[:, : n - 1] <= 2 * tol  # near-tied with the slot above
    assert float(tied.float().mean()) < 0.05, "too many near-ties for a meaningful comparison"
    assert torch.equal(idx[~tied], ref_idx[:, :n][~tied])
    return float(err.max())


NEEDS_VLLM = pytest.mark.skipif(
    not VENV_PY.exists() or not (HF_DIR / "config.json").exists(),
    reason="no vLLM side venv / HF SmolLM2 copy: run `python scripts/_vllm_side.py setup`",
)


@pytest.fixture(scope="module")
def greylens_reference(tmp_path_factory):
    """(SAE directory, reference(prompt ids) -> (output, top-(n+1) indices, values)): greylens's
    own engine on the same SAE, one model load for both vLLM modes."""
    from serve_hooks import LLM
    from serve_hooks.sequence import SamplingParams

    # Input scale of the order fitted on SmolLM2 L15.
    sae_dir = save_sae(
        random_sae(576, 1024, "topk", input_scale=0.01), tmp_path_factory.mktemp("v")
    )
    llm, cache = None, {}

    def reference(ids: list[int]):
        nonlocal llm
        if tuple(ids) not in cache:
            llm = llm or LLM(model="smollm2-135m", saes=[sae_dir], top_n=TOP_N + 1)
            (out,) = llm.generate([ids], SamplingParams(max_tokens=4, ignore_eos=True))
            ref_idx, ref_val = (t[: out.features.n] for t in out.features.codes[HOOK])
            cache[tuple(ids)] = out, ref_idx, ref_val  # [n, top_n + 1] each
        return cache[tuple(ids)]

    return sae_dir, reference


# vLLM's default mode (torch.compile, Inductor: the one where plain forward hooks silently never
# fire) and --enforce-eager. One vLLM start costs minutes; the compiled one adds its compile.
MODES = {"compiled": ((), "DYNAMO_TRACE_ONCE"), "eager": (("--enforce-eager",), "NONE")}


@pytest.mark.slow
@NEEDS_VLLM
@pytest.mark.parametrize("mode", list(MODES))
def test_vllm_features_equal_greylens_engine(mode, greylens_reference, tmp_path):
    flags, compilation_mode = MODES[mode]
    sae_dir, reference = greylens_reference
    run = run_vllm(sae_dir, tmp_path / "sink", *flags)
    assert run["compilation_mode"] == compilation_mode
    if mode == "compiled":
        assert run["backend"] == "inductor"
    ids = run["requests"][0]["prompt_token_ids"]
    out, ref_idx, ref_val = reference(ids)
    # fp32 on both sides, different kernels (fused add-RMSNorm, attention): measured here, values
    # differ by <= 7.8e-7 of the largest value in their row (a code value is a dot product with the
    # scaled residual, so its error scales with the row, whose norm varies 20x along this prompt).
    rel = 1e-5
    for i, req in enumerate(run["requests"]):
        assert req["prompt_token_ids"] == ids
        assert req["output_token_ids"] == out.token_ids, (
            "greedy tokens differ: positions not comparable"
        )
        assert req["num_cached_tokens"] == (32 if i else 0)
        got = read_features(tmp_path / "sink", str(i), timeout=60)
        idx, val = got.codes[HOOK]
        assert idx.shape == (len(ids) + 3, TOP_N)  # prompt + generated tokens but the last
        assert got.token_ids.tolist() == (ids + out.token_ids)[: len(ids) + 3]
        assert got.missing == [], "the cached prefix was filled from feature pages"
        keep = got.computed
        worst = assert_codes_match(idx[keep], val[keep], ref_idx[keep], ref_val[keep], rel)
        print(
            f"[{mode} request {i}] max |Δvalue| / row scale = {worst:.3g} (allowed {rel})",
            file=sys.stderr,
        )
