"""A typed description of a QEMU machine and the argv it becomes.

:class:`MachineSpec` is validated when it is built (any bad value is a
:class:`~kemari.errors.ConfigError`), and :func:`build_argv` is a pure function
of it.  The machine is always an i440FX ``pc`` with ``-nodefaults``: only the
devices listed here exist, so the primary and a failover QEMU built from the
same spec have identical device models at identical PCI addresses (devices are
added in list order), which migration requires.

Option values given to QEMU's ``key=value`` parsers have every comma doubled,
which is QEMU's escape, so any path or export name survives intact.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from pathlib import Path

from kemari.errors import ConfigError
from kemari.qemu.accel import Accel

MACHINE_TYPE = "pc"
# The RAM block of a ``pc`` machine is called "pc.ram"; a memory backend with
# this id keeps that name, so a QEMU mapping guest RAM from a file and a QEMU
# with anonymous RAM migrate into each other.
RAM_BACKEND_ID = "pc.ram"
MIN_MEMORY_MIB = 16
MAX_MEMORY_MIB = 1 << 20
MAX_VCPUS = 255  # the i440FX ``pc`` machine's limit
# sun_path is 108 bytes including the terminating NUL.
MAX_UNIX_SOCKET_PATH_BYTES = 107
MAX_NBD_EXPORT_NAME_BYTES = 4096
# Descriptors 0-2 are QEMU's stdin/stdout/stderr, which QemuMachine redirects.
MIN_INHERITED_FD = 3
MAX_INHERITED_FD = (1 << 31) - 1

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9-]{1,63})*$")


@dataclasses.dataclass(frozen=True)
class NbdDisk:
    """A virtio-blk disk backed by an NBD export on a unix socket (served by Kemari)."""

    socket: Path
    export: str
    read_only: bool = False


@dataclasses.dataclass(frozen=True)
class StreamNic:
    """A virtio-net NIC whose frames travel over a ``-netdev stream`` connection.

    Exactly one of ``socket`` (QEMU connects to a listener on that unix path) and ``fd``
    (QEMU uses a connected socket it inherits as that descriptor number; QemuMachine
    passes it) is set.
    """

    mac: str
    socket: Path | None = None
    fd: int | None = None


@dataclasses.dataclass(frozen=True)
class MemoryFile:
    """Guest RAM in a file (``memory-backend-file``); ``share`` lets others map it too."""

    path: Path
    share: bool = True


@dataclasses.dataclass(frozen=True)
class IncomingDefer:
    """``-incoming defer``: wait for QMP ``migrate-incoming`` to say where from."""


@dataclasses.dataclass(frozen=True)
class IncomingUnix:
    """``-incoming unix:PATH``: QEMU listens on a unix socket for the migration stream."""

    path: Path


@dataclasses.dataclass(frozen=True)
class IncomingTcp:
    """``-incoming tcp:HOST:PORT``: QEMU listens on TCP for the migration stream."""

    host: str
    port: int


Incoming = IncomingDefer | IncomingUnix | IncomingTcp


@dataclasses.dataclass(frozen=True)
class MachineSpec:
    """Everything QEMU is told on its command line; valid by construction."""

    name: str
    accel: Accel
    qmp_socket: Path
    memory_mib: int = 256
    vcpus: int = 1
    bios: Path | None = None  # firmware ROM (e.g. qboot.rom); None: QEMU's SeaBIOS
    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    disks: tuple[NbdDisk, ...] = ()
    nics: tuple[StreamNic, ...] = ()
    serial_log: Path | None = None
    no_reboot: bool = True
    start_paused: bool = False
    memory_file: MemoryFile | None = None
    incoming: Incoming | None = None

    def __post_init__(self) -> None:
        validate_spec(self)


def validate_spec(spec: MachineSpec) -> None:
    """Raise :class:`ConfigError` for the first invalid value of ``spec``."""
    if not isinstance(spec.name, str) or not _NAME_RE.match(spec.name):
        raise ConfigError(
            f"machine name {spec.name!r} must be 1-64 characters of letters, digits, "
            "'.', '_' and '-', starting with a letter or digit"
        )
    if spec.accel not in ("kvm", "tcg"):
        raise ConfigError(f"accel {spec.accel!r} must be resolved to kvm or tcg")
    _check_int("memory", spec.memory_mib, MIN_MEMORY_MIB, MAX_MEMORY_MIB, "MiB")
    _check_int("vcpus", spec.vcpus, 1, MAX_VCPUS, "")
    _check_socket_path("qmp socket", spec.qmp_socket)
    if spec.bios is not None:
        _check_path("bios", spec.bios)
    if spec.kernel is None:
        if spec.initrd is not None:
            raise ConfigError("initrd given without a kernel")
        if spec.append:
            raise ConfigError("kernel command line given without a kernel")
    else:
        _check_path("kernel", spec.kernel)
    if spec.initrd is not None:
        _check_path("initrd", spec.initrd)
    if "\0" in spec.append:
        raise ConfigError("kernel command line contains a NUL byte")
    for index, disk in enumerate(spec.disks):
        _check_disk(index, disk)
    if len({(d.socket, d.export) for d in spec.disks}) != len(spec.disks):
        raise ConfigError("two disks use the same NBD socket and export")
    for index, nic in enumerate(spec.nics):
        _check_nic(index, nic)
    if len({nic.mac.lower() for nic in spec.nics}) != len(spec.nics):
        raise ConfigError("two NICs share a MAC address")
    sockets = [nic.socket for nic in spec.nics if nic.socket is not None]
    if len(set(sockets)) != len(sockets):
        raise ConfigError("two NICs share a stream socket")
    fds = [nic.fd for nic in spec.nics if nic.fd is not None]
    if len(set(fds)) != len(fds):
        raise ConfigError("two NICs share a stream socket descriptor")
    if spec.serial_log is not None:
        _check_path("serial log", spec.serial_log)
    if spec.memory_file is not None:
        _check_path("memory file", spec.memory_file.path)
    if spec.incoming is not None:
        _check_incoming(spec.incoming)


def _check_int(what: str, value: object, low: int, high: int, unit: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{what}: expected an integer, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{what}: {value}{unit} is outside {low}..{high}{unit}")


def _check_path(what: str, path: object) -> None:
    if not isinstance(path, Path):
        raise ConfigError(f"{what}: expected a path, got {path!r}")
    text = str(path)
    if text in ("", ".") or "\0" in text:
        raise ConfigError(f"{what}: {text!r} is not a usable path")


def _check_socket_path(what: str, path: object) -> None:
    _check_path(what, path)
    size = len(str(path).encode())
    if size > MAX_UNIX_SOCKET_PATH_BYTES:
        raise ConfigError(
            f"{what}: {path} is {size} bytes, longer than a unix socket path may be "
            f"({MAX_UNIX_SOCKET_PATH_BYTES})"
        )


def _check_disk(index: int, disk: NbdDisk) -> None:
    _check_socket_path(f"disk[{index}] NBD socket", disk.socket)
    if not isinstance(disk.export, str) or "\0" in disk.export:
        raise ConfigError(f"disk[{index}]: export name {disk.export!r} is not a valid string")
    if len(disk.export.encode()) > MAX_NBD_EXPORT_NAME_BYTES:
        raise ConfigError(
            f"disk[{index}]: export name is longer than {MAX_NBD_EXPORT_NAME_BYTES} bytes"
        )


def _check_nic(index: int, nic: StreamNic) -> None:
    if not isinstance(nic.mac, str) or not _MAC_RE.match(nic.mac):
        raise ConfigError(f"nic[{index}]: MAC {nic.mac!r} is not like 52:54:00:12:34:56")
    if int(nic.mac[:2], 16) & 1:
        raise ConfigError(f"nic[{index}]: MAC {nic.mac} is a multicast address")
    if int(nic.mac.replace(":", ""), 16) == 0:
        raise ConfigError(f"nic[{index}]: MAC {nic.mac} is all zeros")
    if (nic.socket is None) == (nic.fd is None):
        raise ConfigError(f"nic[{index}]: give exactly one of a stream socket path and an fd")
    if nic.socket is not None:
        _check_socket_path(f"nic[{index}] stream socket", nic.socket)
    else:
        _check_int(f"nic[{index}] stream fd", nic.fd, MIN_INHERITED_FD, MAX_INHERITED_FD, "")


def _check_incoming(incoming: Incoming) -> None:
    if isinstance(incoming, IncomingUnix):
        _check_socket_path("incoming socket", incoming.path)
    elif isinstance(incoming, IncomingTcp):
        _check_int("incoming port", incoming.port, 1, 65535, "")
        if not _is_ip_address(incoming.host) and not _HOSTNAME_RE.match(incoming.host):
            raise ConfigError(f"incoming host {incoming.host!r} is not an address or hostname")


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def escape_option_value(value: str) -> str:
    """Escape a value for QEMU's ``key=value,...`` option parsers (a comma becomes two)."""
    return value.replace(",", ",,")


