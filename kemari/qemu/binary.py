"""Which ``qemu-system-x86_64`` Kemari runs, and why.

:func:`qemu_binary` is the single place that chooses the binary; every caller
(``kemari run``, failover, ``kemari doctor``) goes through it.

- KVM: Debian's ``qemu-system-x86``.
- TCG: the Kemari-built QEMU (Debian's source + the COLO/TCG lock patch, see
  docs/qemu-patch.md) when ``kemari qemu build`` has made it, because stock 7.2
  deadlocks at the first checkpoint under TCG; otherwise Debian's, which runs
  guests fine but cannot be protected (``checkpoint_safe`` is False).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from kemari.errors import QemuError
from kemari.qemu.accel import Accel
from kemari.qemu.build import patched_qemu
from kemari.qemu.debian import QEMU_PACKAGE, QEMU_PROGRAM


@dataclasses.dataclass(frozen=True)
class QemuBinary:
    """A QEMU executable, the sentence explaining the choice, and whether it can checkpoint."""

    path: Path
    reason: str
    checkpoint_safe: bool


def qemu_binary(accel: Accel) -> QemuBinary:
    """Choose the QEMU executable for a guest running under ``accel``.

    Raises :class:`QemuError` (with the package to install) when there is none.
    """
    if accel == "tcg":
        patched = patched_qemu()
        if patched is not None:
            return QemuBinary(
                path=patched.binary,
                reason="Kemari-built QEMU (Debian source + COLO/TCG lock patch) for TCG",
                checkpoint_safe=True,
            )
    found = shutil.which(QEMU_PROGRAM)
    if found is None:
        raise QemuError(
            f"{QEMU_PROGRAM} not found in PATH; install it: apt-get install {QEMU_PACKAGE}"
        )
    if accel == "tcg":
        reason = (
            f"Debian's {QEMU_PACKAGE} (the patched QEMU is not built: checkpoints under "
            "TCG would deadlock; run 'kemari qemu build')"
        )
        return QemuBinary(path=Path(found), reason=reason, checkpoint_safe=False)
    return QemuBinary(
        path=Path(found),
        reason=f"the system QEMU from Debian's {QEMU_PACKAGE} package, used for {accel}",
        checkpoint_safe=True,
    )
