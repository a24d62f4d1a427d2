"""Entry point of the ``kemari`` command: builds the parser and maps errors to exit codes.

Each command family lives in its own module exposing ``add_parser(subparsers)``;
the handler it registers (``args.func``) returns the process exit status.
"""

from __future__ import annotations

import argparse
import os
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
    """Run the CLI; a :class:`KemariError`, or an :class:`OSError` the system reported,
    becomes one line on stderr and exit status 1."""
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except KemariError as exc:
        print(f"kemari: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        # The system refused something (a directory that cannot be made, a file that
        # cannot be opened): one line with the path and the errno text.  An OSError
        # without an errno is not such a report but a bug's, and keeps its traceback.
        if exc.errno is None:
            raise
        print(f"kemari: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return status


def describe_os_error(exc: OSError) -> str:
    """``path: strerror`` (``path -> path2: strerror`` for a rename or link)."""
    text = exc.strerror or (os.strerror(exc.errno) if exc.errno is not None else str(exc))
    paths = [
        os.fsdecode(p) if isinstance(p, bytes) else str(p)
        for p in (exc.filename, exc.filename2)
        if p is not None
    ]
    return f"{' -> '.join(paths)}: {text}" if paths else text


if __name__ == "__main__":
    sys.exit(main())
