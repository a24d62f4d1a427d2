"""Which ``qemu-system-x86_64`` Kemari runs, and why.

:func:`qemu_binary` is the single place that chooses the binary; every caller
(``kemari run``, failover, ``kemari doctor``) goes through it.  Today it is
Debian's ``qemu-system-x86`` for every accelerator.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

from kemari.errors import QemuError
from kemari.qemu.accel import Accel

QEMU_PROGRAM = "qemu-system-x86_64"
QEMU_PACKAGE = "qemu-system-x86"
_VERSION_TIMEOUT_S = 10.0


@dataclasses.dataclass(frozen=True)
class QemuBinary:
    """A QEMU executable and the sentence explaining the choice."""

    path: Path
    reason: str


def qemu_binary(accel: Accel) -> QemuBinary:
    """Choose the QEMU executable for a guest running under ``accel``.

    Raises :class:`QemuError` (with the package to install) when there is none.
    """
    found = shutil.which(QEMU_PROGRAM)
    if found is None:
        raise QemuError(
            f"{QEMU_PROGRAM} not found in PATH; install it: apt-get install {QEMU_PACKAGE}"
        )
    return QemuBinary(
        path=Path(found),
        reason=f"the system QEMU from Debian's {QEMU_PACKAGE} package, used for {accel}",
    )


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
