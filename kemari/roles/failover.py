"""Failover: the standby role hands its state to a new active role.  The whole order.

:func:`promote` runs these steps, in this order, each a function below; a step runs
only when every earlier one succeeded:

1. :func:`refuse_without_replica`: no committed replica (the initial sync has not
   completed), or replicated images without the initial disk copy, refuses the
   failover before anything changes.
2. :func:`stop_receiving`: the standby's receiver stops, so no checkpoint lands while
   QEMU maps the replica (the primary's open transaction, if any, is discarded).
3. :func:`replay_held_outputs`: the held network frames of the committed epoch go out
   again through this host's bridges, *before* the guest resumes: the dead primary
   may not have released them (duplicates are harmless, losses are not).
4. :func:`roll_disks_forward`: the standby's images are brought to the committed
   epoch (shared storage: the kept writes of that epoch applied; replicated: the
   background flushes finished) and closed; refused if an image cannot be trusted.
5. :func:`open_guest_disks`: the agent opens the images and starts their NBD servers
   (with the disk event-tap), so the failover QEMU finds them at start-up.
6. :func:`hand_over_replica`: the replica is checked against this host's VM spec and
   handed over: open checkpoint discarded, pending apply done, device state and
   non-shared pages copied, replica marked handed-over (kemari.failover).
7. :func:`start_qemu_from_replica`: QEMU starts paused with the replica's RAM file as
   its main RAM, gets one new stream link per NIC, and loads the synthesized stream
   (x-ignore-shared on); the guest does not run yet (kemari.failover.load_replica).
8. :func:`resume_guest`: ``cont``, the guest runs from the committed epoch; then
   x-ignore-shared off again, since this QEMU is the primary now
   (kemari.failover.resume_guest); then :func:`reclaim_replica_space` removes the
   replica folder's generations no live process holds.
9. :func:`become_active`: the new :class:`~kemari.roles.active.ActiveRole` owns the
   QEMU and takes over the standby's cleanup (disks, applier, replica directory),
   which runs after its QEMU is gone.

A failure in steps 6-8 shuts the failover QEMU down again; the replica is never
written.  The agent records the role states around it (standby → promoting → active,
or → failed) and runs :func:`promote` in its own task, not in a monitor handler.

This order lives in kemari.roles, not kemari.failover: it turns a
:class:`~kemari.roles.standby.StandbyRole` into an :class:`~kemari.roles.active.ActiveRole`
and uses the agent's bridges and disks, all in kemari.roles, which the layer contract
puts above kemari.failover (kemari.failover keeps "QEMU from the replica").
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from kemari.config import VMConfig
from kemari.errors import FailoverError
from kemari.eventtap.gate import EventTap
from kemari.eventtap.net import replay_frames
from kemari.failover import failover as qemu_failover
from kemari.failover.failover import FailoverResult, LoadedMachine
from kemari.monitor import api
from kemari.net.bridge import NetBridge
from kemari.qemu.binary import QemuBinary
from kemari.qemu.cmdline import MachineSpec
from kemari.replica.applier import FailoverImage
from kemari.roles.active import ActiveRole, guest_links
from kemari.roles.guestdisks import GuestDisks
from kemari.roles.standby import StandbyRole
from kemari.transaction.session import RunState

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Host:
    """What the agent lends a failover: this host's NIC bridges, event-tap and disks."""

    config: VMConfig
    spec: MachineSpec
    binary: QemuBinary
    bridges: Sequence[NetBridge]
    event_tap: EventTap
    open_disks: Callable[[], Awaitable[GuestDisks]]  # the agent owns (and closes) them


@dataclasses.dataclass(frozen=True)
class Promoted:
    """The new active role and what the failover did."""

    role: ActiveRole
    reply: api.FailedOver


