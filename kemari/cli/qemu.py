"""``kemari qemu build [--force]`` and ``kemari qemu which``: Kemari's patched QEMU for TCG."""

from __future__ import annotations

import argparse

from kemari.qemu.build import build_patched_qemu, cache_root, current_key, patched_qemu


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``kemari qemu``."""
    parser = subparsers.add_parser(
        "qemu",
        help="build or locate the patched QEMU used under TCG",
        description=(
            "QEMU 7.2 deadlocks within the first COLO checkpoints under TCG; Kemari builds "
            "qemu-system-x86_64 from Debian's own source package with a two-line fix "
            "(docs/qemu-patch.md) and caches it. The system QEMU is never replaced."
        ),
    )
    actions = parser.add_subparsers(dest="qemu_action", required=True, metavar="ACTION")
    build = actions.add_parser(
        "build", help="build the patched QEMU (cached; about 7 min on 2 cores the first time)"
    )
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.add_argument(
        "--jobs", type=_positive_int, default=None, help="parallel compile jobs (default: CPUs)"
    )
    build.set_defaults(func=_build)
    which = actions.add_parser("which", help="print the cached patched QEMU (exit 1 if not built)")
    which.set_defaults(func=_which)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def _build(args: argparse.Namespace) -> int:
    result = build_patched_qemu(force=args.force, jobs=args.jobs)
    print(result.binary)
    return 0


def _which(args: argparse.Namespace) -> int:
    del args
    found = patched_qemu()
    if found is None:
        key = current_key()
        print(f"not built: {cache_root() / key.name} (run: kemari qemu build)")
        return 1
    print(found.binary)
    print(found.version)
    return 0
