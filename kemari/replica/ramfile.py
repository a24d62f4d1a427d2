"""RAM files of the replica: space reserved up front, mapped shared.

A RAM file holds one RAM block byte for byte (offset in the file = offset in the block),
which is exactly what QEMU's ``memory-backend-file,mem-path=...,share=on`` maps.  Files
are written only through a shared mapping, so hugetlbfs (which has no write(2)) works too.
That is why a RAM file has no kemari.persist header: its metadata (block name, size, file
name) is in the replica's layout file, replica.json, which is a persist frame.  Whether
the filesystem is durable is kemari.persist.is_volatile's business.
"""

import errno
import mmap
import os
from pathlib import Path

from kemari.errors import ReplicaError

PAGE_SIZE = 4096


def reserve(fd: int, size: int, what: str) -> None:
    """Reserve ``size`` bytes of real space for ``fd`` so a full disk fails now, not at a write.

    Writing into a mapped sparse file on a full filesystem would kill the process with
    SIGBUS in the middle of an apply; posix_fallocate turns that into a clear error here.
    """
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise ReplicaError(
                f"no space for {what}: {size} bytes cannot be reserved ({os.strerror(exc.errno)})"
            ) from exc
        raise ReplicaError(f"cannot reserve {size} bytes for {what}: {exc}") from exc


class RamFile:
    """One RAM block's file, reserved to its full size and mapped MAP_SHARED read-write."""

    def __init__(self, path: Path, size: int, *, create: bool) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise ReplicaError(f"RAM file {path}: size {size} is not a positive multiple of 4096")
        self.path = path
        self.size = size
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT | os.O_TRUNC if create else 0)
        try:
            self._fd = os.open(path, flags, 0o600)
        except OSError as exc:
            raise ReplicaError(f"cannot open RAM file {path}: {exc}") from exc
        try:
            if create:
                reserve(self._fd, size, f"RAM file {path}")
            else:
                actual = os.fstat(self._fd).st_size
                if actual != size:
                    raise ReplicaError(f"RAM file {path} has {actual} bytes, expected {size}")
            self.map = mmap.mmap(self._fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self._fd)
            raise

    def zero(self) -> None:
        """Make every byte zero: drop the file's blocks and reserve them again.

        The mapping stays valid; nothing touches it between the two calls.
        """
        try:
            os.ftruncate(self._fd, 0)
            os.ftruncate(self._fd, self.size)
        except OSError as exc:
            raise ReplicaError(f"cannot zero RAM file {self.path}: {exc}") from exc
        reserve(self._fd, self.size, f"RAM file {self.path}")

    def flush(self) -> None:
        """Write the mapping's dirty pages to the file's storage (msync)."""
        self.map.flush()

    def close(self) -> None:
        """Unmap and close; idempotent."""
        if self._fd < 0:
            return
        self.map.close()
        os.close(self._fd)
        self._fd = -1
