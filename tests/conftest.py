"""Fixtures shared by the test modules that boot guests and take checkpoints.

Every prerequisite fails the test that needs it, with the command that installs it
(``support.prerequisites``); nothing here skips.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support import prerequisites
from support.ha_pair import HaLab

from kemari.image.builder import GuestImage


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests marked ``root`` fail at once, with the fix, when not run as root."""
    if item.get_closest_marker("root") is not None:
        prerequisites.root("network namespaces, tap devices, mounts")


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """The built guest image; the test fails with the fix when it is missing."""
    return prerequisites.guest_image()


@pytest.fixture(scope="session")
def patched_qemu_binary() -> Path:
    """Kemari's patched QEMU; the test fails with the fix when it is not built."""
    return prerequisites.patched_qemu_binary()


@pytest.fixture(scope="module")
def image_and_patched_qemu(patched_qemu_binary: Path, guest_image: GuestImage) -> None:
    """The guest image and the patched QEMU that checkpoints need under TCG (the agents
    these modules start run ``--accel tcg``); each is checked, neither is skipped."""
    del patched_qemu_binary, guest_image


@pytest.fixture(scope="session")
def ha_lab() -> Iterator[HaLab]:
    """One lab for every automatic-failover guest test (tests/support/ha_pair.py): two
    hosts, a client and a three-member etcd; each test's pair uses its own VM name."""
    with HaLab() as lab:
        yield lab
