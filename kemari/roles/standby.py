"""The standby role: no QEMU, only the replica of the active host's guest.

:class:`StandbyRole` owns the :class:`~kemari.replica.receiver.StandbyReceiver`
(ft-transactions in), the :class:`~kemari.replica.applier.ReplicaApplier` (the
committed replica, in ``--replica-dir``) and the :class:`~kemari.replica.disks.StandbyDisks`
(this host's images, kept equal to the guest's at each committed epoch).  It never
takes over by itself: the failover order (kemari.roles.failover) takes its state
with :meth:`StandbyRole.hand_over_resources` when the operator says ``failover``.

Cleanup is the role's own exit stack, in reverse order of acquisition: the receiver
stops, the standby disks close, the applier closes, and the replica directory goes:
it is useless without this agent (a new protection session always starts with a new
initial sync), except a generation another live process holds (a failover QEMU of
another agent sharing the folder).  A crash of the agent leaves it behind; the next
agent with the same folder reclaims what no live process holds (kemari.replica.holders).
After a failover the same cleanup belongs to the new active role, and runs
once its QEMU, which maps the replica's RAM file, is gone.
"""

from __future__ import annotations

import contextlib

from kemari.config import VMConfig
from kemari.monitor import api
from kemari.replica.applier import ReplicaApplier
from kemari.replica.disks import StandbyDisks
from kemari.replica.receiver import StandbyReceiver
from kemari.transaction.session import Identity
from kemari.transaction.wire import ZSTD_PAGES


class StandbyRole:
    """Receives the active host's checkpoints into the replica until :meth:`close`."""

    def __init__(
        self,
        config: VMConfig,
        receiver: StandbyReceiver,
        disks: StandbyDisks,
        stack: contextlib.AsyncExitStack,
    ) -> None:
        """Use :meth:`start`."""
        self.config = config
        self.receiver = receiver
        self.applier = receiver.applier
        self.disks = disks
        self._stack = stack
        self._receiving = True

    @classmethod
    async def start(cls, config: VMConfig, uri: str) -> StandbyRole:
        """Open (or recover) the replica and listen on ``uri`` for a primary."""
        replica_dir = config.resolved_replica_dir()
        async with contextlib.AsyncExitStack() as stack:
            applier = ReplicaApplier(replica_dir, config_digest=config.replication_digest().hex())
            stack.callback(applier.remove_files)  # what a live process holds stays (item 11)
            stack.callback(applier.close)
            disks = StandbyDisks([disk.path for disk in config.disks], config.storage)
            stack.push_async_callback(disks.close)
            # The standby accepts compressed pages whenever the primary offers them.
            identity = Identity(config.name, config.replication_digest(), (ZSTD_PAGES,))
            receiver = StandbyReceiver(
                uri,
                identity,
                applier,
                disks,
                tls=config.tls_creds,
                max_ram_bytes=config.memory_mib << 20,
                # --ha: a primary silent for the failure-detection timeout is lost.
                **({} if config.ha is None else {"idle_timeout": config.ha.detect_s}),
            )
            await receiver.start()
            role = cls(config, receiver, disks, stack.pop_all())
        return role

    @property
    def listening(self) -> str:
        """The address the receiver listens on."""
        return str(self.receiver.listener.bound)

    async def stop_receiving(self) -> None:
        """Stop listening and drop the primary (its open transaction is discarded)."""
        if self._receiving:
            self._receiving = False
            await self.receiver.close()

    def hand_over_resources(self) -> contextlib.AsyncExitStack:
        """Give up the cleanup of the standby disks, the applier and the replica directory
        (failover: the new active role closes them after its QEMU).  The receiver must
        be stopped first; this role then owns nothing."""
        if self._receiving:
            raise AssertionError("hand_over_resources() before stop_receiving()")
        return self._stack.pop_all()

    async def close(self) -> None:
        """The receiver stops, then the disks, the applier and the replica directory go."""
        await self.stop_receiving()
        await self._stack.aclose()

    def status(self) -> api.StandbyStatus:
        """The receiver, the replica and the standby disks."""
        return api.from_plain(api.StandbyStatus, self.receiver.status())
