"""The primary's checkpoint core: QEMU's x-colo stream to a sink, and when checkpoints happen."""

from kemari.checkpoint.source import (
    CheckpointRecord,
    CheckpointSink,
    CheckpointSource,
    PageBatch,
    SourceListener,
    SourceState,
    SyncRecord,
)
from kemari.checkpoint.trigger import CheckpointTrigger

__all__ = [
    "CheckpointRecord",
    "CheckpointSink",
    "CheckpointSource",
    "CheckpointTrigger",
    "PageBatch",
    "SourceListener",
    "SourceState",
    "SyncRecord",
]