def _options(head: str, values: dict[str, str]) -> str:
    """``head,key=value,...`` with every value escaped (keys are our own constants)."""
    return ",".join([head] + [f"{key}={escape_option_value(v)}" for key, v in values.items()])


def disk_node_name(index: int) -> str:
    """The block node name of disk ``index`` (stable: QMP commands refer to it)."""
    return f"disk{index}"


def netdev_id(index: int) -> str:
    """The netdev id of NIC ``index`` (stable: QMP commands refer to it)."""
    return f"net{index}"


def inherited_fds(spec: MachineSpec) -> tuple[int, ...]:
    """The descriptors QEMU must inherit for ``spec`` (its NICs' stream sockets)."""
    return tuple(nic.fd for nic in spec.nics if nic.fd is not None)


def _stream_address(nic: StreamNic) -> dict[str, str]:
    """The ``addr.*`` options of a stream netdev (QEMU 7.2 ``SocketAddress``).

    With ``addr.type=fd`` a client netdev takes the descriptor as it is: QEMU 7.2's
    net_stream_client_init -> qio_channel_socket_connect_async -> socket_connect ->
    socket_get_fd parses the number (no monitor is current on the connect thread, nor
    during command-line parsing), checks it is a socket and does not connect() it.
    """
    if nic.fd is not None:
        return {"addr.type": "fd", "addr.str": str(nic.fd)}
    return {"addr.type": "unix", "addr.path": str(nic.socket)}


