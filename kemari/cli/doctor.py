"""``kemari doctor [--json]``: check this host and say how to fix what is missing."""

from __future__ import annotations

import argparse
import json

from kemari.doctor import format_report, run_checks


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``kemari doctor``."""
    parser = subparsers.add_parser(
        "doctor",
        help="check QEMU, accelerator, kernel features and tools on this host",
        description=(
            "Check what this host offers Kemari (QEMU, accelerator, /dev/kvm, tun, "
            "network namespaces, bridge, tools, guest image) and how to fix what is missing. "
            "Exit status 1 when a required check fails."
        ),
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=_doctor)


def _doctor(args: argparse.Namespace) -> int:
    report = run_checks()
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(format_report(report))
    return 0 if report.ok else 1
