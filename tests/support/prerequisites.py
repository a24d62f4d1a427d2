"""What the real tests need on this host; a missing piece fails the test, never skips it.

A suite that skips its checkpoint and failover tests when the patched QEMU is missing
goes green without its most important tests.  So every prerequisite is checked here,
and a missing one fails the test that needs it with one line: what is missing and the
command that installs it.  ``scripts/setup`` installs all of them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest

from kemari.errors import KemariError
from kemari.image.builder import GuestImage, default_image
from kemari.qemu.build import cache_root, patched_qemu
from kemari.qemu.debian import QEMU_PACKAGE, QEMU_PROGRAM

SETUP = "scripts/setup"
PATCHED_QEMU_OVERRIDE = "KEMARI_PATCHED_QEMU"


def missing(what: str, fix: str) -> NoReturn:
    """Fail the current test: ``what`` is missing, ``fix`` installs it."""
    pytest.fail(f"missing prerequisite: {what}; {fix}", pytrace=False)


def patched_qemu_binary() -> Path:
    """Kemari's patched QEMU (``$KEMARI_PATCHED_QEMU`` to test another build of it).

    Checkpoints under TCG need it: Debian's QEMU 7.2 deadlocks at the first one.
    """
    override = os.environ.get(PATCHED_QEMU_OVERRIDE)
    if override:
        if not os.access(override, os.X_OK):
            missing(
                f"{PATCHED_QEMU_OVERRIDE}={override} is not an executable",
                f"point it at a patched QEMU or unset it to use the one {SETUP} builds",
            )
        return Path(override)
    try:
        built = patched_qemu()
    except KemariError as exc:  # no Debian QEMU to build it from
        missing(f"Kemari's patched QEMU ({exc})", f"run {SETUP}")
    if built is None:
        missing(
            f"Kemari's patched QEMU (checkpoints under TCG deadlock without it) is not "
            f"built in {cache_root()}",
            f"run {SETUP} (or: .venv/bin/kemari qemu build)",
        )
    return built.binary


def guest_image() -> GuestImage:
    """The guest kernel and initramfs ``kemari image build`` made."""
    try:
        return default_image()
    except KemariError as exc:
        missing(f"the guest image ({exc})", f"run {SETUP} (or: .venv/bin/kemari image build)")


def tool(program: str, package: str) -> Path:
    """``program`` from ``$PATH``; ``package`` is the Debian package that has it."""
    found = shutil.which(program)
    if found is None:
        missing(f"{program} is not in PATH", f"run {SETUP} (or: apt-get install {package})")
    return Path(found)


def stock_qemu() -> Path:
    """Debian's ``qemu-system-x86_64``."""
    return tool(QEMU_PROGRAM, QEMU_PACKAGE)


def root(why: str) -> None:
    """Root, for ``why`` (network namespaces, taps, mounts)."""
    if os.geteuid() != 0:
        missing(f"root ({why})", "run the tests as root: sudo ./scripts/test")
