"""The milestones of a checkpoint's pause in causal order (kemari/checkpoint/timeline.py),
as the tests expect them: QEMU's STOP and RESUME where they happen."""

PAUSE_MILESTONES = (
    "reply",
    "stop",
    "vmstate_send",
    "first_page",
    "ram_end",
    "vmstate_size",
    "device_read",
    "device_parsed",
    "captured",
    "loaded",
    "resume",
)