def incoming_uri(incoming: Incoming) -> str:
    """The ``-incoming`` argument for ``incoming``."""
    if isinstance(incoming, IncomingDefer):
        return "defer"
    if isinstance(incoming, IncomingUnix):
        return f"unix:{incoming.path}"
    host = incoming.host
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    return f"tcp:{host}:{incoming.port}"


def build_argv(spec: MachineSpec) -> list[str]:
    """The QEMU arguments (without the program) that realize ``spec``."""
    machine = MACHINE_TYPE
    argv = ["-name", f"guest={spec.name}", "-nodefaults", "-nographic", "-display", "none"]
    argv += ["-accel", spec.accel, "-m", f"{spec.memory_mib}M", "-smp", str(spec.vcpus)]
    if spec.memory_file is not None:
        # The backend must exist before the machine refers to it by id.
        argv += [
            "-object",
            _options(
                "memory-backend-file",
                {
                    "id": RAM_BACKEND_ID,
                    "size": f"{spec.memory_mib}M",
                    "mem-path": str(spec.memory_file.path),
                    "share": "on" if spec.memory_file.share else "off",
                },
            ),
        ]
        machine = f"{machine},memory-backend={RAM_BACKEND_ID}"
    argv += ["-machine", machine]
    argv += [
        "-chardev",
        _options(
            "socket", {"id": "qmp", "path": str(spec.qmp_socket), "server": "on", "wait": "off"}
        ),
        "-mon",
        "chardev=qmp,mode=control",
    ]
    if spec.serial_log is not None:
        argv += [
            "-chardev",
            _options("file", {"id": "serial0", "path": str(spec.serial_log)}),
            "-serial",
            "chardev:serial0",
        ]
    if spec.bios is not None:
        argv += ["-bios", str(spec.bios)]
    if spec.kernel is not None:
        argv += ["-kernel", str(spec.kernel)]
        if spec.initrd is not None:
            argv += ["-initrd", str(spec.initrd)]
        if spec.append:
            argv += ["-append", spec.append]
    for index, disk in enumerate(spec.disks):
        node = disk_node_name(index)
        argv += [
            "-blockdev",
            _options(
                "driver=nbd",
                {
                    "server.type": "unix",
                    "server.path": str(disk.socket),
                    "export": disk.export,
                    "node-name": node,
                    "read-only": "on" if disk.read_only else "off",
                },
            ),
            "-device",
            f"virtio-blk-pci,drive={node},id=v{node}",
        ]
    for index, nic in enumerate(spec.nics):
        netdev = netdev_id(index)
        argv += [
            "-netdev",
            _options("stream", {"id": netdev, "server": "off", **_stream_address(nic)}),
            "-device",
            f"virtio-net-pci,netdev={netdev},mac={nic.mac.lower()},id=v{netdev}",
        ]
    if spec.no_reboot:
        argv.append("-no-reboot")
    if spec.start_paused:
        argv.append("-S")
    if spec.incoming is not None:
        argv += ["-incoming", incoming_uri(spec.incoming)]
    return argv
