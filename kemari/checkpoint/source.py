"""The primary's QEMU-facing half of checkpointing: QEMU's x-colo stream in, a sink out.

:class:`CheckpointSource` turns on QEMU's ``x-colo`` migration capability, hands QEMU one
end of a socket pair (``getfd`` + ``migrate fd:NAME``), reads the stream with
:class:`~kemari.stream.StreamParser` and plays the COLO *secondary* on the same socket.
Everything QEMU sends goes to a :class:`CheckpointSink` (the ft-transaction sender):

    initial sync   begin_sync(config, blocks) → sync_pages(batch)… → end_sync(device, vmdesc)
                   then Kemari sends CHECKPOINT_READY and the guest runs (protected)
    checkpoint N   REQUEST → Kemari answers REPLY (QEMU stops the VM) → the pages and the
                   device state are read and held → Kemari answers RECEIVED + LOADED
                   (QEMU resumes the VM) → begin(N) → pages(all its runs) →
                   device_state(N, data) → commit(N) (queued)
    in background  acknowledged(N) → listeners' checkpoint_committed(N), in epoch order

Pipelining (docs/protocol.md, "Pipelined checkpoints"): checkpoint N is *captured* once
its whole stream is read and parsed, its pages held as views of the chunks they came
in; the guest resumes at once unless the
:class:`~kemari.checkpoint.inflight.InflightWindow` is over its bounds, in which case
LOADED waits until enough acknowledgements arrived.  Only then does the sink get N, so
framing and encrypting it overlap with the guest running instead of pausing it.  One
background task awaits the acknowledgements in epoch order.

Invariants:

* CHECKPOINT_READY is sent only after ``end_sync`` returned (the standby holds epoch 0).
  VMSTATE_LOADED(N) is sent only once N is captured and while the window (N included)
  is within its bounds, so the guest never runs more than the window ahead of the standby.
  N goes to the sink right after LOADED, or before it when the guest must wait for
  acknowledgements anyway (with a window of 0, for N's own).
* Listeners hear ``checkpoint_committed(N)`` only after ``commit(N)`` and then
  ``acknowledged(N)`` returned, once per epoch, in increasing order: an output tagged N
  is released only after the standby committed N.
* A checkpoint requested at time *t* is served by the first checkpoint whose REQUEST Kemari
  had not yet seen at *t*: QEMU stops the VM only after Kemari's REPLY, hence after *t*.
* Output tagging (docs/protocol.md, "Event-tap"): :attr:`output_epoch` is the checkpoint
  that covers a guest output Kemari reads now.  It becomes 1 just *before* CHECKPOINT_READY
  is written and grows when VMSTATE_SEND is read, before anything is awaited, so an output
  is never tagged with a checkpoint whose state predates it.
* When the sink fails (standby lost, including a missing or wrong acknowledgement), the
  stream breaks or :meth:`close` is called, the guest keeps running: QMP
  ``x-colo-lost-heartbeat`` ends COLO mode on the primary (QEMU then marks the migration
  completed and restarts the VM), or ``migrate_cancel`` during the initial sync.  The
  source ends UNPROTECTED, or FAILED when QEMU itself is gone.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import logging
import socket
import time
from collections.abc import Sequence
from typing import Protocol

from kemari import crashpoint
from kemari.checkpoint.inflight import InflightWindow
from kemari.checkpoint.timeline import (
    RESUME_EVENT,
    STOP_EVENT,
    PauseMarks,
    PauseTimeline,
    attach_run_state_event,
    monotonic_of,
)
from kemari.config import DEFAULT_CHECKPOINTS_IN_FLIGHT
from kemari.errors import CheckpointError, KemariError
from kemari.qemu.machine import EventSubscription, QemuMachine, QmpCommandError
from kemari.stream import (
    ColoEvent,
    ColoMessage,
    Configuration,
    DeviceState,
    LiveStateEnd,
    RamBlockList,
    RamPageRun,
    StreamEvent,
    StreamParser,
    VmDescription,
    encode_colo_message,
)
from kemari.tasks import cancel_and_wait

log = logging.getLogger(__name__)

PageBatch = Sequence[RamPageRun]

FD_NAME = "kemari_colo"
# Test hooks (kemari/crashpoint.py): die before answering checkpoint N's REQUEST; die
# once LOADED of a checkpoint >= N was sent while it (one in flight) or it and an older
# one (two in flight) await their acknowledgement.
CRASH_BEFORE_REPLY = "before-reply"
CRASH_IN_FLIGHT = "in-flight"
CRASH_TWO_IN_FLIGHT = "two-in-flight"
# Above what a unix socket hands over per read (about 200 KiB), so one read takes it all.
_RECV_BYTES = 512 << 10
# QEMU's rate limit applies to the initial sync only (checkpoints are sent unthrottled);
# the default of 128 MiB/s would make a 1 GiB guest's sync take 8 s for no reason.
_MAX_BANDWIDTH = 16 << 30
_RELEASE_TIMEOUT_S = 10.0
_RELEASE_POLL_S = 0.01
RECENT_CHECKPOINTS = 256
# Checkpoints whose QEMU STOP/RESUME events may still arrive (they come on the QMP socket,
# after the stream work of the same moment); older events are no longer placed.
_TIMED_CHECKPOINTS = 8
# query-migrate statuses in which ``migrate_cancel`` ends the initial sync.
_PRECOPY_STATUSES = frozenset({"setup", "active", "pre-switchover", "device", "wait-unplug"})
_ENDED_STATUSES = frozenset({"none", "completed", "failed", "cancelled"})

_REPLY = encode_colo_message(ColoMessage.CHECKPOINT_REPLY)
_READY = encode_colo_message(ColoMessage.CHECKPOINT_READY)
# Both answers go in one write after the capture: QEMU does nothing between them that the
# standby needs (colo.c only notifies colo-compare, unused here), and each write wakes a
# QEMU thread that can preempt Kemari on a small host while the VM is stopped.
_RECEIVED_LOADED = encode_colo_message(ColoMessage.VMSTATE_RECEIVED) + encode_colo_message(
    ColoMessage.VMSTATE_LOADED
)


class CheckpointSink(Protocol):
    """Where the source delivers the guest's state; every call may raise to mean "standby lost".

    Page runs hold memoryviews into immutable input chunks, so a sink may keep them.
    Calls come strictly in the order described in the module docstring.
    """

    async def begin_sync(self, configuration: Configuration, blocks: RamBlockList) -> None:
        """The initial sync starts: the machine's configuration and its RAM blocks."""

    async def sync_pages(self, batch: PageBatch) -> None:
        """Pages of the initial sync (every block's pages, possibly several times)."""

    async def end_sync(self, device_state: bytes, vmdesc: bytes) -> None:
        """The initial device state; return only when the standby holds the whole sync.

        QEMU has stopped the VM at the end of precopy and keeps it stopped until this
        returns, so pages should already be on their way (``sync_pages`` may apply
        backpressure but should not sit on data).
        """

    async def begin(self, epoch: int) -> None:
        """Checkpoint ``epoch`` (1, 2, ...) starts; the VM is stopping."""

    async def pages(self, batch: PageBatch) -> None:
        """Pages dirtied since the previous checkpoint."""

    async def device_state(self, epoch: int, data: bytes) -> None:
        """The device state of checkpoint ``epoch`` (FULL sections, no final EOF byte)."""

    async def commit(self, epoch: int) -> None:
        """Queue ``epoch``'s outputs and COMMIT; the guest may resume once this returns."""

    async def acknowledged(self, epoch: int) -> None:
        """Return once the standby committed ``epoch``; raise if it did not in time.

        Called once per committed epoch, in order, from one task, concurrently with the
        next checkpoint's calls (``begin`` … ``commit`` of later epochs).
        """


