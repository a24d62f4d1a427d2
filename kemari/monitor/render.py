"""The human text of each monitor reply, rendered from the typed reply (kemari.monitor.api).

Nothing parses this text: programs read the JSON (``query-status``, docs/status.md).
"""

from __future__ import annotations

import json

from kemari.monitor import api


def text(command: api.Command, reply: api.Reply) -> str:
    """The text shown for ``reply`` to ``command`` (``kemari monitor`` prints it)."""
    match reply:
        case api.Status():
            if isinstance(command, api.QueryStatus) or (
                isinstance(command, api.InfoStatus) and command.json
            ):
                return json.dumps(api.to_plain(reply), indent=2)
            return "\n".join(status_lines(reply))
        case api.HelpReply():
            return "\n".join(f"{words:<20} {summary}" for words, summary in reply.commands.items())
        case api.Stopping():
            return f"stopping VM {reply.name}"
        case api.FailedOver():
            return (
                f"VM {reply.name} resumed from epoch {reply.epoch} in "
                f"{reply.total_ms:.0f} ms ({reply.replayed_frames} held frames replayed)"
            )
        case api.MigrateStarted():
            return f"initial sync to {reply.peer} started; see 'info status'"
        case api.CheckpointDone():
            return f"checkpoint {reply.epoch} committed in {reply.ms:.1f} ms"
        case api.ProtectionStopped():
            return "protection stopped; the guest runs unprotected"


def status_lines(status: api.Status) -> list[str]:
    """``info status``: one line per part of the agent."""
    lines = [
        f"VM {status.name}: {status.vm} (role {status.role or 'none'}, {status.protection}, "
        f"agent {status.state})",
        f"state: {status.state} for {status.state_for_s:.1f} s ({status.state_reason}); "
        f"agent pid {status.agent_pid}",
        f"accel: {status.accel} ({status.accel_reason}); QEMU pid {status.qemu_pid}",
        f"uptime: {status.uptime_s} s; serial log: {status.serial_log}",
    ]
    lines += [
        f"disk{i}: {disk.image}{' (read-only)' if disk.read_only else ''} via NBD"
        for i, disk in enumerate(status.disks)
    ]
    lines += [
        f"nic{i}: tap {nic.tap}: guest->host {nic.guest_to_host.frames} frames, "
        f"host->guest {nic.host_to_guest.frames} frames"
        for i, nic in enumerate(status.nics)
    ]
    tap = status.eventtap
    lines.append(
        f"event-tap ({tap.sync}): {tap.mode}; held {tap.held} outputs "
        f"({tap.held_bytes} of max {tap.max_bytes} bytes), released "
        f"{tap.released}, paused {tap.pauses} times{' (now)' if tap.paused else ''}, "
        f"output-commit latency p50 {tap.latency_ms_p50} ms, p99 {tap.latency_ms_p99} ms"
    )
    lines += _replication_lines(status.replication)
    lines += [f"  {copy.line}" for copy in status.disk_copy]
    if status.standby is not None:
        lines += _standby_lines(status.standby)
    if status.failover is not None:
        lines.append(
            f"failed over: resumed from epoch {status.failover.epoch} in "
            f"{status.failover.total_ms} ms"
        )
    lines += _ha_lines(status.ha)
    return lines


def _ha_lines(ha: api.HaStatus) -> list[str]:
    """Automatic failover: the arbiter's record and lease as this agent sees them."""
    if ha.mode == "manual":
        return ["ha: manual (failover is the operator's command)"]

    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f} s"

    reach = "reachable" if ha.reachable else f"UNREACHABLE ({ha.last_error})"
    return [
        f"ha: etcd {','.join(ha.endpoints)}, {reach}; agent {ha.agent}"
        + ("; FENCED" if ha.fenced else ""),
        f"  record: term {ha.term}, active {ha.active}, protected by {ha.protected_by}, "
        f"standby {ha.standby}",
        f"  lease {'valid' if ha.lease_valid else 'NOT valid'}, remaining "
        f"{seconds(ha.lease_remaining_s)}; last heartbeat {seconds(ha.last_heartbeat_age_s)} "
        f"ago; releases withheld {ha.withheld}",
        f"  last change: {ha.last_change}",
    ]


_PLAIN_TCP_WARNING = (
    "  WARNING: plain TCP: anyone who reaches the standby's port can replace its replica "
    "(set tls_creds, docs/security.md)"
)


def _replication_lines(replication: api.ReplicationStatus | None) -> list[str]:
    """The active side's replication."""
    if replication is None:
        return []
    channel = "TLS" if replication.tls else "plain TCP"
    lines = [f"standby: {replication.peer} ({replication.state}, {channel})"]
    if not replication.tls:
        lines.append(_PLAIN_TCP_WARNING)
    if replication.reason:
        lines.append(f"  reason: {replication.reason}")
    progress = replication.sync_progress
    if progress is not None and progress.ram_bytes:
        lines.append(
            f"  initial sync: {progress.received_bytes / progress.ram_bytes:.0%} of "
            f"{progress.ram_bytes >> 20} MiB at {progress.rate_bytes_per_s / 2**20:.0f} MiB/s"
        )
    recent = replication.recent
    lines.append(
        f"  epoch {replication.epoch} (every {replication.epoch_ms} ms); "
        f"last checkpoint {replication.last_checkpoint_age_s} s ago; "
        f"pause p50 {recent.pause_ms_p50} ms, max {recent.pause_ms_max} ms over "
        f"{recent.count}; last {recent.pages_last} pages, {recent.bytes_last} bytes"
    )
    return lines


def _standby_lines(standby: api.StandbyStatus) -> list[str]:
    """The standby side: listener, primary, replica and disks."""
    lines = [
        f"standby: listening on {standby.listening}; primary {standby.primary}; "
        f"replica epoch {standby.epoch} ({standby.applier}); last checkpoint "
        f"{standby.last_checkpoint_age_s} s ago"
    ]
    if not standby.tls:
        lines.append(_PLAIN_TCP_WARNING)
    if standby.refused_peers:
        lines.append(f"  refused peers: {standby.refused_peers}; last: {standby.last_refusal}")
    if standby.health != "ok":
        lines.append(
            f"  HEALTH {standby.health}: cannot keep the replica: {standby.health_reason}; "
            f"epoch {standby.epoch} is kept for a failover; the next initial sync resets it"
        )
    if standby.last_error:
        lines.append(f"  last error: {standby.last_error}")
    for index, disk in enumerate(standby.disks):
        state = "holds the initial copy" if disk.synced else "initial copy not complete"
        lines.append(
            f"  disk{index} {disk.image}: {state}; {disk.applied} writes applied, "
            f"{disk.kept} kept for failover, {disk.background_flushes} background "
            f"flushes" + (f"; ERROR {disk.flush_error}" if disk.flush_error else "")
        )
    return lines
