"""Whether a live process still holds a replica generation's files (issue 10 item 11).

A generation that was handed over to a failover QEMU holds that QEMU's live RAM: it
must stay as long as the QEMU runs, and it is garbage once the QEMU (and its agent) is
gone.  A crash of the agent skips the cleanup that would have removed it, so the next
agent with the same replica folder decides from what the kernel says, not from marker
files:

* a **lock**: the agent that handed a generation over keeps an exclusive ``flock`` on
  its ``replica/lock`` file until its QEMU is gone (kemari.replica.applier); a lock
  that cannot be taken means a live agent still owns the generation;
* **mappings and descriptors**: any process whose ``/proc/PID/maps`` maps, or whose
  ``/proc/PID/fd`` holds open, one of the generation's files (matched by device and
  inode, so a renamed or deleted path still counts) holds it.  That is the failover
  QEMU itself, even when its agent was killed first.

Processes whose ``/proc`` entries this process may not read are not seen; the replica
directory is 0700 (docs/security.md), so only its owner or root can map its files, and
the agents run as that user.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterable
from pathlib import Path

PROC = Path("/proc")


def _file_keys(directories: Iterable[Path]) -> set[tuple[int, int]]:
    """(device, inode) of every regular file below ``directories``."""
    keys: set[tuple[int, int]] = set()
    for directory in directories:
        for root, _dirs, files in os.walk(directory):
            for name in files:
                with contextlib.suppress(OSError):
                    info = os.lstat(os.path.join(root, name))
                    keys.add((info.st_dev, info.st_ino))
    return keys


def lock_is_held(lock_path: Path) -> bool:
    """True when another open file description holds a ``flock`` on ``lock_path``."""
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # releases the lock if it was taken here
    return False


def _maps_hold(pid_dir: Path, keys: set[tuple[int, int]]) -> bool:
    try:
        text = (pid_dir / "maps").read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 5 or fields[4] == "0":
            continue
        try:
            major, minor = (int(part, 16) for part in fields[3].split(":"))
            inode = int(fields[4])
        except ValueError:
            continue
        if (os.makedev(major, minor), inode) in keys:
            return True
    return False


def _fds_hold(pid_dir: Path, keys: set[tuple[int, int]]) -> bool:
    try:
        entries = list((pid_dir / "fd").iterdir())
    except OSError:
        return False
    for entry in entries:
        try:
            info = os.stat(entry)  # follows the magic link: the open file itself
        except OSError:
            continue
        if (info.st_dev, info.st_ino) in keys:
            return True
    return False


def holders(directories: Iterable[Path]) -> list[int]:
    """Pids of live processes that map or hold open a file below ``directories``."""
    keys = _file_keys(directories)
    if not keys:
        return []
    found = []
    try:
        pid_dirs = [p for p in PROC.iterdir() if p.name.isdigit()]
    except OSError:
        return []
    for pid_dir in pid_dirs:
        if _maps_hold(pid_dir, keys) or _fds_hold(pid_dir, keys):
            found.append(int(pid_dir.name))
    return found


def in_use(lock_path: Path, directories: Iterable[Path]) -> bool:
    """True when a live process holds the generation: its lock, or any of its files."""
    return lock_is_held(lock_path) or bool(holders(directories))
