"""`python -m sae harvest ...` and `python -m sae info DIR` (a stable contract: scripts call these)."""

from __future__ import annotations

import argparse
import json
import sys

from sae.cli import add_dataclass_args, dataclass_from_args
from sae.harvest import HarvestConfig, harvest
from sae.store import ActivationStore, StoreError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sae", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    harvest_parser = commands.add_parser("harvest", help="collect activations into a store")
    add_dataclass_args(harvest_parser, HarvestConfig, required=("out",))
    info_parser = commands.add_parser("info", help="print a store's manifest summary as JSON")
    info_parser.add_argument("store", help="activation store directory")
    info_parser.add_argument(
        "--verify", action="store_true", help="also check every shard's sha256"
    )
    args = parser.parse_args(argv)

    try:
        if args.command == "harvest":
            store = harvest(dataclass_from_args(HarvestConfig, args))
            print(json.dumps(store.summary(), indent=2))
        elif args.command == "info":
            store = ActivationStore(args.store, verify=False)
            if args.verify:
                store.verify()
            print(json.dumps(store.summary(), indent=2))
    except (StoreError, ValueError, FileNotFoundError, ModuleNotFoundError, OverflowError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
