"""The patched QEMU the checkpoint tests run, and the marker for tests that need it.

``KEMARI_PATCHED_QEMU=PATH`` runs them against another build of the patched QEMU.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kemari.qemu.build import patched_qemu

_patched = patched_qemu()
_override = os.environ.get("KEMARI_PATCHED_QEMU")
PATCHED_QEMU = Path(_override) if _override else _patched.binary if _patched else None
needs_patched = pytest.mark.skipif(
    PATCHED_QEMU is None, reason="patched QEMU not built (kemari qemu build)"
)
