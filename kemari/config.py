"""The VM configuration: one typed, validated description of a protected VM.

A configuration comes from a TOML file, from ``kemari run`` flags, or both (flags
win).  Everything is validated here, before any process or socket exists, so a
bad value is one clear :class:`~kemari.errors.ConfigError` and nothing to clean up.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import ipaddress
import json
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kemari.errors import ConfigError


class _Choice(enum.Enum):
    """A setting with a fixed set of names; :meth:`parse` names the choices on a bad one."""

    @classmethod
    def parse(cls, text: str, what: str) -> Any:
        """The member named ``text``; ConfigError naming ``what`` and the choices otherwise."""
        try:
            return cls(text)
        except ValueError as exc:
            choices = ", ".join(member.value for member in cls)
            raise ConfigError(f"{what}: {text!r} is not one of {choices}") from exc

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every member's name, in definition order (for CLI choices)."""
        return tuple(member.value for member in cls)


class Accel(_Choice):
    """Which accelerator to ask for (``auto`` decides per host: kemari/qemu/accel.py)."""

    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


class SyncPolicy(_Choice):
    """What causes a checkpoint (the seed's "synchronization points").

    * ``event``: the first held output requests a checkpoint at once; outputs that
      arrive while a checkpoint is in flight are tagged with the next one and wait for
      it (event queuing).  Without output there is no checkpoint (QEMU's timer is set
      to :data:`EVENT_ONLY_EPOCH_MS`).
    * ``periodic``: QEMU's own timer every ``epoch_ms`` (``x-checkpoint-delay``),
      Remus-like; outputs wait for the next tick.
    * ``event+periodic``: both; the timer bounds how much dirty memory a checkpoint
      carries when the guest computes without output.
    """

    EVENT = "event"
    PERIODIC = "periodic"
    EVENT_PERIODIC = "event+periodic"

    @property
    def on_output(self) -> bool:
        """A held output requests a checkpoint."""
        return self is not SyncPolicy.PERIODIC

    def qemu_epoch_ms(self, epoch_ms: int) -> int:
        """The ``x-checkpoint-delay`` QEMU gets for a (validated) epoch of ``epoch_ms``."""
        return EVENT_ONLY_EPOCH_MS if self is SyncPolicy.EVENT else epoch_ms


class StorageMode(_Choice):
    """Where the standby's disks come from (docs/storage.md)."""

    SHARED = "shared"  # both hosts open one image; the standby keeps the last held writes
    REPLICATED = "replicated"  # each host has its own image, equal at every committed epoch


class PageCompression(_Choice):
    """How the primary sends page data to the standby (docs/protocol.md, "Page compression").

    * ``off``: pages travel as QEMU sent them (the default: on a fast link the
      compression costs more pause than the bytes it saves, see docs/checkpoint.md).
    * ``zstd``: the primary offers the ``zstd-pages`` capability; when the standby
      agrees, each RAM_PAGES frame whose pages compress by at least 1/8 travels as one
      zstd frame.  Host-local: the standby always accepts it, so the hosts may differ.
    """

    OFF = "off"
    ZSTD = "zstd"


