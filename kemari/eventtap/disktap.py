"""The disks of one VM joined to a protection session: tagging, transport, release.

:class:`DiskTap` is what the agent wires between its :class:`OverlayBackend` s (one per
disk) and a :class:`~kemari.checkpoint.source.CheckpointSource`:

* :meth:`DiskTap.attach` protects every overlay with the source's ``output_epoch`` as
  the tag and its own :class:`~kemari.eventtap.outputs.OutputLog` as the output path
  (disk records are not :meth:`EventTap.submit`-ted: a held write needs no prompt
  checkpoint, nobody outside waits for it, so it must not trigger the ``event`` policy
  nor fill the network's log); memory pressure requests a checkpoint instead;
* :meth:`DiskTap.outputs_of` gives the sender the records of an epoch (compose it with
  the network tap's ``outputs_of``: the order between a disk record and a frame does not
  matter, only the order within each device);
* as a :class:`~kemari.checkpoint.source.SourceListener` it releases each committed
  epoch to the base images (in a background task, in commit order: the listener call
  must not block), drains everything when protection ends UNPROTECTED (the guest goes
  on here), and drops everything when it ends FAILED (QEMU is gone: the standby resumes
  from the last commit and replays the committed writes itself; this host must never
  write the image again, a late write could land after the new primary's).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence

from kemari.checkpoint.source import CheckpointSource, SourceState
from kemari.checkpoint.trigger import CheckpointTrigger
from kemari.errors import EventTapError
from kemari.eventtap.disk import OverlayBackend, hold_in
from kemari.eventtap.gate import ReleasePermit
from kemari.eventtap.outputs import OutputLog
from kemari.outputs import Output

log = logging.getLogger(__name__)


class DiskTap:
    """Connects a VM's overlays (each with its own disk number) to protection sessions."""

    def __init__(
        self, overlays: Sequence[OverlayBackend], output_log: OutputLog | None = None
    ) -> None:
        if len({overlay.disk for overlay in overlays}) != len(overlays):
            raise EventTapError("two overlays serve the same disk number")
        self.overlays = tuple(overlays)
        self.log = OutputLog() if output_log is None else output_log
        self.last_error = ""
        self.permit: ReleasePermit | None = None  # set_permit()
        self.fenced = False
        self._unprotect_pending = False  # protection ended while the permit refused
        self._source: CheckpointSource | None = None
        self._work: asyncio.Queue[Callable[[], Awaitable[object]] | None] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None

    async def attach(self, source: CheckpointSource, trigger: CheckpointTrigger) -> None:
        """Follow ``source``; call before it starts.  Waits until the previous session's
        writes are drained (a new session's writes must not overtake them)."""
        if self._source is not None:
            raise EventTapError("the disk tap already follows a protection session")
        await self._drained()
        self.log.restart_epochs()
        self._source = source
        for overlay in self.overlays:
            overlay.on_pressure = trigger.request_checkpoint
            overlay.protect(lambda: source.output_epoch, hold_in(self.log))
        source.add_listener(self)
        if self._worker is None:
            self._worker = asyncio.create_task(self._serve(), name="disk-release")

    def outputs_of(self, epoch: int) -> list[Output]:
        """The disk records of ``epoch``, in order, for the transaction sender."""
        return self.log.outputs_of(epoch)

    async def checkpoint_requested(self, epoch: int) -> None:
        """SourceListener: nothing to do; the overlays hold writes without back-pressure."""

    def checkpoint_committed(self, epoch: int) -> None:
        """SourceListener: the standby holds ``epoch``: its writes may reach the images."""
        self.log.release(epoch)
        if not self._permitted(committed=True):
            return  # held in the overlays: a later permitted commit releases them too
        for overlay in self.overlays:
            self._work.put_nowait(functools.partial(overlay.release, epoch))

    def protection_ended(self, state: SourceState) -> None:
        """SourceListener: drain into the images (UNPROTECTED) or drop everything (FAILED)."""
        self._source = None
        if state is SourceState.UNPROTECTED:
            self.log.release_all()
            if not self._permitted(committed=False):
                self._unprotect_pending = True  # release_permitted() or fence() decides
                return
            for overlay in self.overlays:
                self._work.put_nowait(overlay.unprotect)
        else:
            self.log.discard_all()
            for overlay in self.overlays:
                overlay.discard()

    # -- release permit (docs/ha.md rule 2) --------------------------------------------

    def set_permit(self, permit: ReleasePermit) -> None:
        """Ask ``permit`` before any write reaches an image (shared storage with --ha)."""
        self.permit = permit
        for overlay in self.overlays:
            overlay.withhold = lambda: not self._permitted(committed=False)

    def _permitted(self, committed: bool) -> bool:
        if self.fenced:
            return False
        return self.permit is None or self.permit.may_release(committed)

    def release_permitted(self) -> None:
        """The permit allows case (b) again: what the overlays hold reaches the images."""
        if self._source is not None or not self._permitted(committed=False):
            return
        pending, self._unprotect_pending = self._unprotect_pending, False
        for overlay in self.overlays:
            if pending or overlay.held_writes:
                self._work.put_nowait(overlay.unprotect)

    def fence(self) -> int:
        """Another agent is active: drop every held write and fence the disks (EIO)."""
        self.fenced = True
        return sum(overlay.discard() for overlay in self.overlays)

    async def _drained(self) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def mark() -> None:
            done.set_result(None)

        self._work.put_nowait(mark)
        if self._worker is None:
            self._worker = asyncio.create_task(self._serve(), name="disk-release")
        await done

    async def _serve(self) -> None:
        while (job := await self._work.get()) is not None:
            try:
                await job()
            except OSError as exc:
                # The writes stay held (reads stay right); the next release retries.
                self.last_error = f"writing released disk data failed: {exc}"
                log.error("%s", self.last_error)

    async def close(self) -> None:
        """Finish pending releases and stop the worker (after the source is closed)."""
        worker, self._worker = self._worker, None
        if worker is not None:
            self._work.put_nowait(None)
            with contextlib.suppress(asyncio.CancelledError):
                await worker
