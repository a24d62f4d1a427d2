"""The network event-tap: guest frames of one NIC held in NetBridge until their checkpoint commits.

:class:`NetOutputs` is a :class:`~kemari.net.bridge.ReleasePolicy` for one bridge: every
frame the guest sends becomes an :class:`~kemari.eventtap.outputs.Output` of kind NET on
NIC *i*, submitted to the VM's :class:`~kemari.eventtap.gate.EventTap`.  A held frame
later leaves through :meth:`NetBridge.write_to_host`; while the tap's log is full the
bridge stops reading QEMU's stream socket (back-pressure, never a drop), except from
a checkpoint's request to its commit (see :meth:`NetBridge.drain_guest_stream`).  Frames to the
guest are never held: the bridge delivers them itself.

:func:`replay_frames` is the failover's half: the standby sends the frames of the
epoch it resumes from again, through its own bridges, before the guest resumes.
"""

from __future__ import annotations

from collections.abc import Sequence

from kemari.errors import EventTapError
from kemari.eventtap.gate import EventTap
from kemari.net.bridge import NetBridge
from kemari.outputs import Output, OutputKind


class NetOutputs:
    """The release policy of NIC ``nic``'s bridge (installs itself on ``bridge``)."""

    def __init__(self, tap: EventTap, bridge: NetBridge, nic: int) -> None:
        self.tap = tap
        self.bridge = bridge
        self.nic = nic
        tap.add_device(OutputKind.NET, nic, self._release, producer=self)
        bridge.release_policy = self

    def hold(self, frame: bytes) -> bool:
        """ReleasePolicy: True when the event-tap holds ``frame``."""
        return self.tap.submit(Output(OutputKind.NET, self.nic, frame))

    def _release(self, output: Output) -> None:
        self.bridge.write_to_host(output.data)

    def pause(self) -> None:
        """Producer: stop reading guest frames from QEMU."""
        self.bridge.pause_guest_reading()

    def resume(self) -> None:
        """Producer: read guest frames from QEMU again."""
        self.bridge.resume_guest_reading()

    async def drain(self) -> None:
        """Producer: read the frames QEMU already wrote (it stops the VM next)."""
        await self.bridge.drain_guest_stream()


def replay_frames(outputs: Sequence[Output], bridges: Sequence[NetBridge]) -> int:
    """Send the NET outputs of ``outputs`` again, in order, through ``bridges[nic]``.

    Returns how many frames were sent.  Duplicates are harmless (a receiver of TCP
    drops what it already has); a NIC index this host has no bridge for is an error,
    since the configs of both hosts list the same NICs.
    """
    sent = 0
    for output in outputs:
        if output.kind is not OutputKind.NET:
            continue
        if output.device >= len(bridges):
            raise EventTapError(
                f"held frame of NIC {output.device}, but this host has {len(bridges)} NIC(s)"
            )
        bridges[output.device].write_to_host(output.data)
        sent += 1
    return sent