# QEMU's checkpoint timer under the pure event policy: one hour, i.e. practically never.
EVENT_ONLY_EPOCH_MS = 3_600_000
MIN_EPOCH_MS = 1
MAX_EPOCH_MS = 600_000
DEFAULT_EPOCH_MS = 100
DEFAULT_SYNC = SyncPolicy.EVENT_PERIODIC
# Held guest frames: 32 MiB by default.  The count bound scales with the byte bound at
# 1 KiB per frame: full-size frames (1514 bytes) meet the byte bound first, and a flood
# of minimum frames (60 bytes + ~230 bytes of bookkeeping each) meets the count bound
# before its bookkeeping costs more than about a quarter of the byte bound.
DEFAULT_HELD_FRAMES_BYTES = 32 << 20
# Checkpoints captured but not yet acknowledged while the guest runs on (0: the guest
# waits for every acknowledgement); docs/checkpoint.md, "Pipelining and event queuing".
DEFAULT_CHECKPOINTS_IN_FLIGHT = 3
MAX_CHECKPOINTS_IN_FLIGHT = 16
HELD_FRAME_BYTES_PER_COUNT = 1024
WORKLOADS = ("ticks", "records", "diskload", "shell")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,19}$")
_MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_SIZE_RE = re.compile(r"^(\d+)\s*([KMGT]?)(i?B)?$", re.IGNORECASE)
_SIZE_UNITS = {"": 1 << 20, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
MIN_MEMORY_MIB = 64
MAX_MEMORY_MIB = 1 << 20
MAX_VCPUS = 64
# Bounds of held_frames_max (the network event-tap's held-frame memory, in bytes).
MIN_HELD_FRAMES_BYTES = 64 << 10
MAX_HELD_FRAMES_BYTES = 1 << 40


TLS_FILES = (
    "ca-cert.pem",
    "server-cert.pem",
    "server-key.pem",
    "client-cert.pem",
    "client-key.pem",
)
_TLS_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_TLS_NAME_RE = re.compile(rf"^{_TLS_LABEL}(\.{_TLS_LABEL})*$")


@dataclasses.dataclass(frozen=True)
class TlsCreds:
    """x509 credentials of the replication channel, in QEMU's directory layout.

    ``directory`` holds ``ca-cert.pem`` (the CA both hosts trust), ``server-cert.pem`` /
    ``server-key.pem`` (presented by the standby) and ``client-cert.pem`` /
    ``client-key.pem`` (presented by the primary).  Both certificates must carry
    ``peer_name`` as a DNS subjectAltName (``kemari-<vm name>`` unless ``tls_name`` says
    otherwise), so certificates of another VM pair under the same CA are refused.
    """

    directory: Path
    peer_name: str

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca-cert.pem"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server-cert.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server-key.pem"

    @property
    def client_cert(self) -> Path:
        return self.directory / "client-cert.pem"

    @property
    def client_key(self) -> Path:
        return self.directory / "client-key.pem"

    def check(self) -> None:
        """ConfigError unless the directory exists and every file in it is readable."""
        if not self.directory.is_dir():
            raise ConfigError(f"tls_creds: {self.directory} is not a directory")
        for name in TLS_FILES:
            path = self.directory / name
            if not path.is_file():
                raise ConfigError(
                    f"tls_creds: {path} is missing (make the files with `kemari pki`)"
                )
            try:
                with path.open("rb") as handle:
                    handle.read(1)
            except OSError as exc:
                raise ConfigError(f"tls_creds: {path} is not readable: {exc.strerror}") from exc
        if not _TLS_NAME_RE.match(self.peer_name):
            raise ConfigError(f"tls_name: {self.peer_name!r} is not a valid DNS name")


def tls_name_for(vm_name: str) -> str:
    """The default name both certificates of a VM pair carry: ``kemari-<vm name>``."""
    return f"kemari-{vm_name}"


# Automatic failover (docs/ha.md).  The lease TTL: a killed etcd leader stalled renewals
# for up to 2.8 s (docs/ha.md, "Measured"); the holder's lease is valid only until
# TTL - margin (0.5 s) after its last renewal was sent, so the TTL must exceed 2.8 + 0.5 s
# for an unprotected active not to fence itself during an election: 5 s leaves room,
# and costs at most TTL + 0.5 s of extra takeover time in shared storage mode only.
DEFAULT_HA_LEASE_TTL_S = 5
# How long the standby waits without any frame from the active before it declares the
# active lost; the active sends a HEARTBEAT after a quarter of this without sending.
DEFAULT_HA_DETECT_MS = 500
MIN_HA_DETECT_MS = 100
MAX_HA_DETECT_MS = 10_000
ETCD_DEFAULT_PORT = 2379


def parse_etcd_uri(uri: str) -> tuple[str, ...]:
    """``etcd://HOST[:PORT],HOST[:PORT],...`` → endpoints ``("HOST:PORT", ...)``.

    With more than one endpoint every host must be an IPv4 address (gRPC's ``ipv4:``
    target); one endpoint may be a host name.  The arbiter's own parser
    (``kemari.ha.arbiter.parse_arbiter_uri``) is this one.
    """
    scheme = "etcd://"
    if not uri.startswith(scheme) or len(uri) == len(scheme):
        raise ConfigError(f"arbiter {uri!r}: expected etcd://HOST[:PORT][,HOST[:PORT]...]")
    endpoints = []
    for part in uri[len(scheme) :].rstrip("/").split(","):
        host, sep, port = part.partition(":")
        if not host or (sep and not port.isdigit()) or (port and not 0 < int(port) < 65536):
            raise ConfigError(f"arbiter {uri!r}: invalid endpoint {part!r}")
        endpoints.append(f"{host}:{port or ETCD_DEFAULT_PORT}")
    if len(endpoints) > 1:
        for endpoint in endpoints:
            octets = endpoint.rpartition(":")[0].split(".")
            if len(octets) != 4 or not all(o.isdigit() and int(o) < 256 for o in octets):
                raise ConfigError(
                    f"arbiter {uri!r}: with several endpoints each must be an IPv4 address"
                )
    return tuple(endpoints)


@dataclasses.dataclass(frozen=True)
class HaConfig:
    """``ha = "etcd://..."``: the etcd arbiter decides who is active (docs/ha.md)."""

    uri: str
    endpoints: tuple[str, ...]
    lease_ttl_s: int = DEFAULT_HA_LEASE_TTL_S
    detect_ms: int = DEFAULT_HA_DETECT_MS

    @property
    def detect_s(self) -> float:
        return self.detect_ms / 1000


def _ha_from(raw: Mapping[str, Any]) -> HaConfig | None:
    """``ha`` absent or ``"manual"``: None (failover by the operator's command)."""
    extra = [key for key in ("ha_lease_ttl", "ha_detect_ms") if key in raw]
    uri = _expect(raw, "ha", str, "") if "ha" in raw else "manual"
    if uri == "manual":
        if extra:
            raise ConfigError(f'{extra[0]}: given without ha = "etcd://..."')
        return None
    ttl = _expect(raw, "ha_lease_ttl", int, "") if "ha_lease_ttl" in raw else None
    detect = _expect(raw, "ha_detect_ms", int, "") if "ha_detect_ms" in raw else None
    return HaConfig(
        uri=uri,
        endpoints=parse_etcd_uri(uri),
        lease_ttl_s=DEFAULT_HA_LEASE_TTL_S if ttl is None else ttl,
        detect_ms=DEFAULT_HA_DETECT_MS if detect is None else detect,
    )


@dataclasses.dataclass(frozen=True)
class DiskConfig:
    """A raw image file that Kemari serves to the guest over NBD (virtio-blk)."""

    path: Path
    read_only: bool = False


@dataclasses.dataclass(frozen=True)
class NicConfig:
    """A virtio-net NIC whose frames Kemari carries to a host tap device."""

    mac: str
    tap: str
    bridge: str | None = None


@dataclasses.dataclass(frozen=True)
class VMConfig:
    """Everything Kemari needs to run one VM; immutable once validated."""

    name: str
    memory_mib: int = 256
    vcpus: int = 1
    accel: Accel = Accel.AUTO
    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    workload: str | None = None
    guest_ip: str | None = None
    disks: tuple[DiskConfig, ...] = ()
    nics: tuple[NicConfig, ...] = ()
    monitor: Path | None = None
    serial_log: Path | None = None
    runtime_dir: Path | None = None
    incoming: str | None = None
    replica_dir: Path | None = None
    # When checkpoints happen: host-local, not in the digest.
    sync: SyncPolicy = DEFAULT_SYNC
    epoch_ms: int = DEFAULT_EPOCH_MS
    # shared: both hosts open the same image; replicated: each host has its own copy.
    storage: StorageMode = StorageMode.SHARED
    # Bytes of guest frames held before the network path stops reading QEMU (back-pressure):
    # host-local (not guest-visible), so not in the digest.
    held_frames_max_bytes: int = DEFAULT_HELD_FRAMES_BYTES
    # How page data travels to the standby: host-local (the standby accepts either), so
    # not in the digest.
    page_compression: PageCompression = PageCompression.OFF
    # How many checkpoints may travel while the guest runs on: host-local, not in the digest.
    checkpoints_in_flight: int = DEFAULT_CHECKPOINTS_IN_FLIGHT
    # Replication channel credentials (host-local paths, not in the digest); None means
    # plain TCP, which the agents announce loudly (docs/security.md).
    tls_creds: TlsCreds | None = None
    # None: manual failover (the operator's `failover`); else the etcd arbiter's settings.
    ha: HaConfig | None = None

    @property
    def held_frames_max_count(self) -> int:
        """The held-frame count bound that goes with ``held_frames_max_bytes``."""
        return max(1, self.held_frames_max_bytes // HELD_FRAME_BYTES_PER_COUNT)

    @property
    def qemu_epoch_ms(self) -> int:
        """QEMU's ``x-checkpoint-delay`` for this VM's sync policy and epoch."""
        return self.sync.qemu_epoch_ms(self.epoch_ms)

    @property
    def uses_built_image(self) -> bool:
        """True when kernel/initrd come from ``kemari image build`` (no kernel given)."""
        return self.kernel is None

    def kernel_command_line(self) -> str:
        """The guest kernel command line: console, Kemari guest options, then ``append``."""
        parts = ["console=ttyS0"]
        if self.workload is not None:
            parts.append(f"kemari.workload={self.workload}")
        if self.guest_ip is not None:
            parts.append(f"kemari.ip={self.guest_ip}")
        if self.append:
            parts.append(self.append)
        return " ".join(parts)

    def resolved_runtime_dir(self) -> Path:
        """Where this VM's sockets live: ``runtime_dir`` or ``/run/kemari/NAME``."""
        return self.runtime_dir if self.runtime_dir is not None else Path("/run/kemari") / self.name

    def resolved_monitor(self) -> Path:
        """The Kemari monitor socket path."""
        if self.monitor is not None:
            return self.monitor
        return self.resolved_runtime_dir() / "monitor.sock"

    def resolved_replica_dir(self) -> Path:
        """Where the standby keeps the replica: ``replica_dir`` or ``/dev/shm/kemari/NAME``.

        tmpfs by default: a commit then costs no disk flush, and the replica survives
        a crash of the agent (what it must survive), not of the host (where nothing of
        the standby survives anyway).
        """
        if self.replica_dir is not None:
            return self.replica_dir
        return Path("/dev/shm/kemari") / self.name

    def resolved_serial_log(self) -> Path:
        """The file receiving the guest serial console."""
        if self.serial_log is not None:
            return self.serial_log
        return self.resolved_runtime_dir() / "serial.log"

    def replication_digest(self) -> bytes:
        """SHA-256 over what must be identical on the active and the standby host.

        The guest-visible machine (memory, vCPUs, kernel command line, the kernel and
        initrd by content, the number and kind of disks, NIC MAC addresses) must match
        for a replica to be loadable, and both hosts must agree on the storage mode;
        host-local things (paths, sockets, tap and bridge names, the accelerator) may
        differ between hosts and are left out.
        """
        guest_visible = {
            "name": self.name,
            "memory_mib": self.memory_mib,
            "vcpus": self.vcpus,
            "append": self.kernel_command_line(),
            "built_image": self.uses_built_image,
            "kernel_sha256": self._boot_file_digests[0],
            "initrd_sha256": self._boot_file_digests[1],
            "disks": [disk.read_only for disk in self.disks],
            "nics": [nic.mac for nic in self.nics],
            "storage": self.storage.value,
        }
        return hashlib.sha256(json.dumps(guest_visible, sort_keys=True).encode()).digest()

    @functools.cached_property
    def _boot_file_digests(self) -> tuple[str | None, str | None]:
        """SHA-256 of the given kernel and initrd (read once; the built image: None)."""
        return _file_digest(self.kernel, "kernel"), _file_digest(self.initrd, "initrd")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-able) form, e.g. for status output and config comparison."""

        def plain(value: Any) -> Any:
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, enum.Enum):
                return value.value
            if isinstance(value, tuple):
                return [plain(item) for item in value]
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
            return value

        result: dict[str, Any] = plain(self)
        return result


def _file_digest(path: Path | None, what: str) -> str | None:
    if path is None:
        return None
    try:
        with path.open("rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from exc


def parse_size_bytes(value: object, what: str) -> int:
    """Parse ``256``, ``"64K"``, ``"256M"``, ``"1G"`` or ``"1GiB"`` into bytes (bare numbers
    are MiB)."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a size like 256M or 1G, got {value!r}")
    if isinstance(value, int):
        number, unit = value, ""
    elif isinstance(value, str) and (match := _SIZE_RE.match(value.strip())):
        number, unit = int(match.group(1)), match.group(2).upper()
    else:
        raise ConfigError(f"{what}: expected a size like 256M or 1G, got {value!r}")
    return number * _SIZE_UNITS[unit]


