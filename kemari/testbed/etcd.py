"""A real etcd for the HA arbiter, started in network namespaces of its own.

:class:`EtcdLab` starts Debian's ``etcd`` (3.4) as one member (for the demo) or a
three-member cluster, each member in its own namespace on a LAN bridge, with a clean
environment (etcd reads ``ETCD_*`` variables) and its data in a temporary directory;
it waits until every member answers ``/health`` (a condition with a deadline, no fixed
sleep) and removes everything on exit.  Namespace names start with ``ke-PID-RANDOM``,
apart from the ``kt-`` testbed of the guest tests.

Agents reach etcd from namespaces too (:meth:`EtcdLab.add_agent`).  A test that runs
the arbiter in its own process gets loopback endpoints in the root namespace
(:meth:`EtcdLab.local_endpoints`): a small TCP relay accepts there and connects out
*from the agent's namespace* (its thread entered that namespace with ``setns``), so
cutting the agent's link cuts the arbiter's traffic, and the root namespace gets no
interface or route.

Faults: :meth:`EtcdLab.kill` (SIGKILL a member), :meth:`EtcdLab.restart`,
:meth:`EtcdLab.cut` / :meth:`EtcdLab.heal` (the member's or agent's port on the LAN
bridge down/up: its packets vanish, as in a partition; this kernel has no netem).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

from kemari.errors import NetError
from kemari.net.tap import run_ip
from kemari.testbed.topology import Namespace, Topology, _delete_namespace, _process_alive

T = TypeVar("T")

PREFIX = "ke"
CLIENT_PORT = 2379
PEER_PORT = 2380
_STALE = re.compile(rf"{PREFIX}-(\d+)-[0-9a-f]+-")
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class EtcdLabError(NetError):
    """The etcd lab could not be started, reached or cleaned up."""


def etcd_binary() -> str:
    """The etcd server binary; a clear error when it is not installed."""
    path = shutil.which("etcd") or ("/usr/bin/etcd" if Path("/usr/bin/etcd").exists() else None)
    if path is None:
        raise EtcdLabError("etcd is not installed: run scripts/setup (Debian's etcd-server)")
    return path


def enter_netns(name: str) -> None:
    """Move the *calling thread* into network namespace ``name`` (sockets it creates
    from now on live there)."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise EtcdLabError(f"setns into {name}: {os.strerror(errno)}")
    finally:
        os.close(fd)


def run_in_netns(name: str, function: Callable[[], T]) -> T:
    """Run ``function`` in a fresh thread inside namespace ``name``; return its result."""
    outcome: list[Any] = []

    def target() -> None:
        try:
            enter_netns(name)
            outcome.append((True, function()))
        except BaseException as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=target, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    result: T = value
    return result


def cleanup_stale() -> list[str]:
    """Delete ``ke-`` namespaces whose creating process is gone; returns their names."""
    netns = Path("/run/netns")
    deleted = []
    for entry in sorted(netns.iterdir()) if netns.is_dir() else []:
        match = _STALE.match(entry.name)
        if match is not None and not _process_alive(int(match.group(1))):
            _delete_namespace(entry.name)
            deleted.append(entry.name)
    return deleted


class _LabTopology(Topology):
    def __init__(self) -> None:
        super().__init__()
        self.prefix = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(2)}"


