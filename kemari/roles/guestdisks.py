"""The guest's disks as the host that runs the guest serves them: NBD servers on the images.

Only the host that runs the guest opens its images (shared storage: the standby must
not hold the image while the primary writes it), so the agent opens them when it
becomes active: at start without ``--incoming``, or during a failover after the
standby's disks were rolled forward.  They outlive the active role's QEMU: the agent
closes them after the role (QEMU first, then the servers it talks to).

Every writable disk is served through an :class:`~kemari.eventtap.disk.OverlayBackend`
(it passes writes through until protected, then holds them: the disk event-tap); the
:class:`~kemari.eventtap.disktap.DiskTap` over them is what protection attaches to.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from kemari.config import VMConfig
from kemari.eventtap.disk import OverlayBackend
from kemari.eventtap.disktap import DiskTap
from kemari.monitor import api
from kemari.nbd.backend import RawFileBackend
from kemari.nbd.server import NbdServer

NBD_EXPORT = "disk"


def disk_socket(runtime_dir: Path, index: int) -> Path:
    """Where QEMU finds disk ``index``'s NBD server."""
    return runtime_dir / f"disk{index}.sock"


class GuestDisks:
    """The open images, their NBD servers and the disk event-tap over them."""

    def __init__(self, config: VMConfig, tap: DiskTap, servers: list[NbdServer]) -> None:
        self.config = config
        self.tap = tap
        self.servers = servers
        self._stack = contextlib.AsyncExitStack()

    @classmethod
    async def open(cls, config: VMConfig, runtime_dir: Path) -> GuestDisks:
        """Open every configured image and start its NBD server."""
        async with contextlib.AsyncExitStack() as stack:
            overlays: list[OverlayBackend] = []
            servers: list[NbdServer] = []
            for index, disk in enumerate(config.disks):
                backend = RawFileBackend.open(disk.path, read_only=disk.read_only)
                stack.push_async_callback(backend.close)
                # Writable disks get an overlay: it passes writes through until protected.
                served: RawFileBackend | OverlayBackend = backend
                if not disk.read_only:
                    served = OverlayBackend(backend, disk=index)
                    overlays.append(served)
                server = NbdServer(served, disk_socket(runtime_dir, index), NBD_EXPORT)
                await server.start()
                stack.push_async_callback(server.close)
                servers.append(server)
            tap = DiskTap(overlays)
            # Closed before the servers and images, after protection ended.
            stack.push_async_callback(tap.close)
            disks = cls(config, tap, servers)
            disks._stack = stack.pop_all()
        return disks

    async def close(self) -> None:
        """The disk event-tap, then the servers, then the images."""
        await self._stack.aclose()

    def status(self) -> list[api.DiskStatus]:
        """One entry per served disk."""
        return [
            api.DiskStatus(
                image=str(disk.path),
                read_only=disk.read_only,
                socket=str(server.socket_path),
            )
            for disk, server in zip(self.config.disks, self.servers, strict=False)
        ]