def parse_size_mib(value: object, what: str) -> int:
    """Parse ``256``, ``"256M"``, ``"1G"`` or ``"1GiB"`` into MiB (bare numbers are MiB)."""
    size_bytes = parse_size_bytes(value, what)
    if size_bytes % (1 << 20):
        raise ConfigError(f"{what}: {value!r} is not a whole number of MiB")
    return size_bytes >> 20


def _expect(raw: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = raw[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}{key}: expected {_kind_name(kind)}, got {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "a string", int: "an integer", bool: "true or false", list: "a list"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _check_keys(raw: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"{where}unknown key(s): {', '.join(unknown)}")


def _disk_from(raw: object, index: int) -> DiskConfig:
    where = f"disk[{index}]."
    if not isinstance(raw, Mapping):
        raise ConfigError(f"disk[{index}]: expected a table with 'path'")
    _check_keys(raw, {"path", "read_only"}, where)
    if "path" not in raw:
        raise ConfigError(f"{where}path: missing")
    path = Path(_expect(raw, "path", str, where))
    read_only = bool(_expect(raw, "read_only", bool, where)) if "read_only" in raw else False
    return DiskConfig(path=path, read_only=read_only)


def _nic_from(raw: object, index: int, vm_name: str) -> NicConfig:
    where = f"nic[{index}]."
    if not isinstance(raw, Mapping):
        raise ConfigError(f"nic[{index}]: expected a table with 'mac'")
    _check_keys(raw, {"mac", "tap", "bridge"}, where)
    mac = _default_mac(vm_name, index)
    if "mac" in raw:
        mac = str(_expect(raw, "mac", str, where)).lower()
    tap = str(_expect(raw, "tap", str, where)) if "tap" in raw else f"kt-{vm_name[:9]}-{index}"
    bridge = str(_expect(raw, "bridge", str, where)) if "bridge" in raw else None
    return NicConfig(mac=mac, tap=tap, bridge=bridge)


def _default_mac(vm_name: str, index: int) -> str:
    """A stable locally administered MAC derived from the VM name and NIC index."""
    digest = sum((i + 1) * ord(c) for i, c in enumerate(vm_name)) & 0xFFFF
    return f"52:54:00:{digest >> 8:02x}:{digest & 0xFF:02x}:{index & 0xFF:02x}"


def config_from_mapping(raw: Mapping[str, Any]) -> VMConfig:
    """Build and validate a :class:`VMConfig` from plain data (a parsed TOML document)."""
    allowed = {
        "name", "memory", "vcpus", "accel", "kernel", "initrd", "append", "workload",
        "guest_ip", "disk", "nic", "monitor", "serial_log", "runtime_dir", "incoming",
        "replica_dir", "sync", "epoch_ms", "storage", "held_frames_max", "tls_creds",
        "tls_name", "ha", "ha_lease_ttl", "ha_detect_ms", "page_compression",
        "checkpoints_in_flight",
    }  # fmt: skip
    _check_keys(raw, allowed, "")
    if "name" not in raw:
        raise ConfigError("name: missing (every VM needs a name)")
    name = _expect(raw, "name", str, "")
    optional_paths = {
        key: Path(_expect(raw, key, str, ""))
        for key in ("kernel", "initrd", "monitor", "serial_log", "runtime_dir", "replica_dir")
        if key in raw
    }
    disks = raw.get("disk", [])
    nics = raw.get("nic", [])
    if not isinstance(disks, list) or not isinstance(nics, list):
        raise ConfigError("disk and nic must be arrays of tables ([[disk]], [[nic]])")
    config = VMConfig(
        name=name,
        memory_mib=parse_size_mib(raw["memory"], "memory") if "memory" in raw else 256,
        vcpus=_expect(raw, "vcpus", int, "") if "vcpus" in raw else 1,
        accel=Accel.parse(_expect(raw, "accel", str, ""), "accel")
        if "accel" in raw
        else Accel.AUTO,
        append=_expect(raw, "append", str, "") if "append" in raw else "",
        workload=_expect(raw, "workload", str, "") if "workload" in raw else None,
        guest_ip=_expect(raw, "guest_ip", str, "") if "guest_ip" in raw else None,
        incoming=_expect(raw, "incoming", str, "") if "incoming" in raw else None,
        sync=SyncPolicy.parse(_expect(raw, "sync", str, ""), "sync")
        if "sync" in raw
        else DEFAULT_SYNC,
        epoch_ms=_expect(raw, "epoch_ms", int, "") if "epoch_ms" in raw else DEFAULT_EPOCH_MS,
        storage=StorageMode.parse(_expect(raw, "storage", str, ""), "storage")
        if "storage" in raw
        else StorageMode.SHARED,
        held_frames_max_bytes=parse_size_bytes(raw["held_frames_max"], "held_frames_max")
        if "held_frames_max" in raw
        else DEFAULT_HELD_FRAMES_BYTES,
        page_compression=PageCompression.parse(
            _expect(raw, "page_compression", str, ""), "page_compression"
        )
        if "page_compression" in raw
        else PageCompression.OFF,
        checkpoints_in_flight=_expect(raw, "checkpoints_in_flight", int, "")
        if "checkpoints_in_flight" in raw
        else DEFAULT_CHECKPOINTS_IN_FLIGHT,
        disks=tuple(_disk_from(d, i) for i, d in enumerate(disks)),
        nics=tuple(_nic_from(n, i, name) for i, n in enumerate(nics)),
        tls_creds=_tls_from(raw, name),
        ha=_ha_from(raw),
        **optional_paths,
    )
    validate(config)
    return config


def _tls_from(raw: Mapping[str, Any], vm_name: str) -> TlsCreds | None:
    tls_name = _expect(raw, "tls_name", str, "") if "tls_name" in raw else None
    if "tls_creds" not in raw:
        if tls_name is not None:
            raise ConfigError("tls_name: given without tls_creds")
        return None
    directory = _expect(raw, "tls_creds", str, "")
    return TlsCreds(Path(directory), tls_name if tls_name is not None else tls_name_for(vm_name))


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML config file into plain data (validated later by :func:`config_from_mapping`)."""
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from exc


def validate(config: VMConfig) -> None:
    """Check every value and every cross-field rule; raise :class:`ConfigError` on the first."""
    if not _NAME_RE.match(config.name):
        raise ConfigError(
            f"name: {config.name!r} must be 1-20 characters of a-z, 0-9 and '-', "
            "starting with a letter or digit"
        )
    if not MIN_MEMORY_MIB <= config.memory_mib <= MAX_MEMORY_MIB:
        raise ConfigError(f"memory: {config.memory_mib} MiB is outside {MIN_MEMORY_MIB}M..1T")
    if not 1 <= config.vcpus <= MAX_VCPUS:
        raise ConfigError(f"vcpus: {config.vcpus} is outside 1..{MAX_VCPUS}")
    if config.workload is not None and config.workload not in WORKLOADS:
        raise ConfigError(f"workload: {config.workload!r} is not one of {', '.join(WORKLOADS)}")
    if config.guest_ip is not None:
        try:
            ipaddress.IPv4Interface(config.guest_ip)
        except ValueError as exc:
            raise ConfigError(f"guest_ip: {config.guest_ip!r} is not ADDRESS/PREFIX") from exc
        if "/" not in config.guest_ip:
            raise ConfigError(f"guest_ip: {config.guest_ip!r} needs a prefix, e.g. /24")
    if not MIN_EPOCH_MS <= config.epoch_ms <= MAX_EPOCH_MS:
        raise ConfigError(f"epoch_ms: {config.epoch_ms} is outside {MIN_EPOCH_MS}..{MAX_EPOCH_MS}")
    if not 0 <= config.checkpoints_in_flight <= MAX_CHECKPOINTS_IN_FLIGHT:
        raise ConfigError(
            f"checkpoints_in_flight: {config.checkpoints_in_flight} is outside "
            f"0..{MAX_CHECKPOINTS_IN_FLIGHT}"
        )
    if not MIN_HELD_FRAMES_BYTES <= config.held_frames_max_bytes <= MAX_HELD_FRAMES_BYTES:
        raise ConfigError(
            f"held_frames_max: {config.held_frames_max_bytes} bytes is outside 64K..1T"
        )
    if config.incoming is not None and not config.incoming.startswith("kemari:tcp:"):
        raise ConfigError(f"incoming: {config.incoming!r} is not kemari:tcp:HOST:PORT")
    if config.tls_creds is not None:
        config.tls_creds.check()
    if config.ha is not None:
        if config.incoming is None:
            raise ConfigError(
                'ha: needs incoming = "kemari:tcp:HOST:PORT" (the address this agent '
                "listens on and publishes when it is the standby)"
            )
        if not 2 <= config.ha.lease_ttl_s <= 60:
            raise ConfigError(f"ha_lease_ttl: {config.ha.lease_ttl_s} s is outside 2..60")
        if not MIN_HA_DETECT_MS <= config.ha.detect_ms <= MAX_HA_DETECT_MS:
            raise ConfigError(
                f"ha_detect_ms: {config.ha.detect_ms} is outside "
                f"{MIN_HA_DETECT_MS}..{MAX_HA_DETECT_MS}"
            )
    if config.initrd is not None and config.kernel is None:
        raise ConfigError("initrd: given without a kernel")
    for what, boot_file in (("kernel", config.kernel), ("initrd", config.initrd)):
        if boot_file is None or boot_file.is_file():
            continue
        if boot_file.is_dir():
            raise ConfigError(f"{what}: {boot_file} is a directory, not a file")
        if boot_file.exists():
            raise ConfigError(f"{what}: {boot_file} is not a regular file")
        raise ConfigError(f"{what}: {boot_file} does not exist")
    for index, disk in enumerate(config.disks):
        if not disk.path.is_file():
            raise ConfigError(f"disk[{index}].path: {disk.path} is not an existing image file")
    seen_paths = [disk.path.resolve() for disk in config.disks]
    if len(set(seen_paths)) != len(seen_paths):
        raise ConfigError("disk: the same image is given twice")
    for index, nic in enumerate(config.nics):
        if not _MAC_RE.match(nic.mac):
            raise ConfigError(f"nic[{index}].mac: {nic.mac!r} is not a MAC like 52:54:00:12:34:56")
        if int(nic.mac[:2], 16) & 1:
            raise ConfigError(f"nic[{index}].mac: {nic.mac} is a multicast address")
        if not _IFNAME_RE.match(nic.tap):
            raise ConfigError(f"nic[{index}].tap: {nic.tap!r} is not a valid interface name")
        if nic.bridge is not None and not _IFNAME_RE.match(nic.bridge):
            raise ConfigError(f"nic[{index}].bridge: {nic.bridge!r} is not a valid interface name")
    if len({nic.mac for nic in config.nics}) != len(config.nics):
        raise ConfigError("nic: two NICs share a MAC address")
    if len({nic.tap for nic in config.nics}) != len(config.nics):
        raise ConfigError("nic: two NICs share a tap name")
