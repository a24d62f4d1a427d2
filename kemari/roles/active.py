"""The active role: QEMU runs the guest here, and may be protected by a standby.

:class:`ActiveRole` owns the guest's QEMU, the protection session (``migrate``,
``checkpoint``, ``migrate_cancel``), the initial disk copies of replicated storage,
and through protection the release of held outputs (the event-tap).  It is made
either at start (:meth:`ActiveRole.start`, a fresh QEMU) or by a failover
(kemari.roles.failover: QEMU started from the standby's replica, whose files the
role then keeps until its QEMU is gone).

Cleanup is the role's own exit stack, in reverse order of acquisition: disk copies
and protection end first (the standby is told goodbye while the guest still runs),
then QEMU is stopped, then what a failover handed over (the standby's disks, the
applier, the replica directory that QEMU's RAM file lived in).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import sys
import time
from collections.abc import AsyncIterator, Sequence

from kemari.config import NicConfig, PageCompression, StorageMode, VMConfig
from kemari.errors import CheckpointError, ConfigError, KemariError, QemuError
from kemari.eventtap.diskcopy import DiskCopier
from kemari.eventtap.disktap import DiskTap
from kemari.eventtap.gate import EventTap
from kemari.monitor import api
from kemari.net.bridge import NetBridge
from kemari.qemu.binary import QemuBinary
from kemari.qemu.cmdline import MachineSpec, StreamNic
from kemari.qemu.machine import QemuMachine
from kemari.roles.protection import Protection
from kemari.transaction.session import KEEPALIVE_S, Identity, RunState
from kemari.transaction.wire import ZSTD_PAGES


@contextlib.asynccontextmanager
async def guest_links(
    spec: MachineSpec, bridges: Sequence[NetBridge], nics: Sequence[NicConfig]
) -> AsyncIterator[MachineSpec]:
    """``spec`` with one new guest link per NIC, its QEMU ends passed as descriptors.

    Start QEMU inside the block.  Leaving it closes the agent's copies of QEMU's ends,
    so from then on QEMU holds the only ones, and its exit (or a refused descriptor)
    detaches the bridge's link; a QEMU that never started detaches them at once.
    """
    qemu_ends: list[socket.socket] = []
    try:
        for bridge in bridges:
            qemu_ends.append(await bridge.plug_guest())
        links = tuple(
            StreamNic(mac=nic.mac, fd=end.fileno())
            for nic, end in zip(nics, qemu_ends, strict=True)
        )
        yield dataclasses.replace(spec, nics=links)
    finally:
        for end in qemu_ends:
            end.close()


def keepalive_interval(config: VMConfig) -> float:
    """Seconds without a frame after which the active sends a HEARTBEAT: with --ha a
    quarter of the standby's failure-detection timeout, else the session's default."""
    return KEEPALIVE_S if config.ha is None else config.ha.detect_s / 4


class ActiveRole:
    """The guest's QEMU and its protection, until :meth:`close`."""

    def __init__(
        self,
        config: VMConfig,
        machine: QemuMachine,
        *,
        binary: QemuBinary,
        event_tap: EventTap,
        disk_tap: DiskTap,
        stack: contextlib.AsyncExitStack,
        failover: api.FailoverInfo | None = None,
        run: RunState | None = None,
    ) -> None:
        """Use :meth:`start` or the failover order; ``stack`` already stops ``machine``.

        ``run``: the run this guest belongs to (the replica's after a failover); a fresh
        QEMU starts a new one.  Every protection session carries it, so a standby never
        lets an older session of the same run replace a newer replica.
        """
        self.config = config
        self.machine = machine
        self.binary = binary
        self.event_tap = event_tap
        self.disk_tap = disk_tap
        self.failover = failover
        self.run = RunState.new() if run is None else run
        self.protection: Protection | None = None
        self.disk_copies: list[DiskCopier] = []
        self._copy_tasks: list[asyncio.Task[None]] = []
        self._stack = stack
        # Runs before QEMU is stopped, so the standby is told goodbye while the guest runs.
        self._stack.push_async_callback(self._stop_protection)

    @classmethod
    async def start(
        cls,
        config: VMConfig,
        spec: MachineSpec,
        *,
        binary: QemuBinary,
        bridges: Sequence[NetBridge],
        event_tap: EventTap,
        disk_tap: DiskTap,
    ) -> ActiveRole:
        """Start a fresh QEMU for the guest (the disks' NBD servers already listen)."""
        async with contextlib.AsyncExitStack() as stack:
            async with guest_links(spec, bridges, config.nics) as linked:
                machine = QemuMachine(linked, binary.path)
                await stack.enter_async_context(machine)
            role = cls(
                config,
                machine,
                binary=binary,
                event_tap=event_tap,
                disk_tap=disk_tap,
                stack=stack.pop_all(),
            )
        return role

    async def close(self) -> None:
        """Protection ends, then QEMU stops, then what a failover handed over goes."""
        await self._stack.aclose()

    # -- commands --------------------------------------------------------------

    @property
    def protection_state(self) -> str:
        """``unprotected``, ``syncing``, ``copying-disks`` or ``protected`` (a sub-state of
        the active role).  ``protected`` means a failover now would succeed, so with
        replicated storage it waits for every disk's initial copy (docs/status.md)."""
        if self.protection is None or not self.protection.active:
            return "unprotected"
        state = self.protection.source.state.value
        if state == "protected" and not all(copier.done for copier in self.disk_copies):
            return "copying-disks"
        return state

    async def migrate(self, command: api.Migrate) -> api.MigrateStarted:
        """Start protecting the running guest with the standby at ``command.uri``."""
        if self.protection is not None and self.protection.active:
            raise ConfigError(
                f"VM {self.config.name} is already protected by {self.protection.peer}"
            )
        if not self.binary.checkpoint_safe:
            raise CheckpointError(
                f"refusing to protect VM {self.config.name}: {self.binary.path} cannot take "
                "checkpoints under TCG (stock QEMU deadlocks at the first one); run "
                "'kemari qemu build' (docs/qemu-patch.md)"
            )
        if self.protection is not None:  # a previous session ended (standby lost): tidy it
            await self.protection.close()
        compress = self.config.page_compression is PageCompression.ZSTD
        identity = Identity(
            self.config.name,
            self.config.replication_digest(),
            capabilities=(ZSTD_PAGES,) if compress else (),
        )
        self.protection = await Protection.start(
            self.machine,
            command.uri,
            identity,
            epoch_ms=self.config.qemu_epoch_ms,
            event_tap=self.event_tap,
            disk_tap=self.disk_tap,
            tls=self.config.tls_creds,
            run=self.run,
            keepalive_s=keepalive_interval(self.config),
            in_flight=self.config.checkpoints_in_flight,
        )
        if self.config.storage is StorageMode.REPLICATED:
            self._start_disk_copies(self.protection)
        _say(f"protection of VM {self.config.name} started: initial sync to {command.uri}")
        return api.MigrateStarted(peer=self.protection.peer)

    async def checkpoint(self) -> api.CheckpointDone:
        """Take one checkpoint now; returns when the standby committed it."""
        if self.protection is None or not self.protection.active:
            raise ConfigError(f"VM {self.config.name} is not protected")
        started = time.monotonic()
        epoch = await self.protection.trigger.checkpoint()
        return api.CheckpointDone(epoch=epoch, ms=round((time.monotonic() - started) * 1000, 2))

    async def migrate_cancel(self) -> api.ProtectionStopped:
        """Stop protecting; the guest keeps running."""
        if self.protection is None:
            raise ConfigError(f"VM {self.config.name} is not protected")
        protection, self.protection = self.protection, None
        await protection.close()
        return api.ProtectionStopped()

    def _start_disk_copies(self, protection: Protection) -> None:
        """Replicated storage: copy every writable disk to the standby while the guest runs."""
        for task in self._copy_tasks:
            task.cancel()
        self._copy_tasks.clear()
        self.disk_copies = [
            DiskCopier(
                overlay,
                wait_committed=protection.source.wait_committed,
                request_checkpoint=protection.trigger.request_checkpoint,
            )
            for overlay in self.disk_tap.overlays
        ]
        for copier in self.disk_copies:
            self._copy_tasks.append(asyncio.create_task(_copy_disk(copier)))

    async def _stop_protection(self) -> None:
        for task in self._copy_tasks:
            task.cancel()
        self._copy_tasks.clear()
        if self.protection is not None:
            protection, self.protection = self.protection, None
            await protection.close()

    # -- running -----------------------------------------------------------------

    async def wait_for_end(self, stop: asyncio.Event, bridges: Sequence[NetBridge]) -> int:
        """Wait for QEMU to exit, ``stop``, or a failed NIC path; returns the exit status.

        A failed NIC path (its tap vanished, say) stops the VM: a guest cut off
        from its network must not keep running as if nothing happened.
        """
        machine = self.machine
        exited = asyncio.create_task(machine.wait())
        watchers: list[asyncio.Task[object]] = [
            asyncio.create_task(stop.wait()),
            *(asyncio.create_task(bridge.wait_stopped()) for bridge in bridges),
        ]
        try:
            await asyncio.wait({exited, *watchers}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for watcher in watchers:
                watcher.cancel()
        failed = [bridge.failure for bridge in bridges if bridge.failure is not None]
        if not exited.done():
            _say(f"stopping VM {self.config.name}")
            await machine.shutdown()
            exited.cancel()
            if failed:
                raise failed[0]
            return 0
        end = exited.result()
        if end.clean:
            _say(f"VM {self.config.name} shut down")
            return 0
        raise QemuError(f"QEMU ended unexpectedly: {end.describe()}")

    # -- status ------------------------------------------------------------------

    def replication_status(self) -> api.ReplicationStatus | None:
        """The protection session's status (None: never protected since this role began)."""
        if self.protection is None:
            return None
        return api.from_plain(api.ReplicationStatus, self.protection.status())

    def disk_copy_status(self) -> list[api.DiskCopyStatus]:
        """Replicated storage: the initial copy of each disk to the standby."""
        return [
            api.from_plain(api.DiskCopyStatus, {**copier.progress().as_dict(), "done": copier.done})
            for copier in self.disk_copies
        ]


async def _copy_disk(copier: DiskCopier) -> None:
    try:
        await copier.run()
    except KemariError as exc:  # protection ended: the next session copies again
        _say(f"disk {copier.overlay.disk} copy stopped: {exc}")
    else:
        _say(f"disk {copier.overlay.disk} copied to the standby")


def _say(message: str) -> None:
    print(f"kemari: {message}", file=sys.stderr, flush=True)
