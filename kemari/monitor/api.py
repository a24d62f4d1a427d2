"""The monitor's typed API: every command, every reply and the status are dataclasses.

A request line's words are parsed once, here, into a :data:`Command`
(:func:`parse_command`); the agent answers with a :data:`Reply`; the wire carries
the reply as plain JSON (:func:`to_plain`) next to its human text
(``kemari.monitor.render``).  Programs read the JSON: ``query-status`` (or
``info status --json``) returns a :class:`Status`, documented field by field in
docs/status.md, and :func:`from_plain` turns that JSON back into a :class:`Status`.

Nothing here knows the agent: the roles fill these dataclasses in, the monitor
renders and transports them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

from kemari.errors import ConfigError, MonitorError

# -- commands -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Help:
    """``help``: list the monitor commands."""


@dataclasses.dataclass(frozen=True, slots=True)
class InfoStatus:
    """``info status [--json]``: the status for people (or, with ``--json``, as JSON text)."""

    json: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class QueryStatus:
    """``query-status``: the status for programs (its text is the same JSON)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Quit:
    """``quit``: stop the VM and the agent."""


@dataclasses.dataclass(frozen=True, slots=True)
class Failover:
    """``failover``: standby only: start the VM from the committed replica."""


@dataclasses.dataclass(frozen=True, slots=True)
class Migrate:
    """``migrate [-d] kemari:tcp:HOST:PORT``: protect the running VM with a standby.

    ``detach`` is ``-d``; the agent treats both alike (the CLI stays and draws the
    initial sync without ``-d``).
    """

    uri: str
    detach: bool = True


@dataclasses.dataclass(frozen=True, slots=True)
class Checkpoint:
    """``checkpoint``: take a checkpoint now."""


@dataclasses.dataclass(frozen=True, slots=True)
class MigrateCancel:
    """``migrate_cancel``: stop protecting (the guest keeps running)."""


Command = Help | InfoStatus | QueryStatus | Quit | Failover | Migrate | Checkpoint | MigrateCancel


@dataclasses.dataclass(frozen=True, slots=True)
class CommandSpec:
    """One row of the command table: the words that name it and its one-line help."""

    words: tuple[str, ...]
    summary: str


COMMANDS: tuple[CommandSpec, ...] = (
    CommandSpec(("help",), "list monitor commands"),
    CommandSpec(("info", "status"), "VM and agent status ('--json': as JSON)"),
    CommandSpec(("query-status",), "VM and agent status as JSON, for programs"),
    CommandSpec(("quit",), "stop the VM and the agent"),
    CommandSpec(("failover",), "standby: start the VM from the committed replica"),
    CommandSpec(("migrate",), "migrate -d kemari:tcp:HOST:PORT: protect with a standby"),
    CommandSpec(("checkpoint",), "take a checkpoint now; returns its epoch"),
    CommandSpec(("migrate_cancel",), "stop protecting (the guest keeps running)"),
)


def parse_command(words: Sequence[str]) -> Command:
    """The command a request's words name; :class:`MonitorError` for an unknown one,
    :class:`ConfigError` for wrong arguments."""
    head, args = _split(words)
    if head == ("help",):
        return Help()
    if head == ("info", "status"):
        if args and list(args) != ["--json"]:
            raise ConfigError(f"info status takes no arguments, got {' '.join(args)!r}")
        return InfoStatus(json=bool(args))
    if head == ("query-status",):
        _no_args("query-status", args)
        return QueryStatus()
    if head == ("quit",):
        return Quit()  # arguments ignored, as always
    if head == ("failover",):
        _no_args("failover", args)
        return Failover()
    if head == ("migrate",):
        uris = [arg for arg in args if arg != "-d"]
        if len(uris) != 1 or not uris[0].startswith("kemari:"):
            raise ConfigError("usage: migrate -d kemari:tcp:HOST:PORT")
        return Migrate(uris[0], detach="-d" in args)
    if head == ("checkpoint",):
        _no_args("checkpoint", args)
        return Checkpoint()
    assert head == ("migrate_cancel",)
    return MigrateCancel()  # arguments ignored, as always


def _split(words: Sequence[str]) -> tuple[tuple[str, ...], Sequence[str]]:
    """The longest command-table prefix of ``words`` and the rest."""
    for length in range(len(words), 0, -1):
        head = tuple(words[:length])
        if any(spec.words == head for spec in COMMANDS):
            return head, words[length:]
    raise MonitorError(f"unknown command {' '.join(words)!r} (try 'help')")