class SourceListener(Protocol):
    """Told when checkpoints commit and when protection ends (the event-tap releases outputs).

    Called from the source's task; must not raise or block.
    """

    async def checkpoint_requested(self, epoch: int) -> None:
        """QEMU asked for checkpoint ``epoch``; it stops the VM once every listener returned
        (QEMU drops the frames its NIC backend cannot hand over at that stop)."""

    def checkpoint_committed(self, epoch: int) -> None:
        """The standby holds checkpoint ``epoch`` (the guest may already run past it, and
        later checkpoints may be captured but not yet committed)."""

    def protection_ended(self, state: SourceState) -> None:
        """Protection is over: UNPROTECTED (the guest runs on) or FAILED (QEMU is gone)."""


class SourceState(enum.Enum):
    """Where the primary's protection is."""

    IDLE = "idle"  # not started
    SYNCING = "syncing"  # initial sync (precopy) running; the guest runs unprotected
    PROTECTED = "protected"  # in COLO mode; outputs leave only once their checkpoint committed
    RELEASING = "releasing"  # protection is being dropped; the guest is being resumed
    UNPROTECTED = "unprotected"  # protection ended; the guest runs without a replica
    FAILED = "failed"  # QEMU is gone or did not resume; the guest's fate is unknown


# States in which a guest output is tagged (once the initial sync has ended).
_TAGGING_STATES = frozenset({SourceState.SYNCING, SourceState.PROTECTED, SourceState.RELEASING})


