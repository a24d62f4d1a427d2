"""Protection of a running VM: the active host's side, from ``migrate -d kemari:tcp:...``.

:class:`Protection` connects to the standby, shakes hands (the standby refuses a VM
whose guest-visible configuration differs), and then runs the
:class:`~kemari.checkpoint.source.CheckpointSource` with a
:class:`~kemari.checkpoint.sender.TransactionSender` as its sink and a
:class:`~kemari.checkpoint.trigger.CheckpointTrigger` for on-demand checkpoints.

With an :class:`~kemari.eventtap.gate.EventTap`, the tap follows the source from before
the stream starts (so every output is tagged) and the sender ships the held outputs of
each checkpoint inside its transaction.

Ordering: the handshake completes before QEMU is told to migrate, so a refused or
unreachable standby never touches the running guest.  When the standby is lost
later, the source drops COLO mode (``x-colo-lost-heartbeat``) and the guest keeps
running: the protection ends UNPROTECTED and may be started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

from kemari.checkpoint.inflight import MAX_IN_FLIGHT_BYTES
from kemari.checkpoint.sender import TransactionSender
from kemari.checkpoint.source import CheckpointSource, SourceState
from kemari.checkpoint.trigger import CheckpointTrigger
from kemari.config import DEFAULT_CHECKPOINTS_IN_FLIGHT, TlsCreds
from kemari.errors import TransactionError
from kemari.eventtap.disktap import DiskTap
from kemari.eventtap.gate import EventTap
from kemari.outputs import Output
from kemari.qemu.machine import QemuMachine
from kemari.transaction.session import KEEPALIVE_S, Identity, PrimarySession, RunState
from kemari.transaction.transport import connect

HANDSHAKE_TIMEOUT_S = 10.0
log = logging.getLogger(__name__)
# The run of each VM this process protects when the caller passes none: chosen at the
# first protection, kept for later sessions, so a reconnecting primary continues its run.
_RUNS: dict[str, RunState] = {}


def run_of(vm_name: str) -> RunState:
    """This process's run of ``vm_name`` (a fresh one the first time)."""
    return _RUNS.setdefault(vm_name, RunState.new())