def _no_args(name: str, args: Sequence[str]) -> None:
    if args:
        raise ConfigError(f"{name} takes no arguments, got {' '.join(args)!r}")


# -- replies --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class HelpReply:
    """The command table: words → summary."""

    commands: dict[str, str]


@dataclasses.dataclass(frozen=True, slots=True)
class Stopping:
    """``quit`` accepted: the agent stops VM ``name``."""

    name: str


@dataclasses.dataclass(frozen=True, slots=True)
class FailedOver:
    """``failover`` done: the guest runs here, resumed from stream epoch ``epoch``."""

    name: str
    epoch: int
    total_ms: float  # failover command → guest running
    replayed_frames: int  # held frames of the resumed epoch sent again


@dataclasses.dataclass(frozen=True, slots=True)
class MigrateStarted:
    """``migrate`` accepted: the initial sync to ``peer`` runs in the background."""

    peer: str


@dataclasses.dataclass(frozen=True, slots=True)
class CheckpointDone:
    """``checkpoint`` done: ``epoch`` committed on the standby ``ms`` after the request."""

    epoch: int
    ms: float


@dataclasses.dataclass(frozen=True, slots=True)
class ProtectionStopped:
    """``migrate_cancel`` done: the guest runs unprotected."""


# -- status (docs/status.md documents every field) ---------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class InitialSync:
    """The completed initial sync of the current protection session."""

    duration_s: float
    ram_bytes: int
    stream_bytes: int


@dataclasses.dataclass(frozen=True, slots=True)
class SyncProgress:
    """The initial sync while it runs."""

    received_bytes: int
    ram_bytes: int
    elapsed_s: float
    rate_bytes_per_s: float


@dataclasses.dataclass(frozen=True, slots=True)
class RecentCheckpoints:
    """The last checkpoints (up to 64) of the protection session."""

    count: int
    pause_ms_p50: float | None
    pause_ms_max: float | None
    kick_ms_p50: float | None
    stop_ms_p50: float | None
    transfer_ms_p50: float | None
    commit_ms_p50: float | None
    device_bytes_last: int | None
    bytes_last: int | None
    pages_last: int | None


@dataclasses.dataclass(frozen=True, slots=True)
class ReplicationStatus:
    """The active side's protection session (``migrate``) and its checkpoints."""

    state: str
    reason: str | None
    peer: str
    tls: bool
    run: str | None
    run_epoch: int | None
    epoch: int | None
    in_flight: int
    epoch_ms: int
    last_checkpoint_age_s: float | None
    initial_sync: InitialSync | None
    sync_progress: SyncProgress | None
    recent: RecentCheckpoints


@dataclasses.dataclass(frozen=True, slots=True)
class StandbyDiskStatus:
    """One disk of the standby (its image and what is kept for failover)."""

    image: str
    synced: bool
    applied: int
    kept: int
    background_flushes: int
    flush_error: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class StandbyStatus:
    """The standby side: its listener, the primary it serves and the replica."""

    listening: str | None
    tls: bool
    primary: str | None
    refused_peers: int
    last_refusal: str
    run: str | None
    run_epoch: int | None
    sessions: int
    last_error: str | None
    epoch: int | None
    applier: str
    last_checkpoint_age_s: float | None
    last_checkpoint_pages: int | None
    outputs_committed: int
    disks: list[StandbyDiskStatus]
    last_frame_age_s: float | None
    health: str
    health_reason: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class EventTapStatus:
    """The network event-tap: held, released and passed guest frames."""

    sync: str
    mode: str
    max_bytes: int
    max_count: int
    paused: bool
    held: int
    held_bytes: int
    held_max: int
    held_bytes_max: int
    released: int
    released_bytes: int
    discarded: int
    latency_ms_p50: float | None
    latency_ms_p99: float | None
    passed: int
    checkpoint_requests: int
    pauses: int


@dataclasses.dataclass(frozen=True, slots=True)
class Flow:
    """Frames and Ethernet octets of one direction of a NIC."""

    frames: int
    octets: int


@dataclasses.dataclass(frozen=True, slots=True)
class NicStatus:
    """One NIC's bridge between QEMU and its host tap."""

    tap: str
    guest_to_host: Flow
    host_to_guest: Flow
    host_to_guest_unplugged: Flow
    host_to_guest_oversized: Flow
    guest_to_host_failed: Flow
    connections: int
    refused_connections: int
    guest_reading_pauses: int
    framing_errors: int
    guest_reading_paused: bool