@dataclass
class EtcdMember:
    """One etcd member: its namespace, address, data and log, and its process."""

    name: str
    namespace: Namespace
    ip: str
    data_dir: Path
    log_path: Path
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"{self.ip}:{CLIENT_PORT}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class _Relay:
    """TCP relay: loopback ports in the root namespace → members, from ``netns``."""

    def __init__(self, netns: str, targets: list[tuple[str, int]]) -> None:
        self.netns = netns
        self._listeners = []
        self.ports: list[int] = []
        for _ in targets:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", 0))
            listener.listen(64)
            listener.setblocking(False)
            self._listeners.append(listener)
            self.ports.append(listener.getsockname()[1])
        self._targets = targets
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"relay-{netns}", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise EtcdLabError(f"relay into {netns}: {self._error}")

    def _run(self) -> None:
        try:
            enter_netns(self.netns)  # outgoing sockets of this thread live in the netns
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        servers = []
        for listener, target in zip(self._listeners, self._targets, strict=True):

            async def handle(
                reader: asyncio.StreamReader,
                writer: asyncio.StreamWriter,
                target: tuple[str, int] = target,
            ) -> None:
                await self._pipe(reader, writer, target)

            servers.append(await asyncio.start_server(handle, sock=listener))
        self._ready.set()
        await self._stopped.wait()
        for server in servers:
            server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: tuple[str, int]
    ) -> None:
        upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # in the netns
        upstream.setblocking(False)
        try:
            async with asyncio.timeout(3):
                await asyncio.get_running_loop().sock_connect(upstream, target)
            up_reader, up_writer = await asyncio.open_connection(sock=upstream)
        except (OSError, TimeoutError):
            upstream.close()
            writer.transport.abort()
            return

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass

        tasks = [
            asyncio.create_task(copy(reader, up_writer)),
            asyncio.create_task(copy(up_reader, writer)),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            up_writer.transport.abort()
            writer.transport.abort()

    def close(self) -> None:
        if self._loop is not None and self._stopped is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(10)
        for listener in self._listeners:
            listener.close()


class EtcdLab:
    """One or three etcd members (and agent namespaces) on a LAN of namespaces."""

    def __init__(
        self,
        members: int = 3,
        *,
        subnet: str = "10.231.0",
        topology: Topology | None = None,
        healthy_timeout: float = 30.0,
    ) -> None:
        if members < 1:
            raise EtcdLabError("an etcd lab needs at least one member")
        self.size = members
        self.subnet = subnet
        self.healthy_timeout = healthy_timeout
        self._own_topology = topology is None
        self.topology: Topology = topology if topology is not None else _LabTopology()
        self.members: list[EtcdMember] = []
        self.agents: dict[str, Namespace] = {}
        self._relays: dict[str, _Relay] = {}
        self._next_host = 100
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    # --- lifecycle ------------------------------------------------------------------

    def __enter__(self) -> EtcdLab:
        binary = etcd_binary()
        if os.geteuid() != 0:
            raise EtcdLabError("the etcd lab needs root (network namespaces)")
        cleanup_stale()
        if self._own_topology:
            self.topology.__enter__()
        try:
            self._tmp = tempfile.TemporaryDirectory(prefix="kemari-etcd-")
            token = f"{self.topology.prefix}-etcd"
            ips = [f"{self.subnet}.{10 + i}" for i in range(self.size)]
            names = [f"etcd{i}" for i in range(self.size)]
            cluster = ",".join(
                f"{n}=http://{ip}:{PEER_PORT}" for n, ip in zip(names, ips, strict=True)
            )
            for name, ip in zip(names, ips, strict=True):
                namespace = self.topology.add_client(name, f"{ip}/24")
                data_dir = Path(self._tmp.name) / name
                argv = [
                    binary,
                    f"--name={name}",
                    f"--data-dir={data_dir}",
                    f"--listen-client-urls=http://{ip}:{CLIENT_PORT}",
                    f"--advertise-client-urls=http://{ip}:{CLIENT_PORT}",
                    f"--listen-peer-urls=http://{ip}:{PEER_PORT}",
                    f"--initial-advertise-peer-urls=http://{ip}:{PEER_PORT}",
                    f"--initial-cluster={cluster}",
                    f"--initial-cluster-token={token}",
                    "--initial-cluster-state=new",
                    "--logger=zap",
                    "--log-outputs=stderr",
                ]
                log_path = Path(self._tmp.name) / f"{name}.log"
                member = EtcdMember(name, namespace, ip, data_dir, log_path, argv)
                self.members.append(member)
            for member in self.members:
                self._start(member)
            self.wait_healthy()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop relays and members, delete the namespaces (if ours) and the data."""
        for relay in self._relays.values():
            relay.close()
        self._relays.clear()
        for member in self.members:
            self._stop(member)
        if self._own_topology:
            self.topology.cleanup()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _start(self, member: EtcdMember) -> None:
        if member.running:
            raise EtcdLabError(f"{member.name} is already running")
        member.log = member.log_path.open("ab")
        clean_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
        member.process = member.namespace.popen(
            member.argv, stdin=subprocess.DEVNULL, stdout=member.log, stderr=member.log,
            env=clean_env,
        )  # fmt: skip

    def _stop(self, member: EtcdMember, sig: int = signal.SIGTERM) -> None:
        if member.process is not None and member.process.poll() is None:
            member.process.send_signal(sig)
            try:
                member.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                member.process.kill()
                member.process.wait()
        if member.log is not None:
            member.log.close()
            member.log = None

    # --- addresses ------------------------------------------------------------------

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The members' client endpoints, as seen from a namespace on the LAN."""
        return tuple(member.endpoint for member in self.members)

    @property
    def uri(self) -> str:
        return "etcd://" + ",".join(self.endpoints)

    def member(self, name: str) -> EtcdMember:
        for member in self.members:
            if member.name == name:
                return member
        raise EtcdLabError(f"no etcd member {name!r}")

    def add_agent(self, name: str) -> Namespace:
        """A namespace on the LAN for an agent (next free address in the subnet)."""
        namespace = self.topology.add_client(name, f"{self.subnet}.{self._next_host}/24")
        self._next_host += 1
        self.agents[name] = namespace
        return namespace

    def local_endpoints(self, agent: str) -> tuple[str, ...]:
        """Loopback endpoints in this process's namespace that reach every member from
        ``agent``'s namespace (same order as :attr:`endpoints`)."""
        if agent not in self.agents:
            raise EtcdLabError(f"no agent namespace {agent!r} (add_agent first)")
        if agent not in self._relays:
            targets = [(member.ip, CLIENT_PORT) for member in self.members]
            self._relays[agent] = _Relay(self.agents[agent].name, targets)
        return tuple(f"127.0.0.1:{port}" for port in self._relays[agent].ports)

    # --- health and faults -----------------------------------------------------------

    def _http(self, member: EtcdMember, path: str, body: bytes | None = None) -> Any:
        def request() -> Any:
            url = f"http://{member.endpoint}{path}"
            with urllib.request.urlopen(url, data=body, timeout=1.0) as response:
                return json.loads(response.read())

        return run_in_netns(member.namespace.name, request)

    def healthy(self, member: EtcdMember) -> bool:
        """The member answers /health with a leader (a quorum read succeeded)."""
        if not member.running:
            return False
        try:
            return bool(self._http(member, "/health").get("health") == "true")
        except (OSError, ValueError):
            return False

    def wait_healthy(
        self, members: list[EtcdMember] | None = None, timeout: float | None = None
    ) -> float:
        """Wait until every running member (or ``members``) is healthy; seconds taken."""
        start = time.monotonic()
        deadline = start + (self.healthy_timeout if timeout is None else timeout)
        wanted = [m for m in self.members if m.running] if members is None else members
        while True:
            for member in wanted:
                if member.process is not None and member.process.poll() is not None:
                    raise EtcdLabError(
                        f"etcd member {member.name} exited {member.process.returncode}: "
                        f"{self.log_tail(member)}"
                    )
            if all(self.healthy(member) for member in wanted):
                return time.monotonic() - start
            if time.monotonic() > deadline:
                sick = [m.name for m in wanted if not self.healthy(m)]
                raise EtcdLabError(
                    f"etcd members {sick} not healthy after {deadline - start:.0f} s: "
                    f"{self.log_tail(self.member(sick[0]))}"
                )
            time.sleep(0.05)

    def leader(self) -> EtcdMember:
        """The member that is the Raft leader now (asked of a running member)."""
        for member in self.members:
            if not member.running:
                continue
            try:
                status = self._http(member, "/v3/maintenance/status", b"{}")
            except (OSError, ValueError):
                continue
            leader_id = int(status["leader"])
            for candidate in self.members:
                if candidate.running:
                    with contextlib.suppress(OSError, ValueError, KeyError):
                        own = self._http(candidate, "/v3/maintenance/status", b"{}")
                        if int(own["header"]["member_id"]) == leader_id:
                            return candidate
        raise EtcdLabError("no etcd member reports a leader")

    def kill(self, name: str) -> EtcdMember:
        """SIGKILL member ``name`` (its data stays for :meth:`restart`)."""
        member = self.member(name)
        self._stop(member, signal.SIGKILL)
        return member

    def restart(self, name: str, *, wait: bool = True) -> EtcdMember:
        """Start a stopped member again from its data directory."""
        member = self.member(name)
        member.argv = [a for a in member.argv if not a.startswith("--initial-cluster-state")]
        member.argv.append("--initial-cluster-state=existing")
        self._start(member)
        if wait:
            self.wait_healthy([member])
        return member

    def cut(self, name: str) -> None:
        """Take ``name``'s port on the LAN bridge down: its packets vanish."""
        self._port(name, "down")

    def heal(self, name: str) -> None:
        self._port(name, "up")

    def _port(self, name: str, state: str) -> None:
        assert self.topology.lan is not None
        run_ip("-n", self.topology.lan.name, "link", "set", f"to-{name}", state)

    def log_tail(self, member: EtcdMember, lines: int = 3) -> str:
        try:
            text = member.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:]) or "(empty log)"