async def promote(standby: StandbyRole, host: Host) -> Promoted:
    """Fail over: steps 1-9 of the module docstring, in order."""
    refuse_without_replica(standby)
    await stop_receiving(standby)
    replayed = replay_held_outputs(standby, host.bridges)
    await roll_disks_forward(standby)
    disks = await open_guest_disks(host)
    started = time.monotonic()
    image = hand_over_replica(standby, host.spec)
    handed_over = time.monotonic()
    loaded = await start_qemu_from_replica(image, host)
    result = await resume_guest(loaded)
    reclaim_replica_space(standby)
    result = qemu_failover.with_hand_over_time(result, handed_over - started)
    info = api.FailoverInfo(
        epoch=result.epoch,
        total_ms=round(result.timings.total_s * 1000, 1),
        replayed_frames=replayed,
    )
    role = become_active(standby, host, disks, result, info)
    reply = api.FailedOver(
        name=host.config.name,
        epoch=info.epoch,
        total_ms=info.total_ms,
        replayed_frames=replayed,
    )
    return Promoted(role, reply)


def refuse_without_replica(standby: StandbyRole) -> None:
    """1. FailoverError unless the replica holds a committed epoch and, with replicated
    storage, the standby's images hold the initial disk copy.

    The agent also calls this before it enters ``promoting``, so a refused failover
    changes nothing: the standby keeps receiving.
    """
    if standby.applier.committed_epoch is None:
        raise FailoverError(
            "refusing to fail over: no committed replica (the initial sync has not "
            "completed, so there is no state to resume the guest from)"
        )
    if not standby.disks.synced:
        raise FailoverError(
            "refusing to fail over: the initial disk copy to this standby has not "
            "completed (its image does not match the guest yet)"
        )
    problem = standby.disks.check_images()
    if problem is not None:
        raise FailoverError(f"refusing to fail over: {problem}")


async def stop_receiving(standby: StandbyRole) -> None:
    """2. No checkpoint may land while QEMU maps the replica."""
    await standby.stop_receiving()


def replay_held_outputs(standby: StandbyRole, bridges: Sequence[NetBridge]) -> int:
    """3. The committed epoch's held frames sent again; returns how many."""
    return replay_frames(standby.receiver.committed_outputs(), bridges)


async def roll_disks_forward(standby: StandbyRole) -> None:
    """4. The standby's images at the committed epoch, closed (docs/storage.md)."""
    await standby.disks.fail_over()


async def open_guest_disks(host: Host) -> GuestDisks:
    """5. NBD servers on the images, listening before QEMU starts."""
    return await host.open_disks()


def hand_over_replica(standby: StandbyRole, spec: MachineSpec) -> FailoverImage:
    """6. The replica checked against ``spec`` and handed over."""
    return qemu_failover.hand_over_replica(standby.applier, spec)


async def start_qemu_from_replica(image: FailoverImage, host: Host) -> LoadedMachine:
    """7. QEMU paused on the replica, new links to this host's bridges, stream loaded."""
    # The standby's bridges had no guest; the failover QEMU gets new links to them.
    async with guest_links(host.spec, host.bridges, host.config.nics) as linked:
        return await qemu_failover.load_replica(image, linked, host.binary.path)


async def resume_guest(loaded: LoadedMachine) -> FailoverResult:
    """8. The guest runs from the committed epoch."""
    return await qemu_failover.resume_guest(loaded)


def reclaim_replica_space(standby: StandbyRole) -> None:
    """8b. Generations in the replica folder that no live process holds go (a killed
    agent's failover QEMU left its RAM there); this QEMU's generation is held."""
    removed = standby.applier.reclaim()
    if removed:
        log.info(
            "replica folder %s: removed %s (no live process held them)",
            standby.applier.root,
            ", ".join(removed),
        )


def become_active(
    standby: StandbyRole,
    host: Host,
    disks: GuestDisks,
    result: FailoverResult,
    info: api.FailoverInfo,
) -> ActiveRole:
    """9. The active role owns the QEMU, then the standby's cleanup (run after it)."""
    replica_run = standby.receiver.replica_run  # the guest's run carries on here
    stack = contextlib.AsyncExitStack()
    stack.push_async_exit(standby.hand_over_resources())
    stack.push_async_callback(result.machine.shutdown)
    return ActiveRole(
        host.config,
        result.machine,
        binary=host.binary,
        event_tap=host.event_tap,
        disk_tap=disks.tap,
        stack=stack,
        failover=info,
        run=None if replica_run is None else RunState(replica_run.run_id, replica_run.committed),
    )
