"""``kemari demo``: the one-machine demo (see kemari/demo.py)."""

from __future__ import annotations

import argparse

from kemari.demo import run_demo


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``kemari demo``."""
    parser = subparsers.add_parser(
        "demo", help="run the one-machine demo", description="Run Kemari's demo (needs root)."
    )
    parser.add_argument("--records", type=int, default=20, help="records the client stores")
    parser.add_argument(
        "--keep-running", action="store_true", help="leave the VM running until Ctrl-C"
    )
    parser.set_defaults(func=lambda args: run_demo(args.records, args.keep_running))
