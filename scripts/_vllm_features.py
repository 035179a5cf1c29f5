"""Run prompts through vLLM (side venv) with the greylens plugin on; print one JSON line.

Run with the vLLM SIDE venv's python (see scripts/_vllm_side.py); greylens itself is not
installed there. This script makes the plugin discoverable the way an installed greylens would:
it writes a throwaway `.dist-info` whose `entry_points.txt` holds the `vllm.general_plugins`
entry from pyproject.toml, and puts it and the repository on sys.path / PYTHONPATH (inherited by
vLLM's engine-core process). Nothing is written to the repository or the side venv.

    <side venv>/bin/python scripts/_vllm_features.py --sae DIR --sink DIR --prompt "..."
        [--prompt ...] [--top-n 8] [--max-tokens 4] [--block-size 32] [--pages 65536]
        [--no-prefix-caching] [--enforce-eager] [--model HF_DIR] [--max-model-len 1024]

--model defaults to the side venv's HF copy of SmolLM2-135M-Instruct.

Each prompt is sent in its own `generate` call, in order, so a repeated prompt hits the prefix
cache. Output: {"requests": [{"request_id", "prompt_token_ids", "output_token_ids",
"num_cached_tokens"}], "compilation_mode" (NONE with --enforce-eager), "backend",
"block_size"}; features are in the sink
(read them with `serve_hooks.vllm_features.read_features`).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("GREYLENS_CACHE") or Path.home() / ".cache" / "greylens")
HF_DIR = CACHE / "hf" / "smollm2-135m-instruct"


def entry_point() -> str:
    """The `name = module:function` line of pyproject's vllm.general_plugins table."""
    text = (REPO / "pyproject.toml").read_text()
    table = re.search(
        r'\[project\.entry-points\."vllm\.general_plugins"\]\n((?:[^\[\n].*\n?)+)', text
    )
    if table is None:
        raise RuntimeError(
            'pyproject.toml has no [project.entry-points."vllm.general_plugins"] table'
        )
    return table[1].strip().splitlines()[0].replace('"', "")


def make_discoverable() -> str:
    """A .dist-info with the entry point, on sys.path and PYTHONPATH; returns the plugin's name."""
    site = Path(tempfile.mkdtemp(prefix="greylens-plugin-"))
    # Runs after vLLM's own shutdown (registered later, so it runs first).
    atexit.register(shutil.rmtree, site, True)
    info = site / "greylens_vllm_plugin-0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: greylens-vllm-plugin\nVersion: 0.0\n"
    )
    line = entry_point()
    (info / "entry_points.txt").write_text(f"[vllm.general_plugins]\n{line}\n")
    paths = [str(site), str(REPO)]
    sys.path[:0] = paths
    os.environ["PYTHONPATH"] = os.pathsep.join(
        paths + [p for p in [os.environ.get("PYTHONPATH")] if p]
    )
    return line.split("=")[0].strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sae", action="append", required=True)
    parser.add_argument("--sink", required=True)
    parser.add_argument("--prompt", action="append", required=True)
    parser.add_argument("--top-n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--pages", type=int, default=65536)
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--model", default=str(HF_DIR))
    parser.add_argument("--max-model-len", type=int, default=1024)
    args = parser.parse_args()
    name = make_discoverable()
    os.environ.update({"VLLM_PLUGINS": name, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"})
    # One compute thread, unbound: with "nobind" vLLM reserves no core for its front end
    # (VLLM_CPU_NUM_OF_RESERVED_CPU only applies to "auto" binding, which pins threads: bad on a
    # shared box), and a second thread did not shorten the run (research/LOG.md, 2026-12-08).
    for key, value in {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "OMP_NUM_THREADS": "1",
    }.items():
        os.environ.setdefault(key, value)
    from serve_hooks.vllm_features import plugin_env

    os.environ.update(plugin_env(args.sae, args.sink, args.top_n, args.pages))
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=args.model,
        dtype="float32",
        block_size=args.block_size,
        max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching,
        enforce_eager=args.enforce_eager,
        max_num_seqs=4,
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    requests = []
    for prompt in args.prompt:
        (out,) = llm.generate([prompt], params, use_tqdm=False)
        requests.append(
            {
                "request_id": out.request_id,
                "prompt_token_ids": list(out.prompt_token_ids),
                "output_token_ids": list(out.outputs[0].token_ids),
                "num_cached_tokens": int(out.num_cached_tokens or 0),
            }
        )
    cc = llm.llm_engine.vllm_config.compilation_config
    print(
        json.dumps(
            {
                "requests": requests,
                "compilation_mode": cc.mode.name,
                "backend": cc.backend,
                "block_size": llm.llm_engine.vllm_config.cache_config.block_size,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
