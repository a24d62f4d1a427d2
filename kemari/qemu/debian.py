"""Debian's QEMU: the program and package names, and reading a binary's version."""

from __future__ import annotations

import subprocess
from pathlib import Path

from kemari.errors import QemuError

QEMU_PROGRAM = "qemu-system-x86_64"
QEMU_PACKAGE = "qemu-system-x86"
_VERSION_TIMEOUT_S = 10.0


def qemu_version(binary: Path) -> str:
    """The first line of ``BINARY --version`` (e.g. ``QEMU emulator version 7.2.22 (...)``)."""
    try:
        completed = subprocess.run(
            [str(binary), "--version"],
            capture_output=True,
            text=True,
            timeout=_VERSION_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise QemuError(f"{binary} --version failed: {exc}") from exc
    first_line = completed.stdout.strip().splitlines()[:1]
    if completed.returncode != 0 or not first_line:
        detail = completed.stderr.strip() or f"exit status {completed.returncode}"
        raise QemuError(f"{binary} --version failed: {detail}")
    return first_line[0]
