"""`python -m serve_hooks serve ...` (a stable contract: scripts call it).

    serve   the OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /v1/models,
            /health, /metrics) on one engine; binds 127.0.0.1 unless --host says otherwise

Example: python -m serve_hooks serve --model tiny --port 8000 --num-blocks 256
With features: python -m serve_hooks serve --model smollm2-135m \
    --sae out/sae/blocks.15.hook_resid_post --probe out/probes/code --graph out/graph/l15 \
    --port 8000
  then send {"prompt": ..., "greylens": {"features": 4, "probes": ["code"], "paths": true}}
"""

from __future__ import annotations

import sys

from sae.cli import add_dataclass_args, command_parser, dataclass_from_args
from serve_hooks.server import ServerConfig, serve


def main(argv: list[str] | None = None) -> int:
    parser, commands = command_parser("python -m serve_hooks", __doc__)
    add_dataclass_args(
        commands.add_parser("serve", help="run the OpenAI-compatible server"), ServerConfig
    )
    args = parser.parse_args(argv)
    try:
        cfg = dataclass_from_args(ServerConfig, args)
        if not 0 <= cfg.port < 65536:
            raise ValueError(f"--port must be in [0, 65535], got {cfg.port}")
        serve(cfg)
    except (ValueError, OSError, MemoryError) as error:  # bad settings, a missing model file
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
