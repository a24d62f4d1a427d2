"""The standby's side of the disk event-tap: committed guest writes, per storage mode.

The primary's :class:`~kemari.eventtap.disk.OverlayBackend` sends every write of
checkpoint N inside transaction N.  :class:`StandbyDisks` receives the records of each
*committed* transaction (:meth:`StandbyDisks.committed`) and, by storage mode:

* ``shared`` (one image both hosts see): the standby never writes the image while the
  primary lives.  It keeps the committed writes the primary may not have written yet:
  every committed epoch's records until a RELEASED marker says the primary's base holds
  (flushed) that epoch.  :meth:`StandbyDisks.fail_over` writes what it keeps, oldest
  epoch first, before the failover QEMU starts.  Re-applying writes the primary did
  write is harmless (same bytes, same order); skipping one would lose it.
* ``replicated`` (each host has its own image): each committed epoch's records are
  applied to the standby's image at once, in order, so the image is the primary's image
  at every committed epoch.  The image starts valid only once the initial copy's
  SYNCED marker is committed (kemari/eventtap/diskcopy.py); until then failover refuses.

Records of an uncommitted transaction never reach this class (the receiver discards
them), so nothing here ever has to be undone.

Replicated images are flushed in the background (at most one flush per disk at a time,
at most every :data:`BACKGROUND_FLUSH_INTERVAL_S` while writes arrive).  The guest was
told its flushed writes are durable, so a failover must fdatasync the image before the
guest runs on it; without these flushes that one would write back everything since the
initial copy (64 MiB copied a second earlier cost ~140 ms of failover time).  A failed
background flush may have lost writes (Linux reports a writeback error once), so it
makes failover refuse.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from kemari.config import StorageMode
from kemari.errors import EventTapError, FailoverError
from kemari.nbd.backend import RawFileBackend
from kemari.outputs import DiskOp, DiskWrite, Output, OutputKind, record_of

log = logging.getLogger(__name__)

BACKGROUND_FLUSH_INTERVAL_S = 1.0


@dataclasses.dataclass(frozen=True, slots=True)
class DiskFailover:
    """What :meth:`StandbyDisks.fail_over` did to one disk."""

    disk: int
    path: Path
    replayed: int  # records written (shared: the kept ones; replicated: none)
    epochs: tuple[int, ...]  # the epochs those records belonged to


class _Disk:
    def __init__(self, index: int, path: Path) -> None:
        self.index = index
        self.path = path
        self.backend: RawFileBackend | None = None
        self.kept: dict[int, list[DiskWrite]] = {}  # shared: epoch -> records, in order
        self.synced = False  # replicated: the initial copy is complete on this image
        self.applied = 0
        # Replicated: writes applied since the last background flush started, the flush
        # in progress, when it started, and the first error one reported.
        self.unflushed = False
        self.flushing: asyncio.Task[None] | None = None
        self.flush_started_at = 0.0
        self.background_flushes = 0
        self.flush_error: str | None = None
        # (device, inode) of the image when this session first saw it (shared storage:
        # the standby does not hold it open), to tell a replaced image.
        self.identity: tuple[int, int] | None = None


class StandbyDisks:
    """The standby's disks of one VM (``paths[i]`` is disk *i*'s image on this host)."""

    def __init__(self, paths: Sequence[Path], mode: StorageMode) -> None:
        self.mode = mode
        self._disks = [_Disk(index, path) for index, path in enumerate(paths)]
        self.committed_epoch: int | None = None

    def _disk(self, record: DiskWrite) -> _Disk:
        if record.disk >= len(self._disks):
            raise EventTapError(
                f"record for disk {record.disk}, this VM has {len(self._disks)} disk(s)"
            )
        return self._disks[record.disk]

    @property
    def synced(self) -> bool:
        """Replicated: every image holds the initial copy; shared: always True."""
        return self.mode is StorageMode.SHARED or all(disk.synced for disk in self._disks)

    def kept_records(self) -> int:
        """Shared: records kept for a failover."""
        return sum(len(records) for disk in self._disks for records in disk.kept.values())

    def status(self) -> list[dict[str, object]]:
        """Plain data per disk for ``info status``."""
        return [
            {
                "image": str(disk.path),
                "synced": self.mode is StorageMode.SHARED or disk.synced,
                "applied": disk.applied,
                "kept": sum(len(records) for records in disk.kept.values()),
                "background_flushes": disk.background_flushes,
                "flush_error": disk.flush_error,
            }
            for disk in self._disks
        ]

    def check_images(self) -> str | None:
        """Why an image can no longer be trusted, or None (issue 10 item 8).

        One ``stat`` per image (and an ``fstat`` of an open one): the path must still name
        the file this standby writes (replicated) or first saw (shared); a deleted image
        (link count 0, path gone) or one replaced by another file is a problem.
        """
        for disk in self._disks:
            try:
                info = os.stat(disk.path)
            except FileNotFoundError:
                return f"disk {disk.index} image {disk.path} was deleted"
            except OSError as exc:
                return f"disk {disk.index} image {disk.path}: {exc.strerror}"
            identity = (info.st_dev, info.st_ino)
            if disk.backend is not None:
                held = disk.backend.stat()
                if held.st_nlink == 0 or (held.st_dev, held.st_ino) != identity:
                    return (
                        f"disk {disk.index} image {disk.path} was deleted or replaced while "
                        "this standby wrote it"
                    )
            elif disk.identity is not None and disk.identity != identity:
                return f"disk {disk.index} image {disk.path} was replaced by another file"
            disk.identity = identity
        return None

    async def reopen(self) -> None:
        """Forget the images' identities and close them; the next writes open them again
        from their paths (a new session after the operator restored an image)."""
        await self.close()
        for disk in self._disks:
            disk.identity = None
            disk.flush_error = None  # the new initial copy rewrites the whole image

    def new_session(self) -> None:
        """A new primary session starts (epochs restart, a new initial copy will come).

        Shared: what is kept stays until a release marker covers it (a new primary
        runs on the same image, so its first commit's marker is the earliest).
        Replicated: the image is not known to match the new primary until its copy ends.
        """
        for disk in self._disks:
            disk.synced = False

    async def committed(self, epoch: int, records: Sequence[DiskWrite]) -> None:
        """Transaction ``epoch`` is committed; ``records`` are its disk records, in order.

        Replicated: applied to the images before returning (call it before the commit
        is acknowledged, so an acknowledged epoch is on the standby's image).
        """
        for record in records:
            if record.epoch != epoch:
                raise EventTapError(f"record of epoch {record.epoch} in transaction {epoch}")
            disk = self._disk(record)
            if record.op is DiskOp.RELEASED:
                if self.mode is StorageMode.SHARED:
                    for old in [e for e in disk.kept if e <= record.offset]:
                        del disk.kept[old]
            elif record.op is DiskOp.SYNCED:
                disk.synced = True
            elif self.mode is StorageMode.SHARED:
                disk.kept.setdefault(epoch, []).append(record)
            else:
                await _apply(await self._open(disk), record)
                disk.applied += 1
                disk.unflushed = True
        self.committed_epoch = epoch
        for disk in self._disks:
            self._maybe_flush_in_background(disk)

    def _maybe_flush_in_background(self, disk: _Disk) -> None:
        backend = disk.backend
        if backend is None or not disk.unflushed:
            return
        if disk.flushing is not None and not disk.flushing.done():
            return
        now = time.monotonic()
        if now - disk.flush_started_at < BACKGROUND_FLUSH_INTERVAL_S:
            return
        # Ordering: cleared before the flush starts; a write applied while it runs may
        # miss it, and sets the flag again for the next one.
        disk.unflushed = False
        disk.flush_started_at = now
        disk.flushing = asyncio.create_task(
            self._flush(disk, backend), name=f"standby-disk{disk.index}-flush"
        )

    @staticmethod
    async def _flush(disk: _Disk, backend: RawFileBackend) -> None:
        try:
            await backend.flush()
        except OSError as exc:
            if disk.flush_error is None:
                disk.flush_error = f"flushing {disk.path} failed: {exc}"
                log.error("standby disk %d: %s", disk.index, disk.flush_error)
        else:
            disk.background_flushes += 1

    @staticmethod
    async def _wait_flush(disk: _Disk) -> None:
        task, disk.flushing = disk.flushing, None
        if task is not None:
            await task  # _flush records its errors, it never raises OSError

    async def committed_outputs(self, epoch: int, outputs: Sequence[Output]) -> None:
        """:meth:`committed` for a transaction's outputs as the receiver holds them: the
        DISK ones are decoded (EventTapError if malformed), the others ignored."""
        records = [record_of(epoch, o) for o in outputs if o.kind is OutputKind.DISK]
        await self.committed(epoch, records)

    async def _open(self, disk: _Disk) -> RawFileBackend:
        if disk.backend is None:
            try:
                disk.backend = RawFileBackend.open(disk.path)
            except Exception as exc:
                raise EventTapError(f"standby disk {disk.index}: {exc}") from exc
        return disk.backend

    async def fail_over(self) -> list[DiskFailover]:
        """Bring every image to the committed epoch and close it (the failover QEMU's
        NBD server opens it next).  FailoverError when an image cannot be trusted."""
        if not self.synced:
            raise FailoverError(
                "refusing to fail over: the initial disk copy to this standby has not "
                "completed (its image does not match the guest yet)"
            )
        done = []
        for disk in self._disks:
            replayed = 0
            epochs = tuple(sorted(disk.kept))
            await self._wait_flush(disk)
            if disk.flush_error is not None:
                raise FailoverError(
                    f"standby disk {disk.index}: {disk.flush_error}; the image may have "
                    "lost committed writes"
                )
            try:
                backend = await self._open(disk)
                for epoch in epochs:
                    for record in disk.kept[epoch]:
                        await _apply(backend, record)
                        replayed += 1
                await backend.flush()
            except (OSError, EventTapError) as exc:
                raise FailoverError(f"standby disk {disk.index} ({disk.path}): {exc}") from exc
            disk.kept.clear()
            done.append(DiskFailover(disk.index, disk.path, replayed, epochs))
        await self.close()
        return done

    async def close(self) -> None:
        """Close every image this object opened (unlocking it)."""
        for disk in self._disks:
            await self._wait_flush(disk)
            backend, disk.backend = disk.backend, None
            if backend is not None:
                await backend.close()


async def _apply(backend: RawFileBackend, record: DiskWrite) -> None:
    if record.end > backend.size:
        raise EventTapError(
            f"record [{record.offset}, {record.end}) lies beyond the image ({backend.size} bytes)"
        )
    if record.op is DiskOp.WRITE:
        await backend.write(record.offset, record.data, fua=False)
    elif record.op is DiskOp.TRIM:
        await backend.trim(record.offset, record.length, fua=False)
    elif record.op in (DiskOp.ZERO, DiskOp.PUNCH):
        await backend.write_zeroes(
            record.offset, record.length, may_trim=record.op is DiskOp.PUNCH, fua=False
        )
