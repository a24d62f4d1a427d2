"""Sync policies: when the primary takes checkpoints (the seed's "synchronization points").

* ``event``: the first held output requests a checkpoint at once
  (:meth:`~kemari.checkpoint.trigger.CheckpointTrigger.request_checkpoint`); outputs that
  arrive while a checkpoint is in flight are tagged with the next one and wait for it
  (event queuing: one more checkpoint serves all of them).  Without output there is no
  checkpoint (QEMU's timer is set to :data:`EVENT_ONLY_EPOCH_MS`).
* ``periodic``: QEMU's own timer every ``epoch_ms`` (``x-checkpoint-delay``), Remus-like;
  outputs wait for the next tick.
* ``event+periodic``: both; the timer bounds how much dirty memory a checkpoint carries
  when the guest computes without output.
"""

from __future__ import annotations

import enum

from kemari.errors import ConfigError

# QEMU's checkpoint timer under the pure event policy: one hour, i.e. practically never.
EVENT_ONLY_EPOCH_MS = 3_600_000
MIN_EPOCH_MS = 1
MAX_EPOCH_MS = 600_000


class SyncPolicy(enum.Enum):
    """What causes a checkpoint."""

    EVENT = "event"
    PERIODIC = "periodic"
    EVENT_PERIODIC = "event+periodic"

    @classmethod
    def parse(cls, text: str) -> SyncPolicy:
        """The policy named ``text``; ConfigError names the choices otherwise."""
        try:
            return cls(text)
        except ValueError as exc:
            choices = ", ".join(policy.value for policy in cls)
            raise ConfigError(f"sync: {text!r} is not one of {choices}") from exc

    @property
    def on_output(self) -> bool:
        """A held output requests a checkpoint."""
        return self is not SyncPolicy.PERIODIC

    def qemu_epoch_ms(self, epoch_ms: int) -> int:
        """The ``x-checkpoint-delay`` QEMU gets for a configured epoch of ``epoch_ms``."""
        if not MIN_EPOCH_MS <= epoch_ms <= MAX_EPOCH_MS:
            raise ConfigError(f"epoch_ms: {epoch_ms} is outside {MIN_EPOCH_MS}..{MAX_EPOCH_MS}")
        return EVENT_ONLY_EPOCH_MS if self is SyncPolicy.EVENT else epoch_ms


SYNC_POLICIES = tuple(policy.value for policy in SyncPolicy)
DEFAULT_SYNC = SyncPolicy.EVENT_PERIODIC.value
DEFAULT_EPOCH_MS = 100
