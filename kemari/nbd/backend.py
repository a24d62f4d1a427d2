"""Storage behind an NBD export: the :class:`Backend` protocol and the raw-file backend.

The server checks every request (bounds, flags, read-only) before it reaches a
backend, so a backend only performs I/O.  Contract for every implementation:

* each call applies one whole request (a WRITE is never split between calls
  of different requests), and failures raise :class:`OSError` with a host
  ``errno`` that the server turns into an NBD error reply;
* :meth:`Backend.flush` makes every write that has *completed* (on any
  connection, since all connections share one backend) durable, which is what
  lets the server advertise NBD_FLAG_CAN_MULTI_CONN;
* no call may wait for anything outside the backend (a peer, a checkpoint):
  QEMU drains guest I/O while a VM is paused, so a request that waits for the
  pause to end would deadlock.

:class:`RawFileBackend` serves a raw image file or block device.  Syscalls that can
wait for the device (``fdatasync``, uncached reads, large writes, zeroing) run in a
small private thread pool so the event loop stays responsive; small writes and cached
reads run on the loop, since a thread hop per request (a worker wake-up, then the
loop's) cost more than the syscall on a loaded host (docs/checkpoint.md, "Kemari's data
path").
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import functools
import os
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, TypeVar

from kemari.errors import ImageError

# Linux fallocate(2) modes (include/uapi/linux/falloc.h).
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10

# Errors meaning "this fallocate mode is not available here": fall back.
_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV})

_ZERO_CHUNK = 1024 * 1024
_INLINE_READ_MAX = 256 * 1024
# Buffered writes up to this size are made on the loop: they only copy into the page
# cache (blocking only under memory pressure or dirty-page throttling).
_INLINE_WRITE_MAX = 64 * 1024
_IO_THREADS = 4

_T = TypeVar("_T")


class Backend(Protocol):
    """What the NBD server needs from the storage it exports."""

    @property
    def size(self) -> int:
        """Export size in bytes (fixed for the backend's lifetime)."""
        ...

    @property
    def read_only(self) -> bool:
        """True when writes must be refused with EPERM."""
        ...

    async def read(self, offset: int, length: int) -> bytes:
        """Return exactly ``length`` bytes at ``offset``."""
        ...

    async def write(self, offset: int, data: bytes, *, fua: bool) -> None:
        """Write ``data`` at ``offset``; with ``fua`` it is durable before returning."""
        ...

    async def flush(self) -> None:
        """Make every completed write durable."""
        ...

    async def trim(self, offset: int, length: int, *, fua: bool) -> None:
        """Discard a range (contents afterwards are unspecified to the client)."""
        ...

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fua: bool) -> None:
        """Make a range read as zeroes; ``may_trim=False`` keeps it allocated."""
        ...


def _fallocate_function() -> Callable[[int, int, int, int], int]:
    libc = ctypes.CDLL(None, use_errno=True)
    function = libc.fallocate
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    return function


_fallocate = _fallocate_function()


