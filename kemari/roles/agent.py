"""The Kemari agent: one process per VM per host that owns the VM's QEMU and its I/O paths.

Start order (each step needs the previous ones):

1. lock the runtime directory, so two agents never drive one VM;
2. start the network bridges (their taps), so each QEMU launch gets a new
   stream socketpair per NIC, and the NBD servers, so QEMU finds its disk
   sockets listening when it connects at start-up;
3. start the monitor, so an operator can talk to the agent;
4. start QEMU and wait until QMP answers.

Teardown runs in exactly the reverse order, on every exit path (guest
shutdown, ``quit``, SIGTERM/SIGINT, a QEMU that dies): QEMU is stopped before
the servers it talks to, and every socket, tap and child is gone afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import fcntl
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, TextIO

from kemari.config import StorageMode, VMConfig
from kemari.errors import ConfigError, FailoverError, KemariError, NetError, QemuError
from kemari.eventtap.disk import OverlayBackend
from kemari.eventtap.diskcopy import DiskCopier
from kemari.eventtap.disktap import DiskTap
from kemari.eventtap.gate import EventTap
from kemari.eventtap.net import NetOutputs, replay_frames
from kemari.eventtap.outputs import OutputLog
from kemari.failover.failover import FailoverResult, fail_over
from kemari.image.builder import default_image
from kemari.monitor.protocol import Reply
from kemari.monitor.server import MonitorServer
from kemari.nbd.backend import RawFileBackend
from kemari.nbd.server import NbdServer
from kemari.net.bridge import NetBridge
from kemari.qemu.accel import choose_accel
from kemari.qemu.binary import qemu_binary
from kemari.qemu.cmdline import MachineSpec, NbdDisk, StreamNic
from kemari.qemu.machine import QemuMachine
from kemari.replica.applier import ReplicaApplier
from kemari.replica.disks import StandbyDisks
from kemari.replica.receiver import StandbyReceiver
from kemari.roles.protection import Protection
from kemari.transaction.session import Identity

NBD_EXPORT = "disk"


class AgentState(enum.Enum):
    """Life cycle of the agent itself (QEMU's own run state is reported separately)."""

    STARTING = "starting"
    STANDBY = "standby"  # keeping the replica, no QEMU
    FAILING_OVER = "failing-over"
    STANDBY_FAILED = "failover-failed"  # the failover QEMU did not start; see the error
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Agent:
    """Runs one VM until it shuts down, is told to quit, or its QEMU dies."""

    def __init__(self, config: VMConfig, console: TextIO | None = None) -> None:
        self.config = config
        self.console = console
        self.state = AgentState.STARTING
        self.runtime_dir = config.resolved_runtime_dir()
        self.monitor = MonitorServer(config.resolved_monitor())
        self.nbd_servers: list[NbdServer] = []
        self.bridges: list[NetBridge] = []
        # Every guest frame passes the event-tap; it holds them while protected.
        self.event_tap = EventTap(
            config.sync, OutputLog(config.held_frames_max_bytes, config.held_frames_max_count)
        )
        # Guest disk writes are held in overlays while protected (docs/storage.md).
        self.disk_tap: DiskTap | None = None
        self.disk_copies: list[DiskCopier] = []  # replicated storage: initial disk copies
        self._copy_tasks: list[asyncio.Task[None]] = []
        self.standby_disks: StandbyDisks | None = None
        self.machine: QemuMachine | None = None
        self.protection: Protection | None = None
        self.receiver: StandbyReceiver | None = None
        self.failover_result: FailoverResult | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._spec: MachineSpec | None = None
        self._failover_requested = asyncio.Event()
        self.accel_reason = ""
        self.binary_reason = ""
        self.checkpoint_safe = False
        self.started_at = time.monotonic()
        self._stop_requested = asyncio.Event()

    async def run(self) -> int:
        """Run the VM to the end; returns the exit status for ``kemari run``.

        A standby (``incoming`` set) runs no QEMU: it keeps the replica until the
        operator's ``failover``, then starts QEMU from it and carries on as active.
        """
        async with contextlib.AsyncExitStack() as stack:
            stack.enter_context(_locked_runtime_dir(self.runtime_dir, self.config.name))
            spec = self._machine_spec()
            self._stack, self._spec = stack, spec
            binary = qemu_binary(spec.accel)
            self.binary_reason = binary.reason
            self.checkpoint_safe = binary.checkpoint_safe
            # Bridges (and taps) live as long as the agent; each QEMU gets new guest links.
            for index, nic in enumerate(self.config.nics):
                bridge = NetBridge(None, nic.tap, nic.bridge)
                NetOutputs(self.event_tap, bridge, index)
                await bridge.start()
                stack.push_async_callback(bridge.close)
                self.bridges.append(bridge)
            self._register_monitor_commands()
            await self.monitor.start()
            stack.push_async_callback(self.monitor.close)
            stack.enter_context(self._signal_handlers())
            if self.config.incoming is not None:
                if not await self._serve_as_standby(stack, self.config.incoming):
                    return 0  # told to stop before any failover
                machine = self.machine
                assert machine is not None
            else:
                # Disks are opened only by the host that runs the guest (shared storage:
                # the standby must not hold the image while the primary writes it).
                await self._start_disks(stack)
                async with self._guest_links(spec) as linked:
                    machine = QemuMachine(linked, binary.path)
                    self.machine = machine
                    await stack.enter_async_context(machine)
            # Registered after QEMU: runs before QEMU is stopped, so the standby is told
            # goodbye while the guest still runs.
            stack.push_async_callback(self._stop_protection)
            self._check_nics()
            if self.console is not None:
                follower = asyncio.create_task(self._follow_serial(self.console))
                stack.callback(follower.cancel)
            self.state = AgentState.RUNNING
            self._say(
                f"VM {self.config.name} running (QEMU pid {machine.pid}, "
                f"accel {spec.accel}: {self.accel_reason}); monitor at {self.monitor.path}"
            )
            status = await self._wait_for_end(machine)
            self.state = AgentState.STOPPING
        self.state = AgentState.STOPPED
        return status

    async def _start_disks(self, stack: contextlib.AsyncExitStack) -> None:
        overlays: list[OverlayBackend] = []
        for index, disk in enumerate(self.config.disks):
            backend = RawFileBackend.open(disk.path, read_only=disk.read_only)
            stack.push_async_callback(backend.close)
            # Writable disks get an overlay: it passes writes through until protected.
            served: RawFileBackend | OverlayBackend = backend
            if not disk.read_only:
                served = OverlayBackend(backend, disk=index)
                overlays.append(served)
            server = NbdServer(served, self.runtime_dir / f"disk{index}.sock", NBD_EXPORT)
            await server.start()
            stack.push_async_callback(server.close)
            self.nbd_servers.append(server)
        self.disk_tap = DiskTap(overlays)
        # Closed before the servers and images, after protection (registered later) ended.
        stack.push_async_callback(self.disk_tap.close)

    async def _serve_as_standby(self, stack: contextlib.AsyncExitStack, uri: str) -> bool:
        """Keep the replica until ``failover`` (True: QEMU now runs) or a stop (False)."""
        replica_dir = self.config.resolved_replica_dir()
        applier = ReplicaApplier(replica_dir, config_digest=self.config.replication_digest().hex())
        # Exit order (LIFO): a failover QEMU (registered later) stops first, then the
        # applier closes, then the replica goes: it is useless without this agent (a new
        # protection session always starts with a new initial sync).  Only a crash of
        # the agent leaves it behind, for the next start to recover.
        stack.callback(shutil.rmtree, replica_dir, ignore_errors=True)
        stack.callback(applier.close)
        identity = Identity(self.config.name, self.config.replication_digest())
        self.standby_disks = StandbyDisks(
            [disk.path for disk in self.config.disks], self.config.storage
        )
        stack.push_async_callback(self.standby_disks.close)
        self.receiver = StandbyReceiver(uri, identity, applier, self.standby_disks)
        await self.receiver.start()
        self.state = AgentState.STANDBY
        self._say(
            f"standby for VM {self.config.name} listening on {self.receiver.listener.bound}; "
            f"replica in {replica_dir}; monitor at {self.monitor.path}"
        )
        stop = asyncio.create_task(self._stop_requested.wait())
        failover = asyncio.create_task(self._failover_requested.wait())
        try:
            await asyncio.wait({stop, failover}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            failover.cancel()
        if self._stop_requested.is_set():
            await self.receiver.close()
            return False
        return True

    async def _fail_over(self, args: list[str]) -> Reply:
        """Monitor ``failover``: start QEMU from the committed replica (standby only)."""
        if args:
            raise ConfigError(f"failover takes no arguments, got {' '.join(args)!r}")
        receiver = self.receiver
        if receiver is None or self.state is not AgentState.STANDBY:
            raise ConfigError(f"VM {self.config.name} is not a standby ({self.state.value})")
        if receiver.applier.committed_epoch is None:
            raise FailoverError(
                "refusing to fail over: no committed replica (the initial sync has not "
                "completed, so there is no state to resume the guest from)"
            )
        self.state = AgentState.FAILING_OVER
        try:
            # The receiver stops first: no checkpoint may land while QEMU maps the replica.
            await receiver.close()
            # Replay the last event before the guest resumes: the dead primary may not
            # have released the outputs of the epoch we resume from (duplicates are fine).
            replayed = replay_frames(receiver.committed_outputs(), self.bridges)
            assert self._stack is not None and self._spec is not None
            # Disks at the committed epoch before any QEMU opens them (docs/storage.md).
            if self.standby_disks is not None:
                await self.standby_disks.fail_over()
            await self._start_disks(self._stack)
            binary = qemu_binary(self._spec.accel)
            # The standby's bridges had no guest; the failover QEMU gets new links to them.
            async with self._guest_links(self._spec) as linked:
                result = await fail_over(receiver.applier, linked, binary.path)
        except BaseException:
            self.state = AgentState.STANDBY_FAILED
            raise
        self.machine = result.machine
        self._stack.push_async_callback(result.machine.shutdown)
        self.failover_result = result
        self._failover_requested.set()
        text = (
            f"VM {self.config.name} resumed from epoch {result.epoch} in "
            f"{result.timings.total_s * 1000:.0f} ms ({replayed} held frames replayed)"
        )
        self._say(text)
        return Reply(
            data={
                "epoch": result.epoch,
                "total_ms": round(result.timings.total_s * 1000, 1),
                "replayed_frames": replayed,
            },
            text=text,
        )

    def _machine_spec(self) -> MachineSpec:
        config = self.config
        decision = choose_accel(config.accel)
        self.accel_reason = decision.reason
        kernel, initrd = config.kernel, config.initrd
        if kernel is None:
            image = default_image()
            kernel, initrd = image.kernel, image.initrd
        return MachineSpec(
            name=config.name,
            accel=decision.accel,
            memory_mib=config.memory_mib,
            vcpus=config.vcpus,
            kernel=kernel,
            initrd=initrd,
            append=config.kernel_command_line(),
            disks=tuple(
                NbdDisk(
                    socket=self.runtime_dir / f"disk{i}.sock",
                    export=NBD_EXPORT,
                    read_only=disk.read_only,
                )
                for i, disk in enumerate(config.disks)
            ),
            # NICs are added per launch, with that QEMU's descriptors (_guest_links).
            qmp_socket=self.runtime_dir / "qmp.sock",
            serial_log=config.resolved_serial_log(),
            # A guest reboot resets the machine in place (the records test relies on it).
            no_reboot=False,
        )

    async def _wait_for_end(self, machine: QemuMachine) -> int:
        """Wait for QEMU to exit, a stop request, or a failed I/O path; returns the exit status.

        A failed NIC path (its tap vanished, say) stops the VM: a guest cut off
        from its network must not keep running as if nothing happened.
        """
        exited = asyncio.create_task(machine.wait())
        watchers: list[asyncio.Task[object]] = [
            asyncio.create_task(self._stop_requested.wait()),
            *(asyncio.create_task(bridge.wait_stopped()) for bridge in self.bridges),
        ]
        try:
            await asyncio.wait({exited, *watchers}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for watcher in watchers:
                watcher.cancel()
        failed = [bridge.failure for bridge in self.bridges if bridge.failure is not None]
        if not exited.done():
            self._say(f"stopping VM {self.config.name}")
            await machine.shutdown()
            exited.cancel()
            if failed:
                raise failed[0]
            return 0
        end = exited.result()
        if end.clean:
            self._say(f"VM {self.config.name} shut down")
            return 0
        raise QemuError(f"QEMU ended unexpectedly: {end.describe()}")

    async def _stop_protection(self) -> None:
        for task in self._copy_tasks:
            task.cancel()
        self._copy_tasks.clear()
        if self.protection is not None:
            protection, self.protection = self.protection, None
            await protection.close()

    @contextlib.asynccontextmanager
    async def _guest_links(self, spec: MachineSpec) -> AsyncIterator[MachineSpec]:
        """``spec`` with one new guest link per NIC, its QEMU ends passed as descriptors.

        Start QEMU inside the block.  Leaving it closes the agent's copies of QEMU's ends,
        so from then on QEMU holds the only ones, and its exit (or a refused descriptor)
        detaches the bridge's link; a QEMU that never started detaches them at once.
        """
        qemu_ends: list[socket.socket] = []
        try:
            for bridge in self.bridges:
                qemu_ends.append(await bridge.plug_guest())
            nics = tuple(
                StreamNic(mac=nic.mac, fd=end.fileno())
                for nic, end in zip(self.config.nics, qemu_ends, strict=True)
            )
            yield dataclasses.replace(spec, nics=nics)
        finally:
            for end in qemu_ends:
                end.close()

    def _check_nics(self) -> None:
        """Every NIC's link is still attached once QEMU runs.

        QEMU 7.2 takes an inherited ``-netdev stream`` descriptor on a connect thread during
        start-up and closes it if unusable, which ends the link here.  A link is connected
        from its creation, so there is nothing to wait for: guest frames flow as soon as
        QEMU reads, and host frames wait in the socket until it does.
        """
        missing = [bridge.tap_name for bridge in self.bridges if not bridge.guest_attached]
        if missing:
            raise NetError(f"QEMU dropped the stream link of tap {', '.join(missing)}")

    @contextlib.contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(signum, self._stop_requested.set)
        try:
            yield
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)

    async def _follow_serial(self, out: TextIO) -> None:
        """Copy the guest serial console to ``out`` as it grows."""
        path = self.config.resolved_serial_log()
        async for line in _tail(path):
            out.write(line)
            out.flush()

    def _say(self, message: str) -> None:
        print(f"kemari: {message}", file=sys.stderr, flush=True)

    # -- monitor -------------------------------------------------------------

    def _register_monitor_commands(self) -> None:
        self.monitor.register(("info", "status"), self._info_status, "VM and agent status")
        self.monitor.register(("quit",), self._quit, "stop the VM and the agent")
        self.monitor.register(
            ("failover",), self._fail_over, "standby: start the VM from the committed replica"
        )
        self.monitor.register(
            ("migrate",), self._migrate, "migrate -d kemari:tcp:HOST:PORT: protect with a standby"
        )
        self.monitor.register(
            ("checkpoint",), self._checkpoint, "take a checkpoint now; returns its epoch"
        )
        self.monitor.register(
            ("migrate_cancel",), self._migrate_cancel, "stop protecting (the guest keeps running)"
        )

    @property
    def protection_state(self) -> str:
        """``unprotected``, ``syncing`` or ``protected`` (the active host's view)."""
        if self.protection is None or not self.protection.active:
            return "unprotected"
        return self.protection.source.state.value

    async def _migrate(self, args: list[str]) -> Reply:
        uris = [arg for arg in args if arg != "-d"]
        if len(uris) != 1 or not uris[0].startswith("kemari:"):
            raise ConfigError("usage: migrate -d kemari:tcp:HOST:PORT")
        if self.machine is None or self.state is not AgentState.RUNNING:
            raise ConfigError(f"VM {self.config.name} is not running")
        if self.protection is not None and self.protection.active:
            raise ConfigError(
                f"VM {self.config.name} is already protected by {self.protection.peer}"
            )
        if self.protection is not None:  # a previous session ended (standby lost): tidy it
            await self.protection.close()
        identity = Identity(self.config.name, self.config.replication_digest())
        self.protection = await Protection.start(
            self.machine,
            uris[0],
            identity,
            epoch_ms=self.config.qemu_epoch_ms,
            event_tap=self.event_tap,
            disk_tap=self.disk_tap,
        )
        if self.config.storage is StorageMode.REPLICATED and self.disk_tap is not None:
            self._start_disk_copies(self.protection)
        self._say(f"protection of VM {self.config.name} started: initial sync to {uris[0]}")
        return Reply(
            data={"peer": self.protection.peer},
            text=f"initial sync to {self.protection.peer} started; see 'info status'",
        )

    def _start_disk_copies(self, protection: Protection) -> None:
        """Replicated storage: copy every writable disk to the standby while the guest runs."""
        assert self.disk_tap is not None
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
            self._copy_tasks.append(asyncio.create_task(self._copy_disk(copier)))

    async def _copy_disk(self, copier: DiskCopier) -> None:
        try:
            await copier.run()
        except KemariError as exc:  # protection ended: the next session copies again
            self._say(f"disk {copier.overlay.disk} copy stopped: {exc}")
        else:
            self._say(f"disk {copier.overlay.disk} copied to the standby")

    async def _checkpoint(self, args: list[str]) -> Reply:
        if args:
            raise ConfigError(f"checkpoint takes no arguments, got {' '.join(args)!r}")
        if self.protection is None or not self.protection.active:
            raise ConfigError(f"VM {self.config.name} is not protected")
        started = time.monotonic()
        epoch = await self.protection.trigger.checkpoint()
        elapsed_ms = (time.monotonic() - started) * 1000
        return Reply(
            data={"epoch": epoch, "ms": round(elapsed_ms, 2)},
            text=f"checkpoint {epoch} committed in {elapsed_ms:.1f} ms",
        )

    async def _migrate_cancel(self, args: list[str]) -> Reply:
        del args
        if self.protection is None:
            raise ConfigError(f"VM {self.config.name} is not protected")
        protection, self.protection = self.protection, None
        await protection.close()
        return Reply(data={}, text="protection stopped; the guest runs unprotected")

    def status(self) -> dict[str, Any]:
        """Plain-data status of the agent, its VM and its I/O paths."""
        machine = self.machine
        return {
            "name": self.config.name,
            "role": "standby" if self.machine is None and self.receiver is not None else "active",
            "protection": self.protection_state,
            "replication": None if self.protection is None else self.protection.status(),
            "standby": None
            if self.receiver is None or self.machine is not None
            else self.receiver.status(),
            "failover": None
            if self.failover_result is None
            else {
                "epoch": self.failover_result.epoch,
                "total_ms": round(self.failover_result.timings.total_s * 1000, 1),
            },
            "agent": self.state.value,
            "vm": machine.run_state.value if machine is not None else "not-started",
            "qemu_pid": machine.pid if machine is not None else None,
            "accel": machine.spec.accel if machine is not None else None,
            "accel_reason": self.accel_reason,
            "qemu_binary": str(machine.binary) if machine is not None else None,
            "qemu_binary_reason": self.binary_reason,
            "uptime_s": round(time.monotonic() - self.started_at, 1),
            "disks": [
                {
                    "image": str(disk.path),
                    "read_only": disk.read_only,
                    "socket": str(server.socket_path),
                }
                for disk, server in zip(self.config.disks, self.nbd_servers, strict=False)
            ],
            "nics": [
                {**bridge.counters.as_dict(), "guest_reading_paused": bridge.guest_reading_paused}
                for bridge in self.bridges
            ],
            "eventtap": self.event_tap.status(),
            "storage": self.config.storage.value,
            "disk_copy": [
                {**copier.progress().as_dict(), "done": copier.done} for copier in self.disk_copies
            ],
            "serial_log": str(self.config.resolved_serial_log()),
        }

    async def _info_status(self, args: list[str]) -> Reply:
        if args:
            raise ConfigError(f"info status takes no arguments, got {' '.join(args)!r}")
        data = self.status()
        lines = [
            f"VM {data['name']}: {data['vm']} (role {data['role']}, {data['protection']}, "
            f"agent {data['agent']})",
            f"accel: {data['accel']} ({data['accel_reason']}); QEMU pid {data['qemu_pid']}",
            f"uptime: {data['uptime_s']} s; serial log: {data['serial_log']}",
        ]
        lines += [
            f"disk{i}: {disk['image']}{' (read-only)' if disk['read_only'] else ''} via NBD"
            for i, disk in enumerate(data["disks"])
        ]
        lines += [
            f"nic{i}: tap {nic.tap}: guest->host {counters['guest_to_host']['frames']} frames, "
            f"host->guest {counters['host_to_guest']['frames']} frames"
            for i, (nic, counters) in enumerate(zip(self.config.nics, data["nics"], strict=True))
        ]
        tap = data["eventtap"]
        lines.append(
            f"event-tap ({tap['sync']}): {tap['mode']}; held {tap['held']} outputs "
            f"({tap['held_bytes']} of max {tap['max_bytes']} bytes), released "
            f"{tap['released']}, paused {tap['pauses']} times{' (now)' if tap['paused'] else ''}, "
            f"output-commit latency p50 {tap['latency_ms_p50']} ms, p99 {tap['latency_ms_p99']} ms"
        )
        lines += _replication_lines(data["replication"])
        lines += [f"  {copy['line']}" for copy in data["disk_copy"]]
        if data["standby"] is not None:
            standby = data["standby"]
            lines.append(
                f"standby: listening on {standby['listening']}; primary {standby['primary']}; "
                f"replica epoch {standby['epoch']} ({standby['applier']}); last checkpoint "
                f"{standby['last_checkpoint_age_s']} s ago"
            )
            if standby["last_error"]:
                lines.append(f"  last error: {standby['last_error']}")
            for index, disk in enumerate(standby["disks"]):
                state = "holds the initial copy" if disk["synced"] else "initial copy not complete"
                lines.append(
                    f"  disk{index} {disk['image']}: {state}; {disk['applied']} writes applied, "
                    f"{disk['kept']} kept for failover, {disk['background_flushes']} background "
                    f"flushes" + (f"; ERROR {disk['flush_error']}" if disk["flush_error"] else "")
                )
        if data["failover"] is not None:
            lines.append(
                f"failed over: resumed from epoch {data['failover']['epoch']} in "
                f"{data['failover']['total_ms']} ms"
            )
        return Reply(data=data, text="\n".join(lines))

    async def _quit(self, args: list[str]) -> Reply:
        del args
        self._stop_requested.set()
        return Reply(data={}, text=f"stopping VM {self.config.name}")


def _replication_lines(replication: dict[str, Any] | None) -> list[str]:
    """Human lines of the active side's replication status."""
    if replication is None:
        return []
    lines = [f"standby: {replication['peer']} ({replication['state']})"]
    if replication["reason"]:
        lines.append(f"  reason: {replication['reason']}")
    progress = replication["sync_progress"]
    if progress is not None and progress["ram_bytes"]:
        lines.append(
            f"  initial sync: {progress['received_bytes'] / progress['ram_bytes']:.0%} of "
            f"{progress['ram_bytes'] >> 20} MiB at {progress['rate_bytes_per_s'] / 2**20:.0f} MiB/s"
        )
    recent = replication["recent"]
    lines.append(
        f"  epoch {replication['epoch']} (every {replication['epoch_ms']} ms); "
        f"last checkpoint {replication['last_checkpoint_age_s']} s ago; "
        f"pause p50 {recent['pause_ms_p50']} ms, max {recent['pause_ms_max']} ms over "
        f"{recent['count']}; last {recent['pages_last']} pages, {recent['bytes_last']} bytes"
    )
    return lines


@contextlib.contextmanager
def _locked_runtime_dir(path: Path, name: str) -> Iterator[None]:
    """Hold an exclusive lock on the VM's runtime directory; remove it when empty."""
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    lock_path = path / "agent.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise ConfigError(f"VM {name!r} is already running (agent pid {owner})") from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            lock_path.unlink(missing_ok=True)
    finally:
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                path.rmdir()


async def _tail(path: Path, poll_s: float = 0.1) -> AsyncIterator[str]:
    """Yield lines appended to ``path`` (which may not exist yet), forever."""
    while not path.exists():
        await asyncio.sleep(poll_s)
    with path.open(encoding="utf-8", errors="replace") as handle:
        pending = ""
        while True:
            chunk = handle.read()
            if not chunk:
                await asyncio.sleep(poll_s)
                continue
            pending += chunk
            *lines, pending = pending.split("\n")
            for line in lines:
                yield line + "\n"
