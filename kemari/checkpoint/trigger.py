"""When checkpoints happen: QEMU's periodic timer, plus on-demand requests that coalesce.

Periodic checkpoints are QEMU's own: ``x-checkpoint-delay`` (the epoch, in ms) arms a timer
in the primary.  Setting that parameter while QEMU is in COLO state also wakes its
checkpoint thread at once (migration.c ``colo_checkpoint_notify``) and restarts the timer;
:class:`CheckpointTrigger` uses that for on-demand checkpoints.

Coalescing and event queuing: :meth:`CheckpointTrigger.request_checkpoint` only records
which checkpoint would cover the caller (the first one whose REQUEST the source has not
seen yet) and wakes one background task.  That task asks QEMU for a checkpoint only while
none is being captured, so any number of requests made during a capture are served
together by the next one.  It does not wait for the previous checkpoint's commit: with
pipelined checkpoints the next capture starts as soon as the guest resumed from the
previous one, and the source's in-flight window (kemari/checkpoint/inflight.py) bounds how
far captures run ahead of the standby's acknowledgements (docs/checkpoint.md, "Event
queuing", says why this policy).

QEMU resets its checkpoint event after reading VMSTATE_RECEIVED, which Kemari sends
together with VMSTATE_LOADED; a wake-up that reaches QEMU's main loop before its COLO
thread has read them is lost (seen in about 1 of 70 back-to-back checkpoints on a loaded
2-core host).  The task therefore asks again when no REQUEST followed within ``retry_s``
(an extra request costs at most one extra checkpoint, never a missed one).
"""

from __future__ import annotations

import asyncio
import collections
import statistics

from kemari.checkpoint.source import CheckpointSource, SourceState
from kemari.errors import KemariError
from kemari.tasks import cancel_and_wait

DEFAULT_RETRY_S = 0.02
LATENCY_SAMPLES = 256


class CheckpointTrigger:
    """On-demand checkpoints for one :class:`CheckpointSource` (``async with`` or start/close)."""

    def __init__(self, source: CheckpointSource, *, retry_s: float = DEFAULT_RETRY_S) -> None:
        if retry_s <= 0:
            raise ValueError(f"retry interval {retry_s} must be positive")
        self.source = source
        self.retry_s = retry_s
        self._wanted = 0  # the highest checkpoint someone asked for
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.kicks = 0  # times QEMU was asked for a checkpoint
        # Asked → QEMU's CHECKPOINT_REQUEST seen, for the asks that were answered.
        self._kick_latencies_s: collections.deque[float] = collections.deque(maxlen=LATENCY_SAMPLES)
        self.last_error = ""

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._serve_forever(), name="checkpoint-trigger")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)

    async def __aenter__(self) -> CheckpointTrigger:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def kick_latency_ms_p50(self) -> float | None:
        """Median time from asking QEMU for a checkpoint to its CHECKPOINT_REQUEST."""
        if not self._kick_latencies_s:
            return None
        return round(statistics.median(self._kick_latencies_s) * 1000, 3)

    def request_checkpoint(self) -> int:
        """Ask for a checkpoint that covers everything the guest did until now.

        Returns its epoch; ``await wait_committed(epoch)`` to know it is safe.  Cheap and
        synchronous: calls made while that checkpoint is pending share it.
        """
        # QEMU stops the VM for checkpoint N only after Kemari answered its REQUEST, and
        # Kemari has not seen that REQUEST yet, so the stop happens after this call.
        target = self.source.requested_epoch + 1
        if target > self._wanted:
            self._wanted = target
            self._wake.set()
        return target

    async def checkpoint(self) -> int:
        """Request a checkpoint and wait until it is committed; returns its epoch."""
        epoch = self.request_checkpoint()
        await self.source.wait_committed(epoch)
        return epoch

    async def wait_committed(self, epoch: int) -> None:
        """Return once checkpoint ``epoch`` or a later one is committed (CheckpointError if
        protection ends first)."""
        await self.source.wait_committed(epoch)

    async def _serve_forever(self) -> None:
        while True:
            # Cleared before serving: a request arriving meanwhile sets it again.
            self._wake.clear()
            await self._serve()
            await self._wake.wait()

    async def _serve(self) -> None:
        source = self.source
        while self._wanted > source.requested_epoch:
            if source.state is SourceState.SYNCING or source.capturing:
                await source.wait_progress()
                continue
            if source.state is not SourceState.PROTECTED:
                # Protection ended: waiters learn it from wait_committed.
                return
            requested = source.requested_epoch
            loop = asyncio.get_running_loop()
            asked_at = loop.time()
            try:
                await source.machine.execute(
                    "migrate-set-parameters", {"x-checkpoint-delay": source.epoch_ms}
                )
                self.kicks += 1
            except KemariError as exc:
                # QEMU left COLO state or is gone; the source notices and reports it.
                self.last_error = str(exc)
            deadline = loop.time() + self.retry_s
            while source.requested_epoch == requested and source.state is SourceState.PROTECTED:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                await source.wait_progress(remaining)
            if source.requested_epoch != requested:
                self._kick_latencies_s.append(loop.time() - asked_at)
