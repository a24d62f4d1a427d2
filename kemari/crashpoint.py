"""Test-only hook that SIGKILLs the process at a named point (docs/replica.md, docs/protocol.md).

``KEMARI_REPLICA_TEST_CRASH=<point>`` or ``<point>=<count>`` makes the process kill itself
with a real SIGKILL when it reaches ``point`` (for counted points: once ``count`` units
are done).  Unset, every check is one comparison against None.  The points:

- ``journal-bytes=N``: after N bytes of a checkpoint's journal are written, counted in
  write order (header, tables, pages, device state, commit record; padding not counted);
- ``journal-complete``: the commit record is written, nothing applied yet;
- ``apply-pages=N``: after the journaled frame that brings the pages applied in place to N;
- ``state-written``: the new state file is renamed into place, journal not yet marked;
- ``initial-pages=N``: after the frame that brings the pages written in the first
  (unjournaled) checkpoint to N.

Points of the active host's agent, one per protocol phase of checkpoint N:

- ``before-reply=N``: QEMU's CHECKPOINT_REQUEST of checkpoint N arrived, no REPLY sent;
- ``during-pages=N``: the first RAM_PAGES frame of checkpoint N was sent, more follow;
- ``after-device-state=N``: DEVICE_STATE of N was sent, no OUTPUT/COMMIT yet;
- ``output-release=N``: the N-th commit carrying outputs was acknowledged, none released;
- ``during-release=N``: the N-th commit carrying two or more outputs released its first;
- ``in-flight=N``: VMSTATE_LOADED of a checkpoint >= N was sent (the guest runs past it)
  and its COMMIT_ACK has not arrived;
- ``two-in-flight=N``: the same, while the checkpoint before it is unacknowledged too.

One point of the standby's agent shapes timing instead of killing:

- ``ack-delay-ms=D``: every COMMIT_ACK after the initial sync leaves D ms late (a long
  round trip), so the active has checkpoints in flight for that long.
"""

import os
import signal

ENVIRONMENT_VARIABLE = "KEMARI_REPLICA_TEST_CRASH"


def _parse(value: str | None) -> tuple[str, int] | None:
    if not value:
        return None
    name, _, count = value.partition("=")
    return name, int(count) if count else 0


_TARGET = _parse(os.environ.get(ENVIRONMENT_VARIABLE))


def limit(point: str) -> int | None:
    """The count at which ``point`` kills the process, or None when it is not armed."""
    if _TARGET is None or _TARGET[0] != point:
        return None
    return _TARGET[1]


def reached(point: str) -> None:
    """Kill the process now if ``point`` is the armed one."""
    if _TARGET is not None and _TARGET[0] == point:
        kill()


def kill() -> None:
    """SIGKILL this process: no cleanup, no flush, exactly like an external kill -9."""
    os.kill(os.getpid(), signal.SIGKILL)
