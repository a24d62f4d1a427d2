"""The standby's replica of the guest: RAM files QEMU can map, device state, atomic checkpoints."""

from kemari.replica.store import (
    MAIN_RAM_BLOCK,
    BlockInfo,
    RecoveryAction,
    Replica,
    StagedCheckpoint,
    StageState,
)

__all__ = [
    "MAIN_RAM_BLOCK",
    "BlockInfo",
    "RecoveryAction",
    "Replica",
    "StageState",
    "StagedCheckpoint",
]
