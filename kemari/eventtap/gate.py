"""The event-tap of one VM: every guest output passes here and leaves only when it is safe.

:class:`EventTap` sits between the guest's output paths (one per NIC, one per disk) and
the outside world.  Each path calls :meth:`EventTap.submit` with an
:class:`~kemari.eventtap.outputs.Output`; the tap either lets it go at once (False) or
holds it in its :class:`~kemari.eventtap.outputs.OutputLog` (True), tagged with the
checkpoint that will cover it (``CheckpointSource.output_epoch``).  It listens to the
source and releases, through each device's release function and in arrival order,
every output whose checkpoint the standby committed.

Rules (docs/protocol.md, "Event-tap"):

* Not protected (no source, initial sync running, protection over): outputs flow at
  once, after everything still held (a newer output never overtakes an older one).
* Protected: outputs are held until their tag is committed; the ``event`` sync policies
  request a checkpoint for the first output that no in-flight checkpoint covers.
* Protection ends UNPROTECTED (standby lost, stopped): the guest runs on alone, so all
  held outputs are released.  It ends FAILED (QEMU gone): the held outputs' checkpoint
  never committed, a standby would resume from before them, so they are discarded.
* Release permit (automatic failover, docs/ha.md rule 2): with a
  :class:`ReleasePermit`, every release asks it first; what it refuses stays held (in
  order) until :meth:`EventTap.release_permitted` (the arbiter confirmed this agent) or
  :meth:`EventTap.fence` (another agent is active: discarded, nothing leaves again).
  Without a permit (manual failover) the rules above are the whole story.
* Memory is bounded by the log's bounds: when full, every device that can pause
  stops producing (the network path stops reading QEMU), and resumes when the log has
  drained to half.  Nothing is dropped to make room.  Except from a checkpoint's
  request until the guest resumed from it (the source is *capturing*): QEMU drops the
  frames it cannot hand over when it stops the VM, so the producers run and drain before
  Kemari answers the request; the log may grow by what they had queued (QEMU's stream
  socket) and what the guest sends until the stop.  The next output held or commit
  pauses them again if the log is still full.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

from kemari import crashpoint
from kemari.checkpoint.source import CheckpointSource, SourceState
from kemari.checkpoint.trigger import CheckpointTrigger
from kemari.config import SyncPolicy
from kemari.errors import EventTapError
from kemari.eventtap.outputs import OutputLog
from kemari.outputs import Output, OutputKind

Release = Callable[[Output], None]
# The tag of outputs held while no protection session tags them (the permit refused
# pass-through): above every real epoch, so only release_all() or discard_all() ends them.
WITHHELD_EPOCH = 2**62


class ReleasePermit(Protocol):
    """Asked before any held or new output leaves (docs/ha.md, rule 2)."""

    def may_release(self, committed: bool) -> bool:
        """``committed``: outputs whose checkpoint the standby just acknowledged (case a
        or b); otherwise outputs of an unprotected guest (case b only)."""


# crashpoint (KEMARI_REPLICA_TEST_CRASH=output-release=N): SIGKILL at the N-th commit
# that has outputs to release, after COMMIT_ACK and before any of them left.
CRASH_BEFORE_RELEASE = "output-release"
CRASH_DURING_RELEASE = "during-release"


class Producer(Protocol):
    """An output path that can stop producing while the log is full."""

    def pause(self) -> None:
        """Stop taking outputs from the guest."""

    def resume(self) -> None:
        """Take outputs from the guest again."""

    async def drain(self) -> None:
        """Take what the guest already produced (not paused; the VM stops next)."""


@dataclasses.dataclass
class TapCounters:
    """What the tap did besides holding and releasing (those are the log's stats)."""

    passed: int = 0  # outputs that left at once (not protected)
    checkpoint_requests: int = 0  # event policy: outputs that asked for a checkpoint
    pauses: int = 0  # times the producers were paused (log full)


class EventTap:
    """Holds one VM's outputs until their checkpoint commits (see the module docstring)."""

    def __init__(
        self, policy: SyncPolicy, log: OutputLog | None = None, permit: ReleasePermit | None = None
    ) -> None:
        self.policy = policy
        self.permit = permit
        self.fenced = False  # fence(): nothing leaves any more
        self.withheld = 0  # releases the permit refused
        self.log = OutputLog() if log is None else log
        self.counters = TapCounters()
        self._releases: dict[tuple[OutputKind, int], Release] = {}
        self._producers: list[Producer] = []
        self._source: CheckpointSource | None = None
        self._trigger: CheckpointTrigger | None = None
        self._paused = False
        self._commits_with_outputs = 0
        self._commits_with_several_outputs = 0

    def add_device(
        self, kind: OutputKind, device: int, release: Release, producer: Producer | None = None
    ) -> None:
        """Register how outputs of ``kind`` on ``device`` leave (``release`` must not raise)."""
        key = (kind, device)
        if key in self._releases:
            raise EventTapError(f"{kind.name.lower()} device {device} is registered twice")
        self._releases[key] = release
        if producer is not None:
            self._producers.append(producer)

    # -- protection ----------------------------------------------------------------

    @property
    def holding(self) -> bool:
        """True while outputs are held (protected, initial sync done)."""
        return self._source is not None and self._source.output_epoch is not None

    def attach(self, source: CheckpointSource, trigger: CheckpointTrigger) -> None:
        """Follow ``source`` (call before it starts, so no output escapes its tagging)."""
        if self._source is not None:
            raise EventTapError("the event-tap already follows a protection session")
        # Whatever the last session held has been released or discarded when it ended.
        self.log.restart_epochs()
        self._source, self._trigger = source, trigger
        source.add_listener(self)

    async def checkpoint_requested(self, epoch: int) -> None:
        """SourceListener: QEMU stops the VM for ``epoch`` once this returns: producers
        run until the commit, and have drained what they had queued (see module docstring)."""
        del epoch
        if self._paused:
            self._paused = False
            for producer in self._producers:
                producer.resume()
        for producer in self._producers:
            await producer.drain()

    def checkpoint_committed(self, epoch: int) -> None:
        """SourceListener: the standby holds ``epoch``; its outputs and older ones leave."""
        if not self._permitted(committed=True):
            self._pause_if_full()
            return  # they stay held: a later permitted commit or release_permitted() frees them
        outputs = self.log.release(epoch)
        if outputs:
            self._commits_with_outputs += 1
            # Test hook: die like kill -9 between COMMIT_ACK and the release (the standby
            # must replay these outputs at failover).
            if self._commits_with_outputs == crashpoint.limit(CRASH_BEFORE_RELEASE):
                crashpoint.kill()
        if len(outputs) >= 2:
            self._commits_with_several_outputs += 1
            # Test hook: die after the first output of a commit left, the rest not.
            if self._commits_with_several_outputs == crashpoint.limit(CRASH_DURING_RELEASE):
                self._send(outputs[:1])
                crashpoint.kill()
        self._send(outputs)
        self._pause_if_full()

    def protection_ended(self, state: SourceState) -> None:
        """SourceListener: release everything (guest runs on) or discard it (guest died)."""
        self._source = self._trigger = None
        if state is SourceState.UNPROTECTED:
            if self._permitted(committed=False):
                self._send(self.log.release_all())
        else:
            self.log.discard_all()
            self._resume_if_drained()

    def outputs_of(self, epoch: int) -> list[Output]:
        """The held outputs of ``epoch`` (the transaction sender ships them before COMMIT)."""
        return self.log.outputs_of(epoch)

    # -- outputs -------------------------------------------------------------------

    def submit(self, output: Output) -> bool:
        """Take a guest output: True if held (released later), False if it may leave now."""
        source = self._source
        epoch = None if source is None else source.output_epoch
        if source is None or epoch is None:
            if self.fenced:
                return True  # swallowed: a fenced agent releases nothing
            if not self._permitted(committed=False):
                self.log.hold(output, WITHHELD_EPOCH)
                self._pause_if_full()
                return True
            if len(self.log):
                # Ordering: what is still held leaves before this newer output.
                self._send(self.log.release_all())
            self.counters.passed += 1
            return False
        self.log.hold(output, epoch)
        # Event queuing: an output the in-flight checkpoint covers needs no request, and
        # the trigger coalesces requests made while one is in flight into one.
        trigger = self._trigger
        if self.policy.on_output and trigger is not None and epoch > source.requested_epoch:
            trigger.request_checkpoint()
            self.counters.checkpoint_requests += 1
        self._pause_if_full()
        return True

    # -- release permit ----------------------------------------------------------

    def _permitted(self, committed: bool) -> bool:
        if self.fenced:
            return False
        if self.permit is None or self.permit.may_release(committed):
            return True
        self.withheld += 1
        return False

    def release_permitted(self) -> int:
        """The permit now allows case (b) (e.g. ``drop_standby`` won): what is held and
        not under a session's tags leaves, in order.  Returns how many left."""
        if self._source is not None or not self._permitted(committed=False):
            return 0
        outputs = self.log.release_all()
        self._send(outputs)
        return len(outputs)

    def fence(self) -> int:
        """Another agent is active: discard everything held, release nothing ever again.
        Returns how many outputs were discarded."""
        self.fenced = True
        discarded = self.log.discard_all()
        self._resume_if_drained()
        return discarded

    def _pause_if_full(self) -> None:
        capturing = self._source is not None and self._source.capturing
        if self.log.full and not self._paused and not capturing:
            self._paused = True
            self.counters.pauses += 1
            for producer in self._producers:
                producer.pause()

    def _send(self, outputs: list[Output]) -> None:
        for output in outputs:
            self._releases[(output.kind, output.device)](output)
        self._resume_if_drained()

    def _resume_if_drained(self) -> None:
        if self._paused and self.log.drained:
            self._paused = False
            for producer in self._producers:
                producer.resume()

    def status(self) -> dict[str, Any]:
        """Plain-data status for ``info status``."""
        stats = dataclasses.asdict(self.log.stats())
        mode = "holding" if self.holding else "pass-through (unprotected)"
        return {
            "sync": self.policy.value,
            "mode": mode,
            "max_bytes": self.log.max_bytes,
            "max_count": self.log.max_count,
            "paused": self._paused,
            **stats,
            **dataclasses.asdict(self.counters),
        }
