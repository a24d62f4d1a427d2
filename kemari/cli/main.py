"""Entry point of the ``kemari`` command: builds the parser and maps errors to exit codes.

Each command family lives in its own module exposing ``add_parser(subparsers)``;
the handler it registers (``args.func``) returns the process exit status.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kemari import __version__
from kemari.cli import command_modules
from kemari.errors import KemariError


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every command family registered."""
    parser = argparse.ArgumentParser(
        prog="kemari", description="Fault tolerance for unmodified QEMU virtual machines."
    )
    parser.add_argument("--version", action="version", version=f"kemari {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in command_modules():
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; a :class:`KemariError` becomes one line on stderr and exit status 1."""
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except KemariError as exc:
        print(f"kemari: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
