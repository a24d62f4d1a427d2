"""Fixtures shared by the test modules that boot guests and take checkpoints."""

from __future__ import annotations

import pytest

from kemari.image.builder import default_image
from kemari.qemu.build import patched_qemu


@pytest.fixture(scope="module")
def image_and_patched_qemu() -> None:
    """The guest image (built if missing) and the patched QEMU that checkpoints need
    under TCG; a module that uses it fails at once, with the fix, when QEMU is missing."""
    default_image()
    if patched_qemu() is None:
        pytest.fail("the patched QEMU is not built: run 'kemari qemu build' (scripts/setup does)")