class Protection:
    """One protection session of one VM (active side)."""

    def __init__(
        self,
        source: CheckpointSource,
        trigger: CheckpointTrigger,
        peer: str,
        *,
        tls: bool = False,
        run: RunState | None = None,
    ) -> None:
        self.source = source
        self.trigger = trigger
        self.peer = peer
        self.tls = tls
        self.run = run
        self.started_at = time.monotonic()

    @classmethod
    async def start(
        cls,
        machine: QemuMachine,
        uri: str,
        identity: Identity,
        epoch_ms: int,
        event_tap: EventTap | None = None,
        *,
        disk_tap: DiskTap | None = None,
        tls: TlsCreds | None = None,
        run: RunState | None = None,
        keepalive_s: float = KEEPALIVE_S,
        in_flight: int = DEFAULT_CHECKPOINTS_IN_FLIGHT,
    ) -> Protection:
        """Connect to the standby at ``uri`` and start the initial sync in the background.

        ``tls``: the VM's ``tls_creds``; without it the channel is plain TCP (logged as a
        warning, ``tls: false`` in the status).  ``run``: the VM's run (kept across
        sessions and failovers); None uses this process's run of the VM.
        """
        run = run if run is not None else run_of(identity.vm_name)
        if tls is None:
            log.warning(
                "protection of VM %s: replication channel to %s is plain TCP (no "
                "tls_creds): not authenticated, not encrypted",
                identity.vm_name,
                uri,
            )
        transport = await connect(uri, HANDSHAKE_TIMEOUT_S, tls=tls)
        try:
            session = await PrimarySession.handshake(
                transport, identity, HANDSHAKE_TIMEOUT_S, run=run
            )
        except BaseException:
            await transport.close()
            raise
        # Checkpoints in flight are queued here while the guest runs: below the window's
        # byte bound (plus one more checkpoint being captured) a capture never waits for
        # the network (docs/protocol.md, "Pipelined checkpoints").
        transport.set_write_buffer_limit(2 * MAX_IN_FLIGHT_BYTES)
        # A HEARTBEAT whenever nothing was sent for keepalive_s (with --ha a quarter of
        # the standby's failure-detection timeout, so an idle guest never looks lost).
        session.start_keepalive(keepalive_s)
        outputs_of = _outputs_of(event_tap, disk_tap)
        sender = TransactionSender(session, outputs_of=outputs_of)
        source = CheckpointSource(machine, sender, epoch_ms=epoch_ms, in_flight=in_flight)
        # Protection over: end the session too (its keepalive would hold the standby).
        source.add_listener(_SessionCloser(source, session))
        trigger = CheckpointTrigger(source)
        if event_tap is not None:
            event_tap.attach(source, trigger)
        if disk_tap is not None:
            await disk_tap.attach(source, trigger)
        try:
            await source.start()
        except BaseException:
            if event_tap is not None:
                # Nothing was tagged yet (the stream never started): let go of the source.
                event_tap.protection_ended(SourceState.UNPROTECTED)
            if disk_tap is not None:
                disk_tap.protection_ended(SourceState.UNPROTECTED)
            await session.close("could not start the migration stream")
            raise
        await trigger.start()
        return cls(source, trigger, transport.peer, tls=transport.tls, run=run)

    @property
    def active(self) -> bool:
        """True while syncing or protected (the guest's state is flowing to the standby)."""
        return self.source.state in (SourceState.SYNCING, SourceState.PROTECTED)

    async def close(self) -> None:
        """Stop protecting: the guest keeps running unprotected; the standby is told goodbye."""
        await self.trigger.close()
        await self.source.close()
        sender = self.source.sink
        if isinstance(sender, TransactionSender):
            with contextlib.suppress(TransactionError):
                await sender.session.close("protection stopped")

    def status(self) -> dict[str, Any]:
        """Plain-data status for ``info status``."""
        source = self.source
        recent = source.recent()
        pauses = sorted(record.pause_s * 1000 for record in recent)

        def p50_ms(values: list[float]) -> float | None:
            return round(statistics.median(values) * 1000, 3) if values else None

        sync = source.sync
        last_age = time.monotonic() - recent[-1].committed_at if recent else None
        return {
            "state": source.state.value,
            "reason": source.reason,
            "peer": self.peer,
            "tls": self.tls,
            "run": None if self.run is None else self.run.run_id.hex(),
            "run_epoch": None if self.run is None else self.run.committed,
            "epoch": source.committed_epoch,
            "in_flight": source.in_flight,
            "epoch_ms": source.epoch_ms,
            "last_checkpoint_age_s": None if last_age is None else round(last_age, 3),
            "initial_sync": None
            if sync is None
            else {
                "duration_s": round(sync.duration_s, 3),
                "ram_bytes": sync.ram_bytes,
                "stream_bytes": sync.stream_bytes,
            },
            "sync_progress": source.sync_progress(),
            "recent": {
                "count": len(recent),
                "pause_ms_p50": round(statistics.median(pauses), 3) if pauses else None,
                "pause_ms_max": round(pauses[-1], 3) if pauses else None,
                # Where a checkpoint's time goes (docs/checkpoint.md, "Where the time goes"):
                # asking QEMU, QEMU stopping the VM, RAM and devices queued to the standby,
                # and the commit round trip (overlapping the next epoch).
                "kick_ms_p50": self.trigger.kick_latency_ms_p50(),
                "stop_ms_p50": p50_ms([record.stop_s for record in recent]),
                "transfer_ms_p50": p50_ms([record.transfer_s for record in recent]),
                "commit_ms_p50": p50_ms([record.commit_s for record in recent]),
                "device_bytes_last": recent[-1].device_bytes if recent else None,
                "bytes_last": recent[-1].stream_bytes if recent else None,
                "pages_last": recent[-1].pages if recent else None,
            },
        }


class _SessionCloser:
    """Source listener: says GOODBYE to the standby once protection ended."""

    def __init__(self, source: CheckpointSource, session: PrimarySession) -> None:
        self.source = source
        self.session = session
        self.task: asyncio.Task[None] | None = None

    async def checkpoint_requested(self, epoch: int) -> None:
        del epoch

    def checkpoint_committed(self, epoch: int) -> None:
        del epoch

    def protection_ended(self, state: SourceState) -> None:
        del state
        if self.task is None:
            reason = f"protection ended: {self.source.reason}"
            self.task = asyncio.create_task(self.session.close(reason[:1000]))


def _outputs_of(
    event_tap: EventTap | None, disk_tap: DiskTap | None
) -> Callable[[int], list[Output]] | None:
    """What the sender ships in transaction N: network outputs, then disk records (only
    the order within each device matters)."""
    if disk_tap is None:
        return None if event_tap is None else event_tap.outputs_of
    disks = disk_tap
    if event_tap is None:
        return disks.outputs_of
    network = event_tap
    return lambda epoch: [*network.outputs_of(epoch), *disks.outputs_of(epoch)]
