"""Network-namespace topologies for tests and the demo: a LAN, hosts and clients.

Layout (every box is a network namespace; names carry the run's prefix)::

    client ns            lan ns                       host ns
    eth0 (ip) ---- veth ---- lan0 (bridge) ---- veth ---- uplink -- br0 (bridge, optional ip)
                                                                    `-- Kemari's tap

A host namespace looks like a real hypervisor host: its own ``br0`` bridge with
an uplink into the LAN, so Kemari running inside it attaches its tap to ``br0``.
Interface names are local to each namespace, so they are fixed and short
(``lan0``, ``br0``, ``uplink``, ``eth0``, ``to-NAME``); only namespace names
carry the unique prefix ``kt-PID-RANDOM``.  The root namespace is never
changed: veth pairs are created directly inside their namespaces.  The testbed
is IPv4-only (IPv6 is disabled in its namespaces so no stray router
solicitations or DAD frames cross the bridges).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from kemari.errors import NetError
from kemari.net.tap import run_ip

FAMILY = "kt"
LAN_BRIDGE = "lan0"
HOST_BRIDGE = "br0"
HOST_UPLINK = "uplink"
CLIENT_IFACE = "eth0"
_MEMBER_NAME = re.compile(r"[a-z][a-z0-9]{0,9}")
_STALE_NAME = re.compile(rf"{FAMILY}-(\d+)-[0-9a-f]+-")
_NETNS_DIR = Path("/run/netns")


def _interface_address(ip: str) -> ipaddress.IPv4Interface:
    try:
        address = ipaddress.IPv4Interface(ip)
    except ValueError as exc:
        raise NetError(f"invalid IPv4 address {ip!r}: {exc}") from exc
    if "/" not in ip:
        raise NetError(f"address {ip!r} needs a prefix length, e.g. {ip}/24")
    return address


class Namespace:
    """One network namespace of a :class:`Topology`; runs commands inside it."""

    def __init__(
        self, topology: Topology, name: str, address: ipaddress.IPv4Interface | None
    ) -> None:
        self._topology = topology
        self.name = name
        self.address = address

    @property
    def ip(self) -> str | None:
        """The namespace's IPv4 address without prefix length, if it has one."""
        return None if self.address is None else str(self.address.ip)

    def argv(self, command: Sequence[str]) -> list[str]:
        """``command`` wrapped to run inside this namespace."""
        return ["ip", "netns", "exec", self.name, *command]

    def run(
        self, command: Sequence[str], *, check: bool = True, timeout: float | None = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` inside the namespace and wait; a failure raises NetError."""
        try:
            return subprocess.run(
                self.argv(command), check=check, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.CalledProcessError as exc:
            raise NetError(
                f"in {self.name}: {' '.join(command)} exited {exc.returncode}: "
                f"{(exc.stderr or exc.stdout).strip()}"
            ) from exc
        except subprocess.TimeoutExpired as exc:
            raise NetError(f"in {self.name}: {' '.join(command)} timed out") from exc

    def popen(self, command: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``command`` inside the namespace; the topology stops it on cleanup."""
        process: subprocess.Popen[Any] = subprocess.Popen(self.argv(command), **kwargs)
        self._topology._processes.append(process)
        return process


class Topology:
    """A LAN bridge namespace plus hosts and clients; everything is removed on exit."""

    def __init__(self) -> None:
        self.prefix = f"{FAMILY}-{os.getpid()}-{secrets.token_hex(2)}"
        self.lan: Namespace | None = None
        self.members: dict[str, Namespace] = {}
        self._namespaces: list[str] = []
        self._processes: list[subprocess.Popen[Any]] = []

    def __enter__(self) -> Topology:
        if os.geteuid() != 0:
            raise NetError("the network testbed needs root (network namespaces)")
        try:
            self.lan = self._add_namespace("lan", None)
            run_ip("-n", self.lan.name, "link", "add", LAN_BRIDGE, "type", "bridge")
            run_ip("-n", self.lan.name, "link", "set", LAN_BRIDGE, "up")
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.cleanup()

    def add_host(self, name: str, ip: str | None = None) -> Namespace:
        """A hypervisor-like host: ``br0`` bridged to the LAN, ``ip`` (CIDR) on ``br0``."""
        address = None if ip is None else _interface_address(ip)
        host = self._add_member(name, address)
        run_ip("-n", host.name, "link", "add", HOST_BRIDGE, "type", "bridge")
        self._link_to_lan(name, host, HOST_UPLINK)
        run_ip("-n", host.name, "link", "set", HOST_UPLINK, "master", HOST_BRIDGE)
        if address is not None:
            run_ip("-n", host.name, "addr", "add", str(address), "dev", HOST_BRIDGE)
        run_ip("-n", host.name, "link", "set", HOST_BRIDGE, "up")
        return host

    def add_client(self, name: str, ip: str) -> Namespace:
        """A client machine: ``eth0`` with ``ip`` (CIDR) plugged into the LAN."""
        address = _interface_address(ip)
        client = self._add_member(name, address)
        self._link_to_lan(name, client, CLIENT_IFACE)
        run_ip("-n", client.name, "addr", "add", str(address), "dev", CLIENT_IFACE)
        return client

    def cleanup(self) -> None:
        """Stop processes started in the namespaces, then delete every namespace."""
        for process in self._processes:
            _stop_process(process)
        self._processes.clear()
        for name in reversed(self._namespaces):
            _delete_namespace(name)
        self._namespaces.clear()
        self.members.clear()
        self.lan = None

    def _add_member(self, name: str, address: ipaddress.IPv4Interface | None) -> Namespace:
        if self.lan is None:
            raise NetError("use the topology inside a 'with' block")
        if not _MEMBER_NAME.fullmatch(name):
            raise NetError(
                f"invalid member name {name!r}: 1-10 of [a-z0-9], starting with a letter"
            )
        if name in self.members or name == "lan":
            raise NetError(f"the topology already has a member named {name!r}")
        member = self._add_namespace(name, address)
        self.members[name] = member
        return member

    def _add_namespace(self, role: str, address: ipaddress.IPv4Interface | None) -> Namespace:
        name = f"{self.prefix}-{role}"
        run_ip("netns", "add", name)
        self._namespaces.append(name)
        namespace = Namespace(self, name, address)
        # Before any interface exists, so "default" covers every interface made later.
        namespace.run(
            [
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ]
        )
        run_ip("-n", name, "link", "set", "lo", "up")
        return namespace

    def _link_to_lan(self, name: str, member: Namespace, member_iface: str) -> None:
        assert self.lan is not None
        port = f"to-{name}"
        run_ip(
            "-n", self.lan.name, "link", "add", port, "type", "veth",
            "peer", "name", member_iface, "netns", member.name,
        )  # fmt: skip
        run_ip("-n", self.lan.name, "link", "set", port, "master", LAN_BRIDGE)
        run_ip("-n", self.lan.name, "link", "set", port, "up")
        run_ip("-n", member.name, "link", "set", member_iface, "up")


def _stop_process(process: subprocess.Popen[Any]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _delete_namespace(name: str) -> None:
    # Processes left inside (e.g. from a killed run) would keep its interfaces alive.
    listing = subprocess.run(
        ["ip", "netns", "pids", name], check=False, capture_output=True, text=True
    )
    pids = listing.stdout
    for pid in pids.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    with contextlib.suppress(NetError):
        run_ip("netns", "delete", name)
    if (_NETNS_DIR / name).exists():
        raise NetError(f"could not delete network namespace {name}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(prefix: str = f"{FAMILY}-") -> list[str]:
    """Delete testbed namespaces starting with ``prefix`` whose creating process is gone.

    Returns the deleted names.  Namespaces of a live run are left alone, so this
    is safe to call while other test runs are in progress.
    """
    if not _NETNS_DIR.is_dir():
        return []
    deleted: list[str] = []
    for entry in sorted(_NETNS_DIR.iterdir()):
        match = _STALE_NAME.match(entry.name)
        if not entry.name.startswith(prefix) or match is None:
            continue
        if _process_alive(int(match.group(1))):
            continue
        _delete_namespace(entry.name)
        deleted.append(entry.name)
    return deleted