@dataclasses.dataclass(frozen=True, slots=True)
class DiskStatus:
    """One disk served to QEMU by Kemari's NBD server."""

    image: str
    read_only: bool
    socket: str


@dataclasses.dataclass(frozen=True, slots=True)
class DiskCopyStatus:
    """Replicated storage: the initial copy of one disk to the standby."""

    committed_bytes: int
    sent_bytes: int
    total_bytes: int
    elapsed_s: float
    line: str
    done: bool


@dataclasses.dataclass(frozen=True, slots=True)
class FailoverInfo:
    """The failover that made this agent active."""

    epoch: int
    total_ms: float
    replayed_frames: int


@dataclasses.dataclass(frozen=True, slots=True)
class HaStatus:
    """Automatic failover (docs/ha.md): the arbiter as this agent sees it."""

    mode: str  # "manual" (failover is the operator's command) or "etcd"
    agent: str | None  # this agent's identity in the record
    endpoints: list[str]
    term: int | None  # the record's, as last read or written
    active: str | None  # the agent the record names active
    protected_by: str | None
    standby: str | None  # the published standby's agent
    reachable: bool | None  # the last etcd call succeeded
    lease_valid: bool | None  # by this agent's own clock, bound to its alive key
    lease_remaining_s: float | None
    last_heartbeat_age_s: float | None  # standby: since the active's last frame;
    # active: since the last acknowledged COMMIT was sent
    last_change: str  # why the last role change (or refusal to change) happened
    last_error: str | None
    withheld: int  # releases the permit refused (docs/ha.md rule 2)
    fenced: bool


MANUAL_HA = HaStatus(
    "manual", None, [], None, None, None, None, None, None, None, None, "", None, 0, False
)


@dataclasses.dataclass(frozen=True, slots=True)
class Status:
    """Everything ``query-status`` reports (docs/status.md)."""

    name: str
    role: str | None
    state: str
    state_for_s: float
    state_since_unix: float
    state_reason: str
    agent_pid: int
    protection: str
    replication: ReplicationStatus | None
    standby: StandbyStatus | None
    failover: FailoverInfo | None
    vm: str
    qemu_pid: int | None
    accel: str | None
    accel_reason: str
    qemu_binary: str | None
    qemu_binary_reason: str
    checkpoint_safe: bool
    uptime_s: float
    disks: list[DiskStatus]
    nics: list[NicStatus]
    eventtap: EventTapStatus
    storage: str
    disk_copy: list[DiskCopyStatus]
    serial_log: str
    ha: HaStatus = MANUAL_HA


Reply = (
    HelpReply | Stopping | FailedOver | MigrateStarted | CheckpointDone | ProtectionStopped | Status
)


# -- plain data (JSON) both ways ----------------------------------------------------


def to_plain(reply: Reply) -> dict[str, Any]:
    """The reply as JSON-ready plain data (field names are the JSON keys)."""
    return dataclasses.asdict(reply)


T = TypeVar("T")


def from_plain(cls: type[T], data: object) -> T:
    """Build dataclass ``cls`` from plain data (as :func:`to_plain` makes it).

    Strict: a missing or unknown key, or a value of the wrong kind, is a
    :class:`MonitorError` naming where it is.  Lower layers' plain status dicts
    are read through it too, so the schema here is the one that holds.
    """
    return typing.cast(T, _convert(cls, data, cls.__name__))


def _convert(hint: Any, value: object, where: str) -> object:
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if not isinstance(value, dict):
            raise MonitorError(f"{where}: expected an object, got {value!r}")
        hints = typing.get_type_hints(hint)
        names = [field.name for field in dataclasses.fields(hint)]
        unknown = sorted(set(value) - set(names))
        missing = [name for name in names if name not in value]
        if unknown or missing:
            raise MonitorError(f"{where}: unknown keys {unknown}, missing keys {missing}")
        return hint(
            **{name: _convert(hints[name], value[name], f"{where}.{name}") for name in names}
        )
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, where)
            except MonitorError as exc:
                errors.append(str(exc))
        raise MonitorError("; ".join(errors) or f"{where}: unexpected null")
    if origin is list:
        if not isinstance(value, list):
            raise MonitorError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_convert(item, element, f"{where}[{i}]") for i, element in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise MonitorError(f"{where}: expected an object, got {value!r}")
        return dict(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise MonitorError(f"{where}: expected a number, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise MonitorError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint in (str, bool):
        if not isinstance(value, hint):
            raise MonitorError(f"{where}: expected {hint.__name__}, got {value!r}")
        return value
    raise MonitorError(f"{where}: no conversion for {hint!r}")
