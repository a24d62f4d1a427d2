"""The Kemari agent: one process per VM per host, playing one role at a time.

The :class:`Agent` owns what outlives a role: the runtime directory's lock, the NIC
bridges (and the network event-tap on them), the monitor, the guest's disks once
this host runs the guest, and the role state machine (kemari.roles.state).  It plays
exactly one role at a time: an :class:`~kemari.roles.active.ActiveRole` (QEMU runs
the guest here) or a :class:`~kemari.roles.standby.StandbyRole` (the replica only).
A failover (kemari.roles.failover) turns the standby role into an active one.  With
``--ha`` an active that fenced itself (docs/ha.md rule 5) rejoins as a standby by itself
once etcd names another active, under a new identity, as a restarted agent would.

Start order (each step needs the previous ones):

1. lock the runtime directory, so two agents never drive one VM;
2. start the network bridges (their taps), so each QEMU launch gets a new
   stream socketpair per NIC;
3. start the monitor, so an operator can talk to the agent;
4. take the first role: standby (``--incoming``: receiver and replica, no QEMU), or
   active (the NBD servers first, so QEMU finds its disk sockets listening when it
   connects at start-up, then QEMU, waiting until QMP answers).

Teardown runs in exactly the reverse order, on every exit path (guest shutdown,
``quit``, SIGTERM/SIGINT, a QEMU that dies): the role closes first (protection,
then QEMU, then a failed-over replica), then the disks' servers QEMU talked to,
then the monitor, the bridges and the lock; every socket, tap and child is gone
afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TextIO

from kemari.config import StorageMode, VMConfig
from kemari.errors import ConfigError, KemariError, NetError, StateError
from kemari.eventtap.gate import EventTap
from kemari.eventtap.net import NetOutputs
from kemari.eventtap.outputs import OutputLog
from kemari.image.builder import default_image
from kemari.monitor import api
from kemari.monitor.server import MonitorServer
from kemari.net.bridge import NetBridge
from kemari.qemu.accel import choose_accel
from kemari.qemu.binary import QemuBinary, qemu_binary
from kemari.qemu.cmdline import MachineSpec, NbdDisk
from kemari.roles.active import ActiveRole
from kemari.roles.failover import Host, Promoted, promote, refuse_without_replica
from kemari.roles.guestdisks import NBD_EXPORT, GuestDisks, disk_socket
from kemari.roles.ha import HaDiskPermit, HaPermit, HaSupervisor, Rejoin, TakeOver
from kemari.roles.standby import StandbyRole
from kemari.roles.state import RoleState, State
from kemari.sockets import make_private_dir

Role = ActiveRole | StandbyRole


class Agent:
    """Runs one VM until it shuts down, is told to quit, or its QEMU dies."""

    def __init__(self, config: VMConfig, console: TextIO | None = None) -> None:
        self.config = config
        self.console = console
        self.state = RoleState("agent started")
        self.runtime_dir = config.resolved_runtime_dir()
        self.monitor = MonitorServer(config.resolved_monitor())
        self.bridges: list[NetBridge] = []
        # --ha: the etcd arbiter decides who is active, and permits every release.
        self.ha = HaSupervisor(config) if config.ha is not None else None
        # Every guest frame passes the event-tap; it holds them while protected.
        self.event_tap = self._new_event_tap()
        self.role: Role | None = None
        self.disks: GuestDisks | None = None  # opened when this host runs the guest
        self.accel_reason = ""
        self.binary: QemuBinary | None = None
        self.started_at = time.monotonic()
        self._spec: MachineSpec | None = None
        self._stop_requested = asyncio.Event()
        self._promotion: asyncio.Future[Promoted] | None = None
        self._promotion_requested = asyncio.Event()

    async def run(self) -> int:
        """Run the VM to the end; returns the exit status for ``kemari run``.

        A standby (``incoming`` set) runs no QEMU: it keeps the replica until the
        operator's ``failover``, then starts QEMU from it and carries on as active.
        """
        try:
            async with contextlib.AsyncExitStack() as stack:
                try:
                    return await self._run(stack)
                finally:
                    self._to(State.STOPPING, "the agent is stopping")
        finally:
            self._to(State.STOPPED, "the agent stopped")

    async def _run(self, stack: contextlib.AsyncExitStack) -> int:
        stack.enter_context(_locked_runtime_dir(self.runtime_dir, self.config.name))
        spec = self._machine_spec()
        self._spec = spec
        self.binary = qemu_binary(spec.accel)
        # Bridges (and taps) live as long as the agent; each QEMU gets new guest links.
        for index, nic in enumerate(self.config.nics):
            bridge = NetBridge(None, nic.tap, nic.bridge)
            NetOutputs(self.event_tap, bridge, index)
            await bridge.start()
            stack.push_async_callback(bridge.close)
            self.bridges.append(bridge)
        self.monitor.register_api(self._handle)
        await self.monitor.start()
        stack.push_async_callback(self.monitor.close)
        stack.enter_context(self._signal_handlers())
        claimed: bool | None = None
        if self.ha is not None:
            # The lease is revoked last, once QEMU is gone (the stack runs in reverse).
            stack.push_async_callback(self._close_ha)
            await self.ha.start(self._stop_requested)
            claimed = await self.ha.boot(self._stop_requested)
            if claimed is None:
                return 0  # stopped before etcd answered
        # The disks close after the role (QEMU first, then the servers it talks to).
        stack.push_async_callback(self._close_disks)
        stack.push_async_callback(self._close_role)
        if self.config.incoming is not None and not claimed:
            active = await self._serve_as_standby(self.config.incoming)
            if active is None:
                return 0  # told to stop before any failover
        else:
            # Disks are opened only by the host that runs the guest (shared storage:
            # the standby must not hold the image while the primary writes it).
            disks = await self._open_disks()
            active = await ActiveRole.start(
                self.config,
                spec,
                binary=self.binary,
                bridges=self.bridges,
                event_tap=self.event_tap,
                disk_tap=disks.tap,
            )
            self.role = active
            self._to(State.ACTIVE, f"QEMU started (pid {active.machine.pid})")
        if self.console is not None:
            follower = asyncio.create_task(self._follow_serial(self.console))
            stack.callback(follower.cancel)
        self._running(active)
        if self.ha is None:
            return await active.wait_for_end(self._stop_requested, self.bridges)
        while True:
            ended = await self._run_active_ha(self.ha, active)
            if ended is not None:
                return ended
            rejoined = await self._rejoin_as_standby(self.ha)
            if rejoined is None:
                return 0  # told to stop while fenced or before a takeover
            active = rejoined
            self._running(active)

    def _running(self, active: ActiveRole) -> None:
        """The guest runs here now (booted or failed over): check its links, say so."""
        self._check_nics()
        assert self._spec is not None
        self._say(
            f"VM {self.config.name} running (QEMU pid {active.machine.pid}, "
            f"accel {self._spec.accel}: {self.accel_reason}); monitor at {self.monitor.path}"
        )

    async def _run_active_ha(self, ha: HaSupervisor, active: ActiveRole) -> int | None:
        """The active with --ha: the guest runs until it ends (its exit status), or the
        arbiter says this agent must fence itself (docs/ha.md rule 5): then None, fenced."""
        guard = asyncio.create_task(ha.guard_active(active), name="ha-guard-active")
        end = asyncio.create_task(active.wait_for_end(self._stop_requested, self.bridges))
        try:
            await asyncio.wait({guard, end}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            guard.cancel()
        if end.done():
            return end.result()
        end.cancel()
        with contextlib.suppress(asyncio.CancelledError, KemariError):
            await end
        await self._fence(ha, active, guard.result())
        return None

    async def _fence(self, ha: HaSupervisor, active: ActiveRole, reason: str) -> None:
        """Rule 5: release nothing more, pause the guest, stop QEMU; never resume."""
        ha.fenced = True
        discarded = self.event_tap.fence()
        if self.disks is not None:
            discarded += self.disks.tap.fence()
        with contextlib.suppress(KemariError, OSError):
            await active.machine.execute("stop")
        await self._close_role()
        await ha.arbiter.stop_renewing()
        why = f"fenced: {reason} ({discarded} held outputs discarded)"
        ha.last_change = why
        self._to(State.FENCED, why)
        self._say(
            f"VM {self.config.name} {why}; QEMU stopped; it rejoins as the standby once "
            "etcd answers and names another active"
        )

    async def _rejoin_as_standby(self, fenced: HaSupervisor) -> ActiveRole | None:
        """Fenced → standby by itself (docs/ha.md rule 5, "A partition heals"): once etcd
        answers and the record names another active, take the path of a restarted agent
        whose claim was refused: nothing of the old life kept (disks closed, old lease
        revoked), a new identity and lease, a new event-tap, a new standby role published
        for the active to protect to.  Returns the active role after a later takeover, or
        None when told to stop first.  A fenced agent never claims: it only rejoins."""
        uri = self.config.incoming
        assert uri is not None  # --ha requires incoming (kemari.config)
        seen = await fenced.wait_for_another_active(self._stop_requested)
        if seen is None:
            return None
        was = self.state.reason
        # Shared storage: the standby must not hold the image; replicated: the image here
        # is stale, and the new active's disk copy rebuilds it, as for a restarted host.
        await self._close_disks()
        # After the last write here (disks closed), as a quit does: the lease goes last.
        await fenced.close()
        self.ha = HaSupervisor(self.config)  # a new identity: never the fenced agent's
        self.event_tap = self._new_event_tap()
        await self.ha.start(self._stop_requested)
        if self._stop_requested.is_set():
            return None
        why = f"rejoined as standby: {seen}; {was}"
        self.ha.last_change = why
        self._say(f"VM {self.config.name} {why}")
        return await self._serve_as_standby(uri, rejoined=why)

    async def _serve_as_standby(self, uri: str, rejoined: str | None = None) -> ActiveRole | None:
        """Keep the replica until a failover succeeds (the new active role) or a stop (None).

        The failover runs here, in the agent's task: the monitor's ``failover`` only
        asks for it and waits for its outcome.  A failed failover leaves the agent
        ``failed`` until it is stopped.  ``rejoined``: why a fenced agent rejoins
        (the state's reason says it).
        """
        standby = await StandbyRole.start(self.config, uri)
        self.role = standby
        auto: asyncio.Task[TakeOver | Rejoin] | None = None
        replica_dir = self.config.resolved_replica_dir()
        listening = f"listening on {standby.listening}"
        self._to(State.STANDBY, listening if rejoined is None else f"{rejoined}; {listening}")
        self._say(
            f"standby for VM {self.config.name} listening on {standby.listening}; "
            f"replica in {replica_dir}; monitor at {self.monitor.path}"
        )
        while True:
            if self.ha is not None and auto is None:
                auto = asyncio.create_task(self.ha.guard_standby(standby), name="ha-guard")
            stop = asyncio.create_task(self._stop_requested.wait())
            asked = asyncio.create_task(self._promotion_requested.wait())
            waits: set[asyncio.Future[object]] = {stop, asked}  # type: ignore[arg-type]
            if auto is not None:
                waits.add(auto)  # type: ignore[arg-type]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
                asked.cancel()
                if auto is not None and not auto.done():
                    auto.cancel()
            if self._stop_requested.is_set():
                return None
            if auto is not None and auto.done() and not auto.cancelled():
                outcome = auto.result()
                auto = None
                if isinstance(outcome, Rejoin):
                    # The receiver was closed for a takeover that the record refused.
                    await self._close_role()
                    standby = await StandbyRole.start(self.config, uri)
                    self.role = standby
                    continue
                self._to(State.PROMOTING, f"automatic failover: {outcome.reason}")
                self._promotion = asyncio.get_running_loop().create_future()
            else:
                auto = None
                self._promotion_requested.clear()
            promotion = self._promotion
            assert promotion is not None
            try:
                promoted = await promote(standby, self._host())
            except Exception as exc:
                self._to(State.FAILED, f"failover failed: {exc}")
                if not promotion.done():
                    promotion.set_exception(exc)
                continue
            except BaseException:  # cancelled (the agent is stopping): so is the request
                self._to(State.FAILED, "failover interrupted")
                promotion.cancel()
                raise
            self.role = promoted.role
            self._to(State.ACTIVE, f"failed over: resumed from epoch {promoted.reply.epoch}")
            if self.ha is not None:
                self.ha.promoted(promoted.role)
            promotion.set_result(promoted)
            return promoted.role

    def _host(self) -> Host:
        assert self._spec is not None
        return Host(
            config=self.config,
            spec=self._spec,
            binary=qemu_binary(self._spec.accel),
            bridges=self.bridges,
            event_tap=self.event_tap,
            open_disks=self._open_disks,
        )

    async def _open_disks(self) -> GuestDisks:
        if self.disks is not None:
            raise StateError(f"the disks of VM {self.config.name} are open already")
        self.disks = await GuestDisks.open(self.config, self.runtime_dir)
        if self.ha is not None and self.config.storage is StorageMode.SHARED:
            # One disk writer (docs/ha.md invariant 5): writes ask the arbiter too.
            self.disks.tap.set_permit(HaDiskPermit(self.ha))
            self.ha.disk_tap = self.disks.tap
        return self.disks

    def _new_event_tap(self) -> EventTap:
        """An event-tap asking the current arbiter's permit, on every bridge started."""
        config = self.config
        tap = EventTap(
            config.sync,
            OutputLog(config.held_frames_max_bytes, config.held_frames_max_count),
            None if self.ha is None else HaPermit(self.ha),
        )
        if self.ha is not None:
            self.ha.event_tap = tap
        for index, bridge in enumerate(self.bridges):
            NetOutputs(tap, bridge, index)
        return tap

    async def _close_ha(self) -> None:
        if self.ha is not None:
            await self.ha.close()

    async def _close_disks(self) -> None:
        disks, self.disks = self.disks, None
        if disks is not None:
            await disks.close()

    async def _close_role(self) -> None:
        role, self.role = self.role, None
        if role is not None:
            await role.close()

    def _to(self, state: State, reason: str) -> None:
        """Step the role state machine (a no-op when already there)."""
        if self.state.state is not state:
            self.state.to(state, reason)

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
                    socket=disk_socket(self.runtime_dir, i),
                    export=NBD_EXPORT,
                    read_only=disk.read_only,
                )
                for i, disk in enumerate(config.disks)
            ),
            # NICs are added per launch, with that QEMU's descriptors (guest_links).
            qmp_socket=self.runtime_dir / "qmp.sock",
            serial_log=config.resolved_serial_log(),
            # A guest reboot resets the machine in place (the records test relies on it).
            no_reboot=False,
        )

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

    async def _handle(self, command: api.Command) -> api.Reply:
        """Answer one typed monitor command."""
        match command:
            case api.InfoStatus() | api.QueryStatus():
                return self.status()
            case api.Quit():
                self._stop_requested.set()
                return api.Stopping(self.config.name)
            case api.Failover():
                return await self._failover()
            case api.Migrate():
                return await self._active_role().migrate(command)
            case api.Checkpoint():
                return await self._active_role("protected").checkpoint()
            case api.MigrateCancel():
                return await self._active_role("protected").migrate_cancel()
            case api.Help():  # answered by the monitor server itself
                raise ConfigError("help is answered by the monitor")

    def _active_role(self, needed: str = "running") -> ActiveRole:
        """The active role; ConfigError "VM is not ``needed``" on any other."""
        role = self.role
        if not isinstance(role, ActiveRole) or self.state.state is not State.ACTIVE:
            raise ConfigError(f"VM {self.config.name} is not {needed}")
        return role

    async def _failover(self) -> api.FailedOver:
        """``failover``: ask the agent's task to promote this standby; wait for the outcome."""
        if not isinstance(self.role, StandbyRole) or self.state.state is not State.STANDBY:
            raise ConfigError(f"VM {self.config.name} is not a standby ({self.state.state.value})")
        if self.ha is not None:
            # Only a won take_over may start the guest here (docs/ha.md rule 4).
            raise ConfigError(
                f"VM {self.config.name} runs with --ha: the standby takes over by itself "
                "when it has lost the active and the arbiter agrees"
            )
        refuse_without_replica(self.role)  # refused before anything changes: still a standby
        self._to(State.PROMOTING, "monitor: failover")
        promotion: asyncio.Future[Promoted] = asyncio.get_running_loop().create_future()
        self._promotion = promotion
        self._promotion_requested.set()
        promoted = await asyncio.shield(promotion)
        self._say(
            f"VM {self.config.name} resumed from epoch {promoted.reply.epoch} in "
            f"{promoted.reply.total_ms:.0f} ms ({promoted.reply.replayed_frames} held frames "
            "replayed)"
        )
        return promoted.reply

    def status(self) -> api.Status:
        """The agent, its role, its VM and its I/O paths (docs/status.md)."""
        role = self.role
        active = role if isinstance(role, ActiveRole) else None
        standby = role if isinstance(role, StandbyRole) else None
        machine = active.machine if active is not None else None
        state_for_s = self.state.age_s()
        return api.Status(
            name=self.config.name,
            role=None if role is None else ("active" if active is not None else "standby"),
            state=self.state.state.value,
            state_for_s=round(state_for_s, 3),
            state_since_unix=round(time.time() - state_for_s, 3),
            state_reason=self.state.reason,
            agent_pid=os.getpid(),
            protection="unprotected" if active is None else active.protection_state,
            replication=None if active is None else active.replication_status(),
            standby=None if standby is None else standby.status(),
            failover=None if active is None else active.failover,
            vm=machine.run_state.value if machine is not None else "not-started",
            qemu_pid=machine.pid if machine is not None else None,
            accel=machine.spec.accel if machine is not None else None,
            accel_reason=self.accel_reason,
            qemu_binary=str(machine.binary) if machine is not None else None,
            qemu_binary_reason="" if self.binary is None else self.binary.reason,
            checkpoint_safe=self.binary is not None and self.binary.checkpoint_safe,
            uptime_s=round(time.monotonic() - self.started_at, 1),
            disks=[] if self.disks is None else self.disks.status(),
            nics=[
                api.from_plain(
                    api.NicStatus,
                    {
                        "tap": nic.tap,
                        **bridge.counters.as_dict(),
                        "guest_reading_paused": bridge.guest_reading_paused,
                    },
                )
                for nic, bridge in zip(self.config.nics, self.bridges, strict=False)
            ],
            eventtap=api.from_plain(api.EventTapStatus, self.event_tap.status()),
            storage=self.config.storage.value,
            disk_copy=[] if active is None else active.disk_copy_status(),
            serial_log=str(self.config.resolved_serial_log()),
            ha=api.MANUAL_HA if self.ha is None else self.ha.status(),
        )


@contextlib.contextmanager
def _locked_runtime_dir(path: Path, name: str) -> Iterator[None]:
    """Hold an exclusive lock on the VM's runtime directory (mode 0700 whatever the
    umask: its sockets reach the monitor, QMP and the disks); remove it when empty."""
    created = make_private_dir(path)
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
