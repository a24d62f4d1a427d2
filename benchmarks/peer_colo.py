"""Records workload beside QEMU's own COLO: unprotected, Kemari and COLO in one table.

Every mode boots the ``records`` guest (``kemari image build``; 256 MiB, 1 vCPU, TCG) on
a fresh testbed LAN (kemari/testbed/topology.py: a primary and a standby host namespace
and a client namespace) with a fresh 64 MiB data disk, then runs two closed-loop loads
from the client namespace (kemari/testbed/records_load.py), ``--seconds`` each: 1 client
(sequential PUTs on one connection) and 16 clients on 16 connections.  Modes:

* ``unprotected``: one QEMU, the guest's NIC a tap on the primary's bridge, its disk a
  raw file.  The ratio column is relative to this row.
* ``kemari-alone``: ``kemari run`` without a standby (its event-tap releases at once).
* ``kemari``: ``kemari run`` and a standby ``kemari run --incoming``, default sync policy
  (as eventtap_records.py's protected modes), protection started with ``migrate -d``.
* ``colo-*``: QEMU's COLO as docs/COLO-FT.txt of QEMU 7.2 sets it up, with the same
  patched QEMU binary Kemari runs (``kemari qemu build``; Debian's QEMU hangs at the
  first COLO checkpoint under TCG, docs/qemu-patch.md) and the same guest and kernel
  command line.  The primary QEMU (primary namespace) has ``filter-mirror`` (guest-bound
  frames to the secondary), two ``filter-redirector`` and ``colo-compare`` on an iothread;
  the secondary QEMU (standby namespace, ``-incoming``) has two ``filter-redirector``
  (frames in from the primary, its guest's frames out to ``colo-compare``) and
  ``filter-rewriter``; both reach each other by chardev sockets over the LAN.  The data
  disk is replicated the COLO way: ``quorum`` over the raw image on the primary plus a
  ``replication`` child (mode primary) writing over NBD into the secondary's copy, and on
  the secondary ``quorum`` over a ``replication`` child (mode secondary) with qcow2
  active and hidden overlays (``qemu-img``) on its copy.  The primary starts paused
  (``-S``), so both disks are equal when the migration starts; COLO's initial sync then
  starts both guests, which boot side by side.  ``x-colo`` and ``migrate`` start it.

  ``stock``: migration over TCP and chardev sockets with QEMU's defaults.  QEMU 7.2
  never sets TCP_NODELAY on a migration socket, so the small COLO control messages of
  each checkpoint (REQUEST, REPLY, RECEIVED, LOADED) wait on Nagle's algorithm and the
  peer's delayed ACK.  ``nodelay``: the same without that stall, by stock means only:
  the migration channel is a unix socket (the two host namespaces share one kernel and
  file system, so a path-bound unix socket connects them; a unix socket has no Nagle
  algorithm) and every chardev socket gets QEMU's own ``nodelay=on``.  A unix socket
  rather than a TCP_NODELAY relay in this script: a relay would add a Python hop and its
  CPU to every checkpoint on 2 shared cores, and the point is COLO's own cost.
  Each at QEMU 7.2's default ``x-checkpoint-delay`` (20 s: checkpoints happen when
  ``colo-compare`` sees the guests' replies differ) and at 100 ms.

A COLO pair is checked with a few requests before it is measured (a pair whose
secondary packets never reach ``colo-compare`` answers each request only after a
checkpoint or the 3 s compare timeout); a pair failing the check is restarted, up to
``--attempts`` times, and every failed attempt is reported.

Printed, one row per mode and load: requests/s, ratio to unprotected, request latency
p50/p99 and max, stalls (requests that waited over 1 s for their reply: a lone stall moves
no percentile), checkpoints/s and guest pause p50/max during the load (COLO: the primary's
QMP STOP/RESUME events; Kemari: its status), and Kemari's output-commit p50/p99 (held ->
released, over the event-tap's last 4,096 outputs).  Needs root, the guest image, the
patched QEMU and ``qemu-img``.  Usage::

    .venv/bin/python benchmarks/peer_colo.py [--seconds 10] [--modes unprotected,kemari,...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from qemu.qmp import ConnectError, EventListener, QMPClient

from kemari.errors import KemariError
from kemari.image import default_image
from kemari.image.disk import create_data_disk
from kemari.qemu.build import patched_qemu
from kemari.testbed.topology import Namespace, Topology
from kemari.testbed.vm import AgentProcess
from kemari.testbed.wait import async_wait_for

GUEST_IP = "10.214.0.2"
PRIMARY_IP = "10.214.0.11"
STANDBY_IP = "10.214.0.12"
CLIENT_IP = "10.214.0.100"
GUEST_MAC = "52:54:00:e7:00:03"
KEMARI_PORT = 7100
MIGRATION_PORT = 9998
NBD_PORT = 9999
MIRROR_PORT = 9003
COMPARE_PORT = 9004
PRIMARY_IN = "host=127.0.0.1,port=9001"
COMPARE_OUT = "host=127.0.0.1,port=9005"
DISK_MIB = 64
MEMORY_MIB = 256
LOADS = (1, 16)  # clients
CHECK_REQUESTS = 5
CHECK_TIMEOUT_S = 2.0  # well under colo-compare's 3 s timeout, far over a prompt reply
PRIMARY_TAP = "kt-colo0"
SECONDARY_TAP = "kt-colo1"
BOOT_TIMEOUT_S = 300.0
QEMU_DEFAULT_DELAY_MS = 20_000  # QEMU 7.2's x-checkpoint-delay default
MAX_BANDWIDTH = 16 << 30  # as Kemari sets it: the initial sync unthrottled


# Protection numbers of one load, given its duration in seconds.
Sampler = Callable[[float], Awaitable[dict[str, Any]]]


class BenchError(KemariError):
    """A mode could not be set up or measured."""


class PairCheckFailed(BenchError):
    """A COLO pair did not answer the check requests promptly."""


@dataclasses.dataclass(frozen=True)
class ColoVariant:
    """How a COLO pair is wired: Nagle-free transport or not, and its checkpoint delay."""

    nodelay: bool
    delay_ms: int


MODES: dict[str, ColoVariant | str] = {
    "unprotected": "plain",
    "kemari-alone": "kemari-alone",
    "kemari": "kemari",
    "colo-stock-20s": ColoVariant(nodelay=False, delay_ms=QEMU_DEFAULT_DELAY_MS),
    "colo-stock-100ms": ColoVariant(nodelay=False, delay_ms=100),
    "colo-nodelay-20s": ColoVariant(nodelay=True, delay_ms=QEMU_DEFAULT_DELAY_MS),
    "colo-nodelay-100ms": ColoVariant(nodelay=True, delay_ms=100),
}


@dataclasses.dataclass
class LoadRow:
    """One mode under one load."""

    mode: str
    clients: int
    per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    stalls: int
    checkpoints_per_s: float | None = None
    pause_p50_ms: float | None = None
    pause_max_ms: float | None = None
    commit_p50_ms: float | None = None
    commit_p99_ms: float | None = None


@dataclasses.dataclass(frozen=True)
class Tools:
    """What every mode needs, found once before the first mode."""

    qemu: Path
    qemu_img: Path
    kernel: Path
    initrd: Path
    append: str


def find_tools() -> Tools:
    """The prerequisites; BenchError naming the first one missing."""
    if os.geteuid() != 0:
        raise BenchError("needs root (network namespaces, taps)")
    image = default_image()
    patched = patched_qemu()
    if patched is None:
        raise BenchError("the patched QEMU is not built: run kemari qemu build")
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise BenchError("qemu-img not found (COLO's disk overlays): install qemu-utils")
    append = f"console=ttyS0 kemari.workload=records kemari.ip={GUEST_IP}/24"
    return Tools(patched.binary, Path(qemu_img), image.kernel, image.initrd, append)


# ---------------------------------------------------------------- loads


async def run_load(client: Namespace, clients: int, seconds: float, check: bool) -> dict[str, Any]:
    """The records load from the client namespace; PairCheckFailed if its check failed."""
    command = [
        sys.executable, "-m", "kemari.testbed.records_load", GUEST_IP,
        "--clients", str(clients), "--seconds", str(seconds),
    ]  # fmt: skip
    if check:
        command += ["--check", str(CHECK_REQUESTS), "--check-timeout", str(CHECK_TIMEOUT_S)]
    process = await asyncio.create_subprocess_exec(
        *client.argv(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        async with asyncio.timeout(seconds + 300):
            out, err = await process.communicate()
    except TimeoutError as exc:
        process.kill()
        await process.wait()
        raise BenchError(f"the {clients}-client load did not finish") from exc
    message = err.decode(errors="replace").strip()
    if process.returncode != 0:
        if message.startswith("records_load: check"):
            raise PairCheckFailed(message)
        raise BenchError(f"the {clients}-client load failed: {message}")
    result: dict[str, Any] = json.loads(out)
    return result


async def wait_for_service(client: Namespace) -> None:
    """Until the guest's records service accepts connections from the client namespace."""
    command = [sys.executable, "-m", "kemari.testbed.records", GUEST_IP, "wait"]
    process = await asyncio.create_subprocess_exec(
        *client.argv(command), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, err = await process.communicate()
    if process.returncode != 0:
        raise BenchError(err.decode(errors="replace").strip())


def new_lab(lab: Topology) -> tuple[Namespace, Namespace, Namespace]:
    """The primary and standby host namespaces and the client namespace."""
    return (
        lab.add_host("primary", f"{PRIMARY_IP}/24"),
        lab.add_host("standby", f"{STANDBY_IP}/24"),
        lab.add_client("client", f"{CLIENT_IP}/24"),
    )


# ---------------------------------------------------------------- QEMU processes


class Qemu:
    """One QEMU started in a namespace, with its QMP client and a STOP/RESUME listener."""

    def __init__(self, label: str, namespace: Namespace, argv: list[str], workdir: Path) -> None:
        self.label = label
        self.qmp_path = workdir / f"{label}-qmp.sock"
        self.serial_log = workdir / f"{label}-serial.log"
        self.output_log = workdir / f"{label}-qemu.log"
        self._output: TextIO = self.output_log.open("w")
        full = [
            *argv, "-name", f"guest={label}",
            "-chardev", f"socket,id=qmp,path={self.qmp_path},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
            "-chardev", f"file,id=serial0,path={self.serial_log}", "-serial", "chardev:serial0",
        ]  # fmt: skip
        self.process = namespace.popen(full, stdout=self._output, stderr=subprocess.STDOUT)
        self.qmp = QMPClient(label)
        self.pauses = EventListener(("STOP", "RESUME"))
        self.pause_events: list[tuple[str, float]] = []  # (name, QEMU's timestamp in s)
        self._collector: asyncio.Task[None] | None = None

    async def connect(self, timeout_s: float = 60.0) -> None:
        """Connect QMP once QEMU listens (it may first wait for a chardev peer)."""

        async def connected() -> bool:
            self._check_alive()
            if not self.qmp_path.exists():
                return False
            try:
                await self.qmp.connect(str(self.qmp_path))
            except ConnectError:  # not listening yet
                return False
            return True

        await async_wait_for(connected, f"{self.label}'s QMP", timeout_s, interval=0.2)
        self.qmp.register_listener(self.pauses)
        self._collector = asyncio.create_task(self._collect_pauses())

    async def _collect_pauses(self) -> None:
        async for event in self.pauses:
            message: dict[str, Any] = dict(event)
            stamp = message["timestamp"]
            moment = stamp["seconds"] + stamp["microseconds"] / 1e6
            self.pause_events.append((message["event"], moment))

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        self._check_alive()
        return await self.qmp.execute(command, arguments)

    async def hmp(self, command_line: str) -> None:
        """A human-monitor command; BenchError if it printed an error."""
        reply = await self.execute("human-monitor-command", {"command-line": command_line})
        if reply.strip() not in ("", "OK"):
            raise BenchError(f"{self.label}: {command_line!r} answered {reply.strip()!r}")

    def serial_text(self) -> str:
        try:
            return self.serial_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    async def wait_serial(self, text: str, timeout_s: float = BOOT_TIMEOUT_S) -> None:
        def appeared() -> bool:
            self._check_alive()
            return text in self.serial_text()

        await async_wait_for(
            appeared,
            f"{text!r} on {self.label}'s console",
            timeout_s,
            interval=0.2,
            detail=lambda: f"console tail {self.serial_text()[-600:]!r}",
        )

    def drain_pauses(self) -> list[tuple[str, float]]:
        """The STOP/RESUME events received since the last drain."""
        events, self.pause_events = self.pause_events, []
        return events

    def _check_alive(self) -> None:
        if self.process.poll() is not None:
            tail = self.output_log.read_text(errors="replace")[-800:]
            raise BenchError(f"{self.label} QEMU exited ({self.process.returncode}): {tail}")

    async def close(self) -> None:
        if self._collector is not None:
            self._collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._collector
        if self.qmp.runstate.name == "RUNNING":
            self.qmp.remove_listener(self.pauses)
            await self.qmp.disconnect()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._output.close()


def pause_stats(events: Sequence[tuple[str, float]], seconds: float) -> dict[str, float | None]:
    """Checkpoints/s and pause p50/max from STOP -> RESUME pairs."""
    pauses: list[float] = []
    stopped: float | None = None
    for name, stamp in events:
        if name == "STOP":
            stopped = stamp
        elif stopped is not None:
            pauses.append((stamp - stopped) * 1000)
            stopped = None
    return {
        "checkpoints_per_s": len(pauses) / seconds,
        "pause_p50_ms": statistics.median(pauses) if pauses else None,
        "pause_max_ms": max(pauses) if pauses else None,
    }


def base_argv(tools: Tools) -> list[str]:
    """The machine both COLO sides and the unprotected QEMU share."""
    return [
        str(tools.qemu), "-nodefaults", "-nographic", "-display", "none",
        "-accel", "tcg", "-m", f"{MEMORY_MIB}M", "-smp", "1", "-machine", "pc",
        "-kernel", str(tools.kernel), "-initrd", str(tools.initrd), "-append", tools.append,
    ]  # fmt: skip


def nic_argv(tap: str) -> list[str]:
    return [
        "-netdev", f"tap,id=hn0,ifname={tap},script=no,downscript=no,vhost=off",
        "-device", f"virtio-net-pci,netdev=hn0,mac={GUEST_MAC},id=vnet0",
    ]  # fmt: skip


def add_tap(namespace: Namespace, tap: str, bridge: str | None) -> None:
    namespace.run(["ip", "tuntap", "add", "dev", tap, "mode", "tap"])
    if bridge is not None:
        namespace.run(["ip", "link", "set", tap, "master", bridge])
    namespace.run(["ip", "link", "set", tap, "up"])


# ---------------------------------------------------------------- modes


async def measure_loads(
    mode: str, client: Namespace, seconds: float, check: bool, sample: Sampler | None
) -> list[LoadRow]:
    """Both loads (the first checked if ``check``); ``sample(elapsed)`` adds the
    protection numbers of each."""
    rows = []
    for clients in LOADS:
        started = time.monotonic()
        load = await run_load(client, clients, seconds, check=check and clients == LOADS[0])
        extra = {} if sample is None else await sample(time.monotonic() - started)
        measured = {key: load[key] for key in ("per_s", "p50_ms", "p99_ms", "max_ms", "stalls")}
        rows.append(LoadRow(mode, clients, **measured, **extra))
    return rows


async def run_plain(tools: Tools, seconds: float, workdir: Path) -> list[LoadRow]:
    with Topology() as lab:
        primary_ns, _, client = new_lab(lab)
        disk = workdir / "plain.img"
        create_data_disk(disk, DISK_MIB)
        add_tap(primary_ns, PRIMARY_TAP, "br0")
        argv = [
            *base_argv(tools), *nic_argv(PRIMARY_TAP),
            "-drive", f"if=none,id=disk0,file={disk},format=raw",
            "-device", "virtio-blk-pci,drive=disk0,id=vdisk0",
        ]  # fmt: skip
        qemu = Qemu("plain", primary_ns, argv, workdir)
        try:
            await qemu.connect()
            await qemu.wait_serial("workload records ready")
            await wait_for_service(client)

            return await measure_loads("unprotected", client, seconds, False, None)
        finally:
            await qemu.close()


async def run_kemari(mode: str, tools: Tools, seconds: float, workdir: Path) -> list[LoadRow]:
    with Topology() as lab:
        primary_ns, standby_ns, client = new_lab(lab)
        disk = workdir / f"{mode}.img"
        create_data_disk(disk, DISK_MIB)
        args = [
            "--workload", "records", "--accel", "tcg", "--guest-ip", f"{GUEST_IP}/24",
            "--disk", str(disk), "--nic", f"mac={GUEST_MAC},tap={PRIMARY_TAP},bridge=br0",
        ]  # fmt: skip
        replica = Path(f"/dev/shm/kemari-peer-colo-{os.getpid()}")
        agents = [AgentProcess("peer", workdir, args, namespace=primary_ns, label=f"{mode}-p")]
        try:
            primary = agents[0]
            await asyncio.to_thread(primary.wait_serial, r"workload records ready")
            await asyncio.to_thread(primary.wait_monitor)
            if mode == "kemari":
                uri = f"kemari:tcp:{STANDBY_IP}:{KEMARI_PORT}"
                incoming = ["--incoming", uri, "--replica-dir", str(replica)]
                standby = AgentProcess(
                    "peer", workdir, [*args, *incoming], namespace=standby_ns, label=f"{mode}-s"
                )
                agents.append(standby)
                await asyncio.to_thread(standby.wait_monitor)
                primary.monitor("migrate", "-d", uri)
                await async_wait_for(
                    lambda: primary.status()["protection"] == "protected", "protection", 180
                )
            await wait_for_service(client)
            before = primary.status()

            async def sample(elapsed: float) -> dict[str, Any]:
                nonlocal before
                after = primary.status()
                tap = after["eventtap"]
                numbers: dict[str, Any] = {}
                if after["replication"]:
                    recent = after["replication"]["recent"]
                    epochs = [
                        s["replication"]["epoch"] if s["replication"] else 0
                        for s in (before, after)
                    ]
                    numbers = {
                        "checkpoints_per_s": (epochs[1] - epochs[0]) / elapsed,
                        "pause_p50_ms": recent.get("pause_ms_p50"),
                        "pause_max_ms": recent.get("pause_ms_max"),
                        "commit_p50_ms": tap["latency_ms_p50"],
                        "commit_p99_ms": tap["latency_ms_p99"],
                    }
                before = after
                return numbers

            return await measure_loads(mode, client, seconds, False, sample)
        finally:
            for agent in agents:
                agent.stop()
            shutil.rmtree(replica, ignore_errors=True)


class ColoPair:
    """A primary and a secondary QEMU wired for COLO on one testbed (docs/COLO-FT.txt)."""

    def __init__(
        self, tools: Tools, variant: ColoVariant, workdir: Path, lab: Topology, label: str
    ) -> None:
        self.tools = tools
        self.variant = variant
        self.workdir = workdir
        self.primary_ns, self.standby_ns, self.client = new_lab(lab)
        self.label = label
        self.primary: Qemu | None = None
        self.secondary: Qemu | None = None

    def _disks(self) -> tuple[Path, Path, Path, Path]:
        """The primary's image, the secondary's copy and its active and hidden overlays."""
        primary = self.workdir / f"{self.label}-primary.img"
        create_data_disk(primary, DISK_MIB)
        copy = self.workdir / f"{self.label}-secondary.img"
        shutil.copyfile(primary, copy)
        overlays = []
        for name in ("active", "hidden"):
            overlay = self.workdir / f"{self.label}-{name}.qcow2"
            subprocess.run(
                [str(self.tools.qemu_img), "create", "-q", "-f", "qcow2", str(overlay),
                 f"{DISK_MIB}M"],
                check=True, capture_output=True,
            )  # fmt: skip
            overlays.append(overlay)
        return primary, copy, overlays[0], overlays[1]

    def _incoming(self) -> str:
        if self.variant.nodelay:
            return f"unix:{self.workdir / f'{self.label}-migration.sock'}"
        return f"tcp:{STANDBY_IP}:{MIGRATION_PORT}"

    async def start(self) -> None:
        """Start both QEMUs, wire the disk replication, start COLO and wait for the guest."""
        primary_disk, copy, active, hidden = self._disks()
        nodelay = ",nodelay=on" if self.variant.nodelay else ""
        add_tap(self.primary_ns, PRIMARY_TAP, "br0")
        add_tap(self.standby_ns, SECONDARY_TAP, None)  # its frames go by the redirectors only
        quorum = "driver=quorum,read-pattern=fifo,vote-threshold=1"
        primary_argv = [
            *base_argv(self.tools), *nic_argv(PRIMARY_TAP),
            "-chardev", f"socket,id=mirror0,host={PRIMARY_IP},port={MIRROR_PORT},"
                        f"server=on,wait=off{nodelay}",
            "-chardev", f"socket,id=compare1,host={PRIMARY_IP},port={COMPARE_PORT},"
                        f"server=on,wait=on{nodelay}",
            # Loops inside the primary: its guest's frames into colo-compare, and out.
            "-chardev", f"socket,id=compare0,{PRIMARY_IN},server=on,wait=off{nodelay}",
            "-chardev", f"socket,id=compare0-0,{PRIMARY_IN}{nodelay}",
            "-chardev", f"socket,id=compare_out,{COMPARE_OUT},server=on,wait=off{nodelay}",
            "-chardev", f"socket,id=compare_out0,{COMPARE_OUT}{nodelay}",
            "-object", "filter-mirror,id=m0,netdev=hn0,queue=tx,outdev=mirror0",
            "-object", "filter-redirector,id=redire0,netdev=hn0,queue=rx,indev=compare_out",
            "-object", "filter-redirector,id=redire1,netdev=hn0,queue=rx,outdev=compare0",
            "-object", "iothread,id=iothread1",
            "-object", "colo-compare,id=comp0,primary_in=compare0-0,secondary_in=compare1,"
                       "outdev=compare_out0,iothread=iothread1",
            "-drive", f"if=none,id=colo-disk0,{quorum},"
                      f"children.0.file.filename={primary_disk},children.0.driver=raw",
            "-device", "virtio-blk-pci,drive=colo-disk0,id=vdisk0",
            "-S",
        ]  # fmt: skip
        secondary_argv = [
            *base_argv(self.tools), *nic_argv(SECONDARY_TAP),
            "-chardev", f"socket,id=red0,host={PRIMARY_IP},port={MIRROR_PORT},reconnect=1{nodelay}",
            "-chardev", f"socket,id=red1,host={PRIMARY_IP},port={COMPARE_PORT},"
                        f"reconnect=1{nodelay}",
            "-object", "filter-redirector,id=f1,netdev=hn0,queue=tx,indev=red0",
            "-object", "filter-redirector,id=f2,netdev=hn0,queue=rx,outdev=red1",
            "-object", "filter-rewriter,id=rew0,netdev=hn0,queue=all",
            "-drive", f"if=none,id=parent0,file.filename={copy},driver=raw",
            "-drive", "if=none,id=childs0,driver=replication,mode=secondary,file.driver=qcow2,"
                      f"top-id=colo-disk0,file.file.filename={active},file.backing.driver=qcow2,"
                      f"file.backing.file.filename={hidden},file.backing.backing=parent0",
            "-drive", f"if=none,id=colo-disk0,{quorum},children.0=childs0",
            "-device", "virtio-blk-pci,drive=colo-disk0,id=vdisk0",
            "-incoming", self._incoming(),
        ]  # fmt: skip
        self.primary = Qemu(f"{self.label}-p", self.primary_ns, primary_argv, self.workdir)
        self.secondary = Qemu(f"{self.label}-s", self.standby_ns, secondary_argv, self.workdir)
        await self.secondary.connect()
        await self.primary.connect()
        await self.secondary.execute(
            "nbd-server-start",
            {"addr": {"type": "inet", "data": {"host": STANDBY_IP, "port": str(NBD_PORT)}}},
        )
        await self.secondary.execute("nbd-server-add", {"device": "parent0", "writable": True})
        await self.primary.hmp(
            "drive_add -n buddy driver=replication,mode=primary,file.driver=nbd,"
            f"file.host={STANDBY_IP},file.port={NBD_PORT},file.export=parent0,"
            "node-name=replication0"
        )
        await self.primary.execute(
            "x-blockdev-change", {"parent": "colo-disk0", "node": "replication0"}
        )
        await self.primary.execute(
            "migrate-set-capabilities", {"capabilities": [{"capability": "x-colo", "state": True}]}
        )
        await self.primary.execute(
            "migrate-set-parameters",
            {"x-checkpoint-delay": self.variant.delay_ms, "max-bandwidth": MAX_BANDWIDTH},
        )
        await self.primary.execute("migrate", {"uri": self._incoming()})
        primary = self.primary

        async def colo_running() -> bool:
            status = (await primary.execute("query-migrate")).get("status")
            if status in ("failed", "cancelled"):
                raise BenchError(f"COLO migration {status}")
            return bool(status == "colo")

        await async_wait_for(colo_running, "COLO to start", 180, interval=0.2)
        secondary = self.secondary

        async def secondary_running() -> bool:
            colo = await secondary.execute("query-colo-status")
            status = await secondary.execute("query-status")
            return bool(colo["mode"] == "secondary" and status["status"] == "running")

        # The secondary's console is no witness: each checkpoint replaces its guest's
        # state with the primary's, so it may skip the ready line the primary printed.
        await async_wait_for(secondary_running, "the secondary to run in COLO", 60, interval=0.2)
        await self.primary.wait_serial("workload records ready")
        await wait_for_service(self.client)

    async def sample(self, elapsed: float) -> dict[str, Any]:
        """Checkpoints/s and pauses since the last sample, from the primary's events."""
        assert self.primary is not None
        return pause_stats(self.primary.drain_pauses(), elapsed)

    async def close(self) -> None:
        for qemu in (self.primary, self.secondary):
            if qemu is not None:
                await qemu.close()


async def run_colo(
    mode: str, variant: ColoVariant, tools: Tools, seconds: float, workdir: Path, attempts: int
) -> tuple[list[LoadRow], list[str]]:
    """Both loads on a checked pair; also the failed attempts' reasons."""
    failures: list[str] = []
    for attempt in range(1, attempts + 1):
        with Topology() as lab:
            pair = ColoPair(tools, variant, workdir, lab, f"{mode}-{attempt}")
            try:
                await pair.start()
                assert pair.primary is not None
                pair.primary.drain_pauses()  # boot-time checkpoints are not the load's
                rows = await measure_loads(mode, pair.client, seconds, True, pair.sample)
                return rows, failures
            except PairCheckFailed as exc:
                failures.append(f"{mode} attempt {attempt}: {exc}")
                print(f"{failures[-1]}; restarting the pair", file=sys.stderr, flush=True)
            finally:
                await pair.close()
    raise BenchError(f"{mode}: no pair passed the check in {attempts} attempts: {failures}")


# ---------------------------------------------------------------- table


def cell(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(rows: list[LoadRow]) -> None:
    base = {row.clients: row.per_s for row in rows if row.mode == "unprotected"}
    print(
        "| mode | clients | requests/s | ratio | latency p50 / p99 / max ms | stalls > 1 s "
        "| checkpoints/s | pause p50 / max ms | output-commit p50 / p99 ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in sorted(rows, key=lambda r: r.clients):
        ratio = f"{row.per_s / base[row.clients]:.2f}" if base.get(row.clients) else "-"
        print(
            f"| {row.mode} | {row.clients} | {row.per_s:.0f} | {ratio} "
            f"| {cell(row.p50_ms)} / {cell(row.p99_ms)} / {cell(row.max_ms)} | {row.stalls} "
            f"| {cell(row.checkpoints_per_s)} "
            f"| {cell(row.pause_p50_ms)} / {cell(row.pause_max_ms)} "
            f"| {cell(row.commit_p50_ms)} / {cell(row.commit_p99_ms)} |"
        )


async def run(modes: list[str], seconds: float, attempts: int) -> int:
    tools = find_tools()
    workdir = Path(tempfile.mkdtemp(prefix="kemari-peer-colo-"))
    rows: list[LoadRow] = []
    notes: list[str] = []
    try:
        for mode in modes:
            kind = MODES[mode]
            if isinstance(kind, ColoVariant):
                mode_rows, failures = await run_colo(mode, kind, tools, seconds, workdir, attempts)
                notes += failures
            elif kind == "plain":
                mode_rows = await run_plain(tools, seconds, workdir)
            else:
                mode_rows = await run_kemari(mode, tools, seconds, workdir)
            for row in mode_rows:
                print(json.dumps(dataclasses.asdict(row)), file=sys.stderr, flush=True)
            rows += mode_rows
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(rows)
    for note in notes:
        print(f"\nrestarted: {note}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="time per load")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated modes")
    parser.add_argument("--attempts", type=int, default=3, help="COLO pairs tried per mode")
    args = parser.parse_args()
    modes = args.modes.split(",")
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    if args.seconds <= 0 or args.attempts < 1:
        parser.error("--seconds must be > 0 and --attempts >= 1")

    def terminated(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # unwinds through every cleanup

    signal.signal(signal.SIGTERM, terminated)
    try:
        return asyncio.run(run(modes, args.seconds, args.attempts))
    except KeyboardInterrupt:
        print("peer_colo: interrupted; everything started was stopped", file=sys.stderr)
        return 130
    except (KemariError, OSError) as exc:
        print(f"peer_colo: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
