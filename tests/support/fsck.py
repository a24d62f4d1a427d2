"""Filesystem check of a guest's ext4 data disk after a crash or a failover.

The image is never touched: a copy gets its journal replayed (what the guest's
next mount would do), then must pass ``e2fsck -fn`` without a single finding.  For the
``diskload`` workload the copy's ``/diskload.bin`` must also pass the guest program's
own ``diskload-verify``.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from kemari.errors import ImageError

E2FSCK = shutil.which("e2fsck") or "/usr/sbin/e2fsck"
DEBUGFS = shutil.which("debugfs") or "/usr/sbin/debugfs"


def check_crashed_disk(image: Path, scratch: Path) -> Path:
    """Copy ``image`` into ``scratch``, replay its journal, ``e2fsck -fn`` it; returns the copy.

    ImageError with e2fsck's output when the replay fails (exit status above 1:
    1 only says the journal was replayed) or the forced check finds anything.
    """
    copy = scratch / f"{image.stem}-fsck{image.suffix}"
    try:
        shutil.copyfile(image, copy)
    except OSError as exc:
        raise ImageError(f"cannot copy {image} for e2fsck: {exc}") from exc
    replay = subprocess.run(
        [E2FSCK, "-E", "journal_only", "-p", str(copy)], capture_output=True, text=True, check=False
    )
    if replay.returncode not in (0, 1):
        raise ImageError(
            f"journal replay of {image} failed ({replay.returncode}): "
            f"{replay.stdout}{replay.stderr}"
        )
    check = subprocess.run([E2FSCK, "-fn", str(copy)], capture_output=True, text=True, check=False)
    if check.returncode != 0:
        raise ImageError(
            f"e2fsck -fn of {image} found problems ({check.returncode}): "
            f"{check.stdout}{check.stderr}"
        )
    return copy


def check_diskload_disk(image: Path, scratch: Path, kguest: Path) -> None:
    """:func:`check_crashed_disk`, then the copy's ``/diskload.bin`` must pass ``kguest
    diskload-verify`` (every block consistent with a crash after the last acknowledged
    fsync).  ImageError with the tools' output otherwise."""
    copy = check_crashed_disk(image, scratch)
    dump = scratch / f"{image.stem}-diskload"
    dump.mkdir()
    extract = subprocess.run(
        [DEBUGFS, "-R", f"dump /diskload.bin {dump / 'diskload.bin'}", str(copy)],
        capture_output=True,
        text=True,
        check=False,
    )
    if extract.returncode != 0:
        raise ImageError(f"debugfs could not dump /diskload.bin of {image}: {extract.stderr}")
    verify = subprocess.run(
        [str(kguest), "diskload-verify", "--dir", str(dump)],
        capture_output=True,
        text=True,
        check=False,
    )
    if verify.returncode != 0 or "diskload-verify: OK" not in verify.stdout:
        raise ImageError(
            f"diskload-verify of {image} failed ({verify.returncode}): "
            f"{verify.stdout}{verify.stderr}"
        )
