"""Held guest outputs: what the guest sent, tagged with the checkpoint that covers it.

An :class:`Output` is one thing the guest did to the outside world: a network frame
sent on NIC *i*, or a write of bytes at an offset of disk *i*.  The :class:`OutputLog`
keeps them in the order Kemari read them, each tagged with an *epoch*: the first
checkpoint whose state includes the guest after that output (docs/protocol.md,
"Event-tap").  When checkpoint *n* is committed on the standby, every output tagged
``<= n`` may leave, in arrival order.

Invariants:

* Tags never decrease in arrival order (the source's checkpoint counter only grows),
  so the log is a queue sorted by tag: a release takes a prefix, and the outputs of
  one epoch are one contiguous run.
* Nothing is ever dropped to respect the bounds.  ``max_bytes`` / ``max_count`` only
  make :attr:`OutputLog.full` true; the producer must then stop reading (the network
  path pauses QEMU's stream socket), and may resume once :attr:`OutputLog.drained`.
  The log can exceed its bounds by what the producer had already read.
"""

from __future__ import annotations

import collections
import dataclasses
import statistics
import time

from kemari.config import DEFAULT_HELD_FRAMES_BYTES, HELD_FRAME_BYTES_PER_COUNT
from kemari.errors import EventTapError
from kemari.outputs import Output

# Producers resume when the log is below this fraction of both bounds (hysteresis, so a
# paused producer is not toggled on every released frame).
RESUME_FRACTION = 0.5
LATENCY_SAMPLES = 4096


@dataclasses.dataclass(frozen=True, slots=True)
class HeldOutput:
    """An output in the log: its tag and when it was held (``time.monotonic()``)."""

    output: Output
    epoch: int
    held_at: float


@dataclasses.dataclass(frozen=True, slots=True)
class LogStats:
    """What the log holds and has done (plain data for status and benchmarks)."""

    held: int
    held_bytes: int
    held_max: int
    held_bytes_max: int
    released: int
    released_bytes: int
    discarded: int
    latency_ms_p50: float | None  # held → released, over the last LATENCY_SAMPLES
    latency_ms_p99: float | None


class OutputLog:
    """Outputs waiting for their checkpoint's commit, in arrival order (see module docstring)."""

    def __init__(
        self,
        max_bytes: int = DEFAULT_HELD_FRAMES_BYTES,
        max_count: int = DEFAULT_HELD_FRAMES_BYTES // HELD_FRAME_BYTES_PER_COUNT,
    ) -> None:
        if max_bytes <= 0 or max_count <= 0:
            raise EventTapError(f"output log bounds must be positive ({max_bytes}, {max_count})")
        self.max_bytes = max_bytes
        self.max_count = max_count
        self._held: collections.deque[HeldOutput] = collections.deque()
        self._held_bytes = 0
        self._last_epoch = 0
        self._held_max = 0
        self._held_bytes_max = 0
        self._released = 0
        self._released_bytes = 0
        self._discarded = 0
        self._latencies: collections.deque[float] = collections.deque(maxlen=LATENCY_SAMPLES)

    def __len__(self) -> int:
        return len(self._held)

    @property
    def held_bytes(self) -> int:
        """Payload bytes held now."""
        return self._held_bytes

    @property
    def full(self) -> bool:
        """At or over a bound: the producer must stop reading until :attr:`drained`."""
        return self._held_bytes >= self.max_bytes or len(self._held) >= self.max_count

    @property
    def drained(self) -> bool:
        """Below :data:`RESUME_FRACTION` of both bounds: a paused producer may resume."""
        return (
            self._held_bytes < self.max_bytes * RESUME_FRACTION
            and len(self._held) < self.max_count * RESUME_FRACTION
        )

    def hold(self, output: Output, epoch: int, now: float | None = None) -> None:
        """Append ``output`` with tag ``epoch``; tags must not decrease (EventTapError)."""
        if epoch < self._last_epoch:
            raise EventTapError(
                f"output tagged epoch {epoch} after one tagged {self._last_epoch}: "
                "tags must not decrease"
            )
        self._last_epoch = epoch
        held_at = time.monotonic() if now is None else now
        self._held.append(HeldOutput(output, epoch, held_at))
        self._held_bytes += len(output.data)
        self._held_max = max(self._held_max, len(self._held))
        self._held_bytes_max = max(self._held_bytes_max, self._held_bytes)

    def release(self, committed_epoch: int, now: float | None = None) -> list[Output]:
        """Remove and return, in arrival order, every output tagged ``<= committed_epoch``."""
        released_at = time.monotonic() if now is None else now
        out: list[Output] = []
        held = self._held
        while held and held[0].epoch <= committed_epoch:
            entry = held.popleft()
            self._latencies.append(released_at - entry.held_at)
            out.append(entry.output)
        self._account_released(out)
        return out

    def release_all(self, now: float | None = None) -> list[Output]:
        """Remove and return everything (protection ended, the guest runs on unprotected)."""
        if not self._held:
            return []
        return self.release(self._held[-1].epoch, now)

    def discard_all(self) -> int:
        """Forget everything held (the guest that produced it died uncommitted); the count."""
        count = len(self._held)
        self._discarded += count
        self._held.clear()
        self._held_bytes = 0
        return count

    def restart_epochs(self) -> None:
        """A new protection session numbers its checkpoints from 1 again (log must be empty)."""
        if self._held:
            raise EventTapError(f"{len(self._held)} outputs are still held from the last session")
        self._last_epoch = 0

    def outputs_of(self, epoch: int) -> list[Output]:
        """The outputs tagged exactly ``epoch``, in arrival order (they stay held)."""
        outputs = []
        # Tags are sorted: skip the older run, stop at the first newer tag.
        for entry in self._held:
            if entry.epoch > epoch:
                break
            if entry.epoch == epoch:
                outputs.append(entry.output)
        return outputs

    def _account_released(self, released: list[Output]) -> None:
        size = sum(len(output.data) for output in released)
        self._held_bytes -= size
        self._released += len(released)
        self._released_bytes += size

    def stats(self) -> LogStats:
        """A snapshot of the counters and the output-commit latency percentiles."""
        latencies = sorted(self._latencies)
        p50 = p99 = None
        if latencies:
            p50 = round(statistics.median(latencies) * 1000, 3)
            p99 = round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, 3)
        return LogStats(
            held=len(self._held),
            held_bytes=self._held_bytes,
            held_max=self._held_max,
            held_bytes_max=self._held_bytes_max,
            released=self._released,
            released_bytes=self._released_bytes,
            discarded=self._discarded,
            latency_ms_p50=p50,
            latency_ms_p99=p99,
        )