@dataclasses.dataclass(frozen=True, slots=True)
class CheckpointRecord:
    """What one committed checkpoint cost."""

    epoch: int
    stop_s: float  # CHECKPOINT_REQUEST received → VMSTATE_SEND received (QEMU stops the VM)
    pause_s: float  # VMSTATE_SEND received → VMSTATE_LOADED sent (the VM is stopped)
    transfer_s: float  # VMSTATE_SEND → device state received (RAM and devices read)
    held_s: float  # part of the pause LOADED waited for the in-flight window
    commit_s: float  # commit() called → acknowledged() returned (the commit round trip)
    pages: int  # page records (data and zero pages)
    stream_bytes: int  # bytes QEMU sent for this checkpoint, COLO messages included
    device_bytes: int
    committed_at: float  # time.monotonic() when the acknowledgement arrived
    timeline: PauseTimeline  # the pause milestone by milestone (docs/checkpoint.md)


@dataclasses.dataclass(slots=True)
class _Capture:
    """A captured checkpoint's costs, until it is both resumed from and acknowledged."""

    epoch: int
    stop_s: float
    transfer_s: float
    pages: int
    stream_bytes: int
    device_bytes: int
    stopped_at: float
    marks: PauseMarks
    resumed_at: float | None = None
    commit_started_at: float | None = None
    held_s: float = 0.0
    acked_at: float | None = None

    @property
    def settled(self) -> bool:
        """The guest resumed from it and the standby committed it."""
        return self.resumed_at is not None and self.acked_at is not None

    def record(self) -> CheckpointRecord | None:
        """The record, once the guest resumed from it and the standby committed it."""
        timeline = self.marks.timeline()
        if (
            self.resumed_at is None
            or self.commit_started_at is None
            or self.acked_at is None
            or timeline is None
        ):
            return None
        return CheckpointRecord(
            epoch=self.epoch,
            stop_s=self.stop_s,
            pause_s=self.resumed_at - self.stopped_at,
            transfer_s=self.transfer_s,
            held_s=self.held_s,
            commit_s=self.acked_at - self.commit_started_at,
            pages=self.pages,
            stream_bytes=self.stream_bytes,
            device_bytes=self.device_bytes,
            committed_at=self.acked_at,
            timeline=timeline,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class SyncRecord:
    """What the initial sync cost."""

    duration_s: float  # migrate issued → CHECKPOINT_READY sent
    pages: int
    stream_bytes: int
    ram_bytes: int  # guest RAM described by the block list


class CheckpointSource:
    """Protect a running primary ``QemuMachine`` by streaming its checkpoints to ``sink``."""

    def __init__(
        self,
        machine: QemuMachine,
        sink: CheckpointSink,
        *,
        epoch_ms: int,
        in_flight: int = DEFAULT_CHECKPOINTS_IN_FLIGHT,
    ) -> None:
        if not 0 < epoch_ms < 1 << 32:
            raise CheckpointError(f"checkpoint epoch {epoch_ms} ms is not a positive u32")
        self.machine = machine
        self.sink = sink
        self.epoch_ms = epoch_ms
        self._state = SourceState.IDLE
        self._reason = ""
        self._parser = StreamParser()
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._configuration: Configuration | None = None
        self._ram_bytes = 0
        self._initial_device_state: bytes | None = None
        self._requested = 0  # CHECKPOINT_REQUESTs seen
        self._started = 0  # VMSTATE_SENDs seen (the VM stopped for that many checkpoints)
        self._tagging = False  # outputs are tagged (set just before CHECKPOINT_READY)
        self._listeners: list[SourceListener] = []
        self._resumed = 0  # checkpoints captured and resumed from (LOADED sent)
        self._committed = 0  # checkpoints the standby acknowledged (listeners told)
        self._forwarded = 0  # checkpoints whose commit() returned (queued to the standby)
        # The page runs of the checkpoint being captured, for the sink after LOADED.
        self._held_pages: list[RamPageRun] = []
        self._window: InflightWindow[_Capture] = InflightWindow(in_flight)
        self._pages = 0  # page records of the sync / checkpoint in progress
        self._received = 0  # stream bytes so far
        self._received_at_mark = 0  # stream bytes when the last sync/checkpoint ended
        self._started_at = 0.0
        self._requested_at = 0.0
        self._stopped_at = 0.0
        self._sync: SyncRecord | None = None
        self._recent: collections.deque[_Capture] = collections.deque(maxlen=RECENT_CHECKPOINTS)
        self._read_at = 0.0  # time.monotonic() when the stream read being handled returned
        self._marks: PauseMarks | None = None  # the checkpoint being captured
        self._timed: collections.deque[PauseMarks] = collections.deque(maxlen=_TIMED_CHECKPOINTS)
        self._events_scope = contextlib.ExitStack()
        self._run_state_events: EventSubscription | None = None
        # Replaced on every change; waiters hold the old one (cheap, no lock needed).
        self._progress = asyncio.Event()

    # -- status ----------------------------------------------------------------

    @property
    def state(self) -> SourceState:
        return self._state

    @property
    def reason(self) -> str:
        """Why protection ended (empty while it has not)."""
        return self._reason

    @property
    def requested_epoch(self) -> int:
        """The last checkpoint QEMU has requested (0: none yet)."""
        return self._requested

    @property
    def checkpoints_started(self) -> int:
        """VMSTATE_SENDs seen: checkpoints for which QEMU has stopped the VM."""
        return self._started

    @property
    def output_epoch(self) -> int | None:
        """The checkpoint covering an output read now; None when it need not be held.

        None before the initial sync ends (no replica exists, and epoch 0's state is taken
        after every output read before CHECKPOINT_READY) and once protection is over.
        While protection is being dropped (RELEASING) outputs are still tagged: whether
        they may leave depends on whether QEMU survives (UNPROTECTED) or not (FAILED).
        """
        if self._tagging and self._state in _TAGGING_STATES:
            return self._started + 1
        return None

    def add_listener(self, listener: SourceListener) -> None:
        """Call ``listener`` at every commit and when protection ends."""
        self._listeners.append(listener)

    @property
    def committed_epoch(self) -> int:
        """The last checkpoint the standby committed."""
        return self._committed

    @property
    def in_flight(self) -> int:
        """Checkpoints captured (queued to the standby) and not yet acknowledged."""
        return len(self._window)

    @property
    def sync(self) -> SyncRecord | None:
        """The initial sync's cost, once it is done."""
        return self._sync

    def recent(self) -> list[CheckpointRecord]:
        """The last :data:`RECENT_CHECKPOINTS` committed checkpoints, oldest first."""
        self._place_run_state_events()
        records = (capture.record() for capture in self._recent)
        return [record for record in records if record is not None]

    def sync_progress(self) -> dict[str, float] | None:
        """While the initial sync runs: stream bytes so far, guest RAM size and the rate.

        The stream carries each RAM page at least once (zero pages in a few bytes), so
        ``received_bytes / ram_bytes`` is an estimate of the progress, not an exact one.
        """
        if self._state is not SourceState.SYNCING or not self._started_at:
            return None
        elapsed = max(time.monotonic() - self._started_at, 1e-6)
        return {
            "received_bytes": self._received,
            "ram_bytes": self._ram_bytes,
            "elapsed_s": round(elapsed, 3),
            "rate_bytes_per_s": round(self._received / elapsed),
        }

    @property
    def in_checkpoint(self) -> bool:
        """A checkpoint has been requested and is not committed yet."""
        return self._requested > self._committed

    @property
    def capturing(self) -> bool:
        """A checkpoint has been requested and the guest has not resumed from it yet."""
        return self._requested > self._resumed

    async def wait_progress(self, timeout_s: float | None = None) -> None:
        """Return at the next state change, request or commit (or after ``timeout_s``)."""
        event = self._progress
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout_s)

    async def wait_committed(self, epoch: int) -> None:
        """Return once checkpoint ``epoch`` is committed; CheckpointError if protection ends."""
        while self._committed < epoch:
            if self._state not in (SourceState.SYNCING, SourceState.PROTECTED):
                raise CheckpointError(
                    f"checkpoint {epoch} will not be committed: source is {self._state.value}"
                    + (f" ({self._reason})" if self._reason else "")
                )
            await self._progress.wait()

    def _signal_progress(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    # -- life cycle --------------------------------------------------------------

    async def start(self) -> None:
        """Start the initial sync; it proceeds in the background (see :attr:`state`)."""
        if self._state is not SourceState.IDLE:
            raise CheckpointError(f"checkpoint source already started ({self._state.value})")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        try:
            machine = self.machine
            await machine.execute(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": "x-colo", "state": True}]},
            )
            await machine.execute(
                "migrate-set-parameters",
                {"x-checkpoint-delay": self.epoch_ms, "max-bandwidth": _MAX_BANDWIDTH},
            )
            await machine.pass_fd(FD_NAME, theirs.fileno())
            self._run_state_events = self._events_scope.enter_context(
                machine.subscribe(STOP_EVENT, RESUME_EVENT)
            )
            self._started_at = time.monotonic()
            await machine.execute("migrate", {"uri": f"fd:{FD_NAME}"})
        except BaseException:
            self._events_scope.close()
            ours.close()
            raise
        finally:
            # QEMU holds its own duplicate now (or never got one).
            theirs.close()
        self._sock = ours
        self._state = SourceState.SYNCING
        self._task = asyncio.create_task(self._run(ours), name="checkpoint-source")
        self._signal_progress()

    async def set_epoch(self, epoch_ms: int) -> None:
        """Change the checkpoint period; in COLO mode QEMU also checkpoints at once."""
        if not 0 < epoch_ms < 1 << 32:
            raise CheckpointError(f"checkpoint epoch {epoch_ms} ms is not a positive u32")
        await self.machine.execute("migrate-set-parameters", {"x-checkpoint-delay": epoch_ms})
        self.epoch_ms = epoch_ms

    async def close(self) -> None:
        """Stop protecting: the guest keeps running unprotected; the socket is closed."""
        task = self._task
        if task is not None and not task.done():
            if self._state is SourceState.RELEASING:
                # The task is already resuming the guest; let it finish that.
                await asyncio.shield(task)
            else:
                await cancel_and_wait(task)
        if self._state in (SourceState.SYNCING, SourceState.PROTECTED):
            await self._lose_protection("protection stopped by Kemari")
        self._close_socket()

    async def __aenter__(self) -> CheckpointSource:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._place_run_state_events()
        self._events_scope.close()

    def _place_run_state_events(self) -> None:
        """Put the QMP STOP/RESUME events that arrived so far on their checkpoints."""
        if self._run_state_events is None:
            return
        for event in self._run_state_events.take_pending():
            attach_run_state_event(self._timed, event.name, monotonic_of(event.timestamp))

    # -- the stream ----------------------------------------------------------------

    async def _run(self, sock: socket.socket) -> None:
        stream = asyncio.create_task(self._read_stream(sock), name="checkpoint-stream")
        acks = asyncio.create_task(self._await_acks(), name="checkpoint-acks")
        tasks = (stream, acks)
        try:
            # Both run until one fails (or both are cancelled with this task).
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
        # Both may have failed at once: retrieve every error, report the first.
        exc, *_ = (task.exception() for task in done)
        # Any failure of the sink (its code is not ours), of the stream or of the socket,
        # or a missing acknowledgement, means the standby cannot be trusted to follow.
        await self._lose_protection(f"{type(exc).__name__}: {exc}")

    async def _read_stream(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(sock, _RECV_BYTES)
            self._read_at = time.monotonic()
            if not data:
                raise CheckpointError("QEMU closed the migration stream")
            self._received += len(data)
            await self._dispatch(self._parser.feed(data), sock)
            marks = self._marks
            if marks is not None and marks.first_page is None and self._pages:
                marks.first_page = self._read_at

    async def _await_acks(self) -> None:
        """Await the standby's acknowledgements in epoch order; tell the listeners."""
        while True:
            progress = self._progress
            epoch = self._window.oldest
            if epoch is None or epoch > self._forwarded:
                await progress.wait()
                continue
            await self.sink.acknowledged(epoch)
            capture = self._window.acknowledge(epoch).ticket
            capture.acked_at = time.monotonic()
            self._committed = epoch
            for listener in self._listeners:
                listener.checkpoint_committed(epoch)
            self._record(capture)
            self._signal_progress()

    async def _dispatch(self, events: list[StreamEvent], sock: socket.socket) -> None:
        batch: list[RamPageRun] = []
        for event in events:
            if type(event) is RamPageRun:
                batch.append(event)
                continue
            if batch:
                await self._deliver_pages(batch)
                batch = []
            await self._handle(event, sock)
        if batch:
            await self._deliver_pages(batch)

    async def _deliver_pages(self, batch: list[RamPageRun]) -> None:
        self._pages += sum(run.page_count for run in batch)
        if self._state is SourceState.SYNCING:
            await self.sink.sync_pages(batch)
        else:
            self._held_pages.extend(batch)

    async def _handle(self, event: StreamEvent, sock: socket.socket) -> None:
        if isinstance(event, ColoEvent):
            await self._colo_event(event, sock)
        elif isinstance(event, DeviceState):
            if self._state is SourceState.SYNCING:
                self._initial_device_state = event.data
            else:
                await self._finish_checkpoint(event.data, sock)
        elif isinstance(event, Configuration):
            self._configuration = event
        elif isinstance(event, RamBlockList):
            if self._configuration is None:
                raise CheckpointError("RAM block list before the configuration section")
            self._ram_bytes = sum(block.used_length for block in event.blocks)
            await self.sink.begin_sync(self._configuration, event)
        elif isinstance(event, VmDescription):
            await self._finish_sync(event.json, sock)
        elif isinstance(event, LiveStateEnd) and self._marks is not None:
            self._marks.ram_end = self._read_at
        # Header, Command and SectionEnd need no action: the parser has validated them
        # and the sink learns what it needs from the others.

    async def _finish_sync(self, vmdesc: bytes, sock: socket.socket) -> None:
        if not self._parser.colo_enabled:
            raise CheckpointError("QEMU migrated without enabling COLO (x-colo refused?)")
        if self._initial_device_state is None:
            raise CheckpointError("initial sync ended without device state")
        await self.sink.end_sync(self._initial_device_state, vmdesc)
        self._initial_device_state = None
        # Ordering: tag outputs before READY is written; an output read after this line may
        # already come from the resumed guest.
        self._tagging = True
        # Ordering: READY only now, so the guest runs only once the standby holds epoch 0.
        await asyncio.get_running_loop().sock_sendall(sock, _READY)
        self._sync = SyncRecord(
            duration_s=time.monotonic() - self._started_at,
            pages=self._pages,
            stream_bytes=self._received,
            ram_bytes=self._ram_bytes,
        )
        self._pages = 0
        self._received_at_mark = self._received
        self._state = SourceState.PROTECTED
        self._signal_progress()

    async def _colo_event(self, event: ColoEvent, sock: socket.socket) -> None:
        message = event.message
        if message is ColoMessage.CHECKPOINT_REQUEST:
            if self._requested + 1 == crashpoint.limit(CRASH_BEFORE_REPLY):
                crashpoint.kill()  # test hook: die before answering the request
            self._requested += 1
            self._requested_at = time.monotonic()
            # Ordering: the listeners first (the network path drains QEMU's stream), then
            # the answer; QEMU stops the VM only after reading the REPLY.
            for listener in self._listeners:
                await listener.checkpoint_requested(self._requested)
            # Timeline marks are taken before the write: QEMU, on another core, may act on
            # the message before this task runs again (placing STOP/RESUME relies on it).
            self._marks = PauseMarks(reply=time.monotonic())
            self._timed.append(self._marks)
            await asyncio.get_running_loop().sock_sendall(sock, _REPLY)
            self._signal_progress()
        elif message is ColoMessage.VMSTATE_SEND:
            # Ordering: counted before any await, so outputs read from now on are tagged
            # with the next checkpoint (the VM is stopped for this one).
            self._started += 1
            self._stopped_at = time.monotonic()
            if self._marks is not None:
                self._marks.vmstate_send = self._read_at
        elif message is ColoMessage.VMSTATE_SIZE and self._marks is not None:
            # The parser reads the buffer it announces.
            self._marks.vmstate_size = self._read_at

    async def _finish_checkpoint(self, device_state: bytes, sock: socket.socket) -> None:
        epoch = self._requested
        transferred_at = time.monotonic()
        marks, self._marks = self._marks, None
        if marks is None:  # the parser yields a checkpoint's device state only after REQUEST
            raise CheckpointError(f"device state of checkpoint {epoch} without its request")
        marks.device_read = self._read_at
        marks.device_parsed = transferred_at
        if marks.first_page is None and self._pages:
            marks.first_page = self._read_at  # the pages came in this same read
        stream_bytes = self._received - self._received_at_mark
        capture = _Capture(
            epoch=epoch,
            stop_s=self._stopped_at - self._requested_at,
            transfer_s=transferred_at - self._stopped_at,
            pages=self._pages,
            stream_bytes=stream_bytes,
            device_bytes=len(device_state),
            stopped_at=self._stopped_at,
            marks=marks,
        )
        self._pages = 0
        self._received_at_mark = self._received
        # Captured: held in memory; it counts in the window from now on.
        marks.captured = time.monotonic()
        self._window.add(epoch, stream_bytes, capture)
        self._signal_progress()
        if self._window.resume_allowed:
            await self._resume(epoch, capture, sock)
            # Only now does the sink get N: framing and encrypting it overlap with the
            # guest running.  QEMU sends nothing more until Kemari answers its next REQUEST.
            await self._forward(epoch, capture, device_state)
        else:
            # The guest waits for acknowledgements anyway (N's own, with a window of 0):
            # forward N meanwhile.
            await self._forward(epoch, capture, device_state)
            await self._resume(epoch, capture, sock)

    async def _resume(self, epoch: int, capture: _Capture, sock: socket.socket) -> None:
        """Write LOADED once the window is within its bounds: QEMU resumes the guest."""
        held_from = time.monotonic()
        while not self._window.resume_allowed:
            await self._progress.wait()
        capture.marks.loaded = time.monotonic()
        capture.held_s = capture.marks.loaded - held_from
        await asyncio.get_running_loop().sock_sendall(sock, _RECEIVED_LOADED)
        capture.resumed_at = time.monotonic()
        self._resumed = epoch
        if self._window.holds(epoch) and _armed(CRASH_IN_FLIGHT, epoch):
            crashpoint.kill()  # test hook: the guest runs past N, N not acknowledged
        if len(self._window) >= 2 and _armed(CRASH_TWO_IN_FLIGHT, epoch):
            crashpoint.kill()  # test hook: N-1 and N both await their acknowledgement
        self._record(capture)
        # The guest is resuming: the QMP events of the last checkpoints go to their records
        # now (this also keeps their queue short when nobody reads the records).
        self._place_run_state_events()
        self._signal_progress()

    async def _forward(self, epoch: int, capture: _Capture, device_state: bytes) -> None:
        """Hand checkpoint N to the sink, which queues it to the standby; from then on the
        acknowledgement task awaits the standby's ack of it."""
        held, self._held_pages = self._held_pages, []
        await self.sink.begin(epoch)
        if held:
            await self.sink.pages(held)
        await self.sink.device_state(epoch, device_state)
        capture.commit_started_at = time.monotonic()
        await self.sink.commit(epoch)
        self._forwarded = epoch
        self._signal_progress()

    def _record(self, capture: _Capture) -> None:
        if capture.settled:
            self._recent.append(capture)

    # -- losing protection ----------------------------------------------------------

    async def _lose_protection(self, reason: str) -> None:
        """End COLO (or the initial sync) so QEMU resumes the guest; state UNPROTECTED."""
        self._reason = reason
        self._state = SourceState.RELEASING
        self._signal_progress()
        # Ordering: shut the stream down before any QMP command.  A QEMU blocked writing
        # a checkpoint to a socket nobody reads holds the BQL, so QMP would never answer;
        # the shutdown fails that write and lets QEMU go on to its failover path.
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
        try:
            await self._release_guest()
        except KemariError as exc:
            self._reason = f"{reason}; guest not resumed: {exc}"
            self._state = SourceState.FAILED
            log.error("protection lost: %s", self._reason)
        else:
            self._state = SourceState.UNPROTECTED
            log.warning("protection lost: %s; the guest runs unprotected", reason)
        finally:
            self._close_socket()
            self._signal_progress()
            for listener in self._listeners:
                listener.protection_ended(self._state)

    async def _release_guest(self) -> None:
        machine = self.machine
        deadline = time.monotonic() + _RELEASE_TIMEOUT_S
        heartbeat_lost = False
        while True:
            info = await machine.execute("query-migrate")
            status = info.get("status") if isinstance(info, dict) else None
            if status == "colo" and not heartbeat_lost:
                # QEMU stops the VM if needed, shuts the stream down, marks the migration
                # completed, and its migration thread then restarts the VM.
                with contextlib.suppress(QmpCommandError):
                    await machine.execute("x-colo-lost-heartbeat")
                    heartbeat_lost = True
            elif status in _PRECOPY_STATUSES:
                await machine.execute("migrate_cancel")
            elif status in _ENDED_STATUSES and (await machine.query_status()).running:
                return
            if time.monotonic() > deadline:
                raise CheckpointError(
                    f"QEMU did not resume the guest within {_RELEASE_TIMEOUT_S:g} s "
                    f"(migration status {status!r})"
                )
            await asyncio.sleep(_RELEASE_POLL_S)


def _armed(point: str, epoch: int) -> bool:
    """Is the test hook ``point`` armed for checkpoint ``epoch`` (or an earlier one)?"""
    limit = crashpoint.limit(point)
    return limit is not None and epoch >= limit