def _fallocate_range(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


class RawFileBackend:
    """A raw image (regular file or block device) opened for the server's lifetime.

    Use :meth:`open` to create one and ``await close()`` (or ``async with``)
    once the server has stopped.  The image is locked with ``flock`` (exclusive when writable,
    shared when read-only) so two Kemari servers never write one image.
    """

    def __init__(self, path: Path, fd: int, size: int, read_only: bool) -> None:
        self.path = path
        self._fd = fd
        self._size = size
        self._read_only = read_only
        self._executor = ThreadPoolExecutor(max_workers=_IO_THREADS, thread_name_prefix="nbd-io")
        self._closed = False
        self._nowait_reads = True
        # Flush elision: a FLUSH needs an fdatasync only if a write completed since the
        # last successful one started.  Both count completed writes (WRITE, TRIM,
        # WRITE_ZEROES, failed ones too); starting one apart makes the first flush sync
        # whatever the image held before.
        self._writes_completed = 1
        self._writes_durable = 0
        self.syncs = 0  # fdatasyncs issued for FLUSH requests

    @classmethod
    def open(cls, path: Path, *, read_only: bool = False) -> RawFileBackend:
        """Open and lock ``path``; problems raise :class:`ImageError` with one clear line."""
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except FileNotFoundError as exc:
            raise ImageError(f"disk image {path} does not exist") from exc
        except OSError as exc:
            raise ImageError(f"cannot open disk image {path}: {exc.strerror}") from exc
        try:
            mode = os.fstat(fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise ImageError(f"disk image {path} is not a regular file or block device")
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise ImageError(f"disk image {path} is locked by another process") from exc
            size = os.lseek(fd, 0, os.SEEK_END)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, size, read_only)

    @property
    def size(self) -> int:
        """Export size in bytes."""
        return self._size

    def stat(self) -> os.stat_result:
        """``fstat`` of the open image: a deleted image has ``st_nlink`` 0."""
        return os.fstat(self._fd)

    @property
    def read_only(self) -> bool:
        """True when opened read-only."""
        return self._read_only

    async def read(self, offset: int, length: int) -> bytes:
        """Read exactly ``length`` bytes at ``offset``.

        Small reads first try ``RWF_NOWAIT``, which succeeds only when the
        data is already in the page cache and so cannot block the event loop;
        anything else goes to the I/O threads.
        """
        if self._nowait_reads and length <= _INLINE_READ_MAX:
            buffer = bytearray(length)
            try:
                if os.preadv(self._fd, [buffer], offset, os.RWF_NOWAIT) == length:
                    return bytes(buffer)
            except BlockingIOError:
                pass  # not cached: read it in a thread
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
                self._nowait_reads = False  # this file system cannot; stop trying
        return await self._run(self._read_sync, offset, length)

    async def write(self, offset: int, data: bytes, *, fua: bool) -> None:
        """Write ``data`` at ``offset`` (then fdatasync if ``fua``); small ones on the loop."""
        try:
            if fua or len(data) > _INLINE_WRITE_MAX:
                await self._run(self._write_sync, offset, data, fua)
            else:
                self._write_sync(offset, data, False)
        finally:
            self._writes_completed += 1

    async def flush(self) -> None:
        """fdatasync the image, unless no write completed since the last sync started."""
        if self._writes_durable == self._writes_completed:
            return
        covered = self._writes_completed
        self.syncs += 1
        await self._run(os.fdatasync, self._fd)
        self._writes_durable = max(self._writes_durable, covered)

    async def trim(self, offset: int, length: int, *, fua: bool) -> None:
        """Punch a hole (or zero the range where holes are unsupported)."""
        try:
            await self._run(self._zero_sync, offset, length, True, fua)
        finally:
            self._writes_completed += 1

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fua: bool) -> None:
        """Zero a range by punching (``may_trim``), zero-range fallocate, or writing zeroes."""
        try:
            await self._run(self._zero_sync, offset, length, may_trim, fua)
        finally:
            self._writes_completed += 1

    async def __aenter__(self) -> RawFileBackend:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Flush, stop the I/O threads and close the image; call after the server stopped."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self._read_only:
                await asyncio.get_running_loop().run_in_executor(
                    self._executor, os.fdatasync, self._fd
                )
        finally:
            self._executor.shutdown(wait=True)
            os.close(self._fd)

    async def _run(self, function: Callable[..., _T], *args: object) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(function, *args))

    def _read_sync(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) == length:
            return data
        # Short reads are legal for pread; collect the rest.
        parts = [data]
        done = len(data)
        while done < length:
            chunk = os.pread(self._fd, length - done, offset + done)
            if not chunk:
                raise OSError(errno.EIO, f"image ended at {offset + done} (shrunk under us?)")
            parts.append(chunk)
            done += len(chunk)
        return b"".join(parts)

    def _write_sync(self, offset: int, data: bytes, fua: bool) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, offset)
            view = view[written:]
            offset += written
        if fua:
            os.fdatasync(self._fd)

    def _zero_sync(self, offset: int, length: int, may_trim: bool, fua: bool) -> None:
        # Cheapest first: a hole (only when allowed), then an allocated zero
        # range, then plain writes of zeroes, which every file supports.
        modes = [_FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE]
        if may_trim:
            modes.insert(0, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE)
        for mode in modes:
            try:
                _fallocate_range(self._fd, mode, offset, length)
                break
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
        else:
            self._write_zero_chunks(offset, length)
        if fua:
            os.fdatasync(self._fd)

    def _write_zero_chunks(self, offset: int, length: int) -> None:
        zeroes = bytes(min(length, _ZERO_CHUNK))
        end = offset + length
        while offset < end:
            self._write_sync(offset, zeroes[: end - offset], fua=False)
            offset += min(_ZERO_CHUNK, end - offset)
