"""Command-line interface: ``kemari <command> ...``; one module per command family."""

from __future__ import annotations

import importlib
from types import ModuleType

# One entry per command module in this package; each exposes add_parser(subparsers).
_COMMAND_MODULES: tuple[str, ...] = (
    "run",
    "monitor",
    "demo",
    "image",
    "doctor",
    "qemu",
    "nbd",
    "net",
    "pki",
)


def command_modules() -> list[ModuleType]:
    """Import and return every command module, in help order."""
    return [importlib.import_module(f"kemari.cli.{name}") for name in _COMMAND_MODULES]
