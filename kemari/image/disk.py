"""Raw ext4 data disks for the guest (mounted at /data by the guest's init)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from kemari.errors import ImageError

MIN_DISK_MIB = 8
MAX_DISK_MIB = 16 * 1024 * 1024  # 16 TiB


def create_data_disk(path: Path, size_mib: int, overwrite: bool = False) -> None:
    """Create a sparse raw file of ``size_mib`` MiB holding an empty ext4 filesystem.

    An existing file is refused unless ``overwrite``.  On failure nothing is left behind.
    """
    if not MIN_DISK_MIB <= size_mib <= MAX_DISK_MIB:
        raise ImageError(f"disk size must be {MIN_DISK_MIB} MiB .. 16 TiB, not {size_mib} MiB")
    if path.exists() and not overwrite:
        raise ImageError(f"{path} already exists (pass --force to overwrite it)")
    if path.exists() and not path.is_file():
        raise ImageError(f"{path} is not a regular file")
    mkfs = shutil.which("mkfs.ext4") or shutil.which("mkfs.ext4", path="/usr/sbin:/sbin")
    if mkfs is None:
        raise ImageError("mkfs.ext4 is missing: install e2fsprogs")
    try:
        with path.open("wb") as disk:
            disk.truncate(size_mib << 20)
    except OSError as exc:
        raise ImageError(f"cannot create {path}: {exc}") from exc
    # Eager inode-table and journal init: no ext4lazyinit writes in the guest later,
    # so the guest's disk traffic is only what its workload does.
    command = [
        mkfs,
        "-F",
        "-q",
        "-L",
        "kemari-data",
        "-m",
        "0",
        "-E",
        "lazy_itable_init=0,lazy_journal_init=0",
        str(path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        path.unlink(missing_ok=True)
        raise ImageError(f"mkfs.ext4 on {path} failed: {done.stderr.strip()}")


def parse_size_mib(text: str) -> int:
    """``512``/``512M``/``512MiB`` -> 512, ``2G``/``2GiB`` -> 2048, ``1T`` -> 1048576."""
    units = {"": 1, "M": 1, "MIB": 1, "G": 1024, "GIB": 1024, "T": 1 << 20, "TIB": 1 << 20}
    clean = text.strip().upper()
    digits = clean.rstrip("MGTIB")
    unit = clean[len(digits) :]
    if not digits.isdigit() or unit not in units:
        raise ImageError(f"invalid size {text!r} (examples: 64M, 512MiB, 2G)")
    return int(digits) * units[unit]
