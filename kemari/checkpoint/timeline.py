"""Where one checkpoint's pause goes: the milestones Kemari sees, on one clock.

QEMU stops the VM for checkpoint N only after reading Kemari's CHECKPOINT_REPLY, so the
moment just before Kemari writes it is the origin of N's timeline; every milestone is an
offset in ms from it.  Kemari's own milestones are ``time.monotonic()`` readings taken a
few times per checkpoint: a stream milestone is the time the socket read that carried it
returned (not when the parser got to it), and Kemari's two writes are marked just
*before* they are made, since QEMU, on another core, may act on them before the writing
task runs again.  QEMU's STOP and RESUME are the QMP events' own timestamps, taken by QEMU
when it emitted them (``do_vm_stop`` once the vCPUs are paused, ``vm_prepare_start``
before they run again), mapped onto the monotonic clock: the time the agent *received*
an event says when its event loop got round to the QMP socket, which during a capture is
after the very stream work being measured.

:class:`PauseMarks` collects one checkpoint's readings while it is captured;
:func:`attach_run_state_event` places STOP/RESUME events, which arrive on another socket
and later, on the checkpoint they belong to, by causality alone: STOP(N) lies between
writing REPLY(N) and reading VMSTATE_SEND(N), RESUME(N) after writing LOADED(N).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

STOP_EVENT = "STOP"
RESUME_EVENT = "RESUME"


@dataclasses.dataclass(frozen=True, slots=True)
class PauseTimeline:
    """One checkpoint's milestones, in ms after Kemari began writing CHECKPOINT_REPLY.

    In causal order; the optional ones are absent when QEMU's event did not reach Kemari
    (yet) or when the checkpoint carried no RAM page.
    """

    origin: float  # time.monotonic() of the origin (REPLY), to line up other clocks' events
    stop_ms: float | None  # QEMU's STOP event: the vCPUs are paused
    vmstate_send_ms: float  # the read that carried VMSTATE_SEND
    first_page_ms: float | None  # the read that carried the checkpoint's first RAM page
    ram_end_ms: float  # the read that carried the EOF closing the RAM part
    vmstate_size_ms: float  # the read that carried VMSTATE_SIZE
    device_read_ms: float  # the read that completed the device-state buffer
    device_parsed_ms: float  # that buffer parsed and handed to the sink
    captured_ms: float  # the checkpoint is read and held (it counts in the in-flight window)
    loaded_ms: float  # VMSTATE_RECEIVED + VMSTATE_LOADED about to be written
    resume_ms: float | None  # QEMU's RESUME event: vm_start begins

    def milestones(self) -> list[tuple[str, float]]:
        """The milestones present, in causal order, with the origin (REPLY) first."""
        named = [
            ("reply", 0.0),
            ("stop", self.stop_ms),
            ("vmstate_send", self.vmstate_send_ms),
            ("first_page", self.first_page_ms),
            ("ram_end", self.ram_end_ms),
            ("vmstate_size", self.vmstate_size_ms),
            ("device_read", self.device_read_ms),
            ("device_parsed", self.device_parsed_ms),
            ("captured", self.captured_ms),
            ("loaded", self.loaded_ms),
            ("resume", self.resume_ms),
        ]
        return [(name, at) for name, at in named if at is not None]

    @property
    def qemu_pause_ms(self) -> float | None:
        """STOP → RESUME by QEMU's own timestamps (what the guest sees), if both arrived."""
        if self.stop_ms is None or self.resume_ms is None:
            return None
        return self.resume_ms - self.stop_ms


@dataclasses.dataclass(slots=True)
class PauseMarks:
    """Monotonic readings of one checkpoint, filled in while it is captured."""

    reply: float  # CHECKPOINT_REPLY about to be written
    stop: float | None = None
    vmstate_send: float | None = None
    first_page: float | None = None
    ram_end: float | None = None
    vmstate_size: float | None = None
    device_read: float | None = None
    device_parsed: float | None = None
    captured: float | None = None
    loaded: float | None = None
    resume: float | None = None

    def timeline(self) -> PauseTimeline | None:
        """The timeline, once every milestone up to LOADED was read (None before)."""
        required = (
            self.vmstate_send,
            self.ram_end,
            self.vmstate_size,
            self.device_read,
            self.device_parsed,
            self.captured,
            self.loaded,
        )
        if any(at is None for at in required):
            return None
        send, ram_end, size, device_read, device_parsed, captured, loaded = (
            _ms(at, self.reply) for at in required
        )
        return PauseTimeline(
            origin=self.reply,
            stop_ms=_optional_ms(self.stop, self.reply),
            vmstate_send_ms=send,
            first_page_ms=_optional_ms(self.first_page, self.reply),
            ram_end_ms=ram_end,
            vmstate_size_ms=size,
            device_read_ms=device_read,
            device_parsed_ms=device_parsed,
            captured_ms=captured,
            loaded_ms=loaded,
            resume_ms=_optional_ms(self.resume, self.reply),
        )


def _ms(at: float | None, origin: float) -> float:
    assert at is not None  # checked by the caller
    return (at - origin) * 1000


def _optional_ms(at: float | None, origin: float) -> float | None:
    return None if at is None else (at - origin) * 1000


def monotonic_of(qemu_timestamp: float) -> float:
    """A QMP event's timestamp (QEMU's wall clock, ``g_get_real_time``) on this process's
    monotonic clock; both clocks advance together except when the wall clock is stepped."""
    return qemu_timestamp - (time.time() - time.monotonic())


def attach_run_state_event(marks: Sequence[PauseMarks], name: str, at: float) -> bool:
    """Record QEMU's ``name`` event (STOP or RESUME, at monotonic ``at``) on its checkpoint.

    ``marks`` are the recent checkpoints, oldest first.  A STOP belongs to the newest
    checkpoint whose REPLY was being written before it, if that one has no STOP yet and
    did not read VMSTATE_SEND before it; a RESUME to the newest checkpoint whose LOADED was
    being written before it, if that one has no RESUME yet.  Any other event (the stop at the end of
    the initial sync, a user's ``stop``, the restart after failover) is left out.
    Returns whether the event was recorded.
    """
    for mark in reversed(marks):
        if name == STOP_EVENT and mark.reply <= at:
            if mark.stop is None and (mark.vmstate_send is None or at <= mark.vmstate_send):
                mark.stop = at
                return True
            return False
        if name == RESUME_EVENT and mark.loaded is not None and mark.loaded <= at:
            if mark.resume is None:
                mark.resume = at
                return True
            return False
    return False
