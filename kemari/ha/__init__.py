"""Automatic failover groundwork (issue 9): the per-VM record in etcd and the arbiter.

``record`` is pure (the record, its encoding and its transitions); ``arbiter`` talks to
a real etcd v3 cluster.  docs/ha.md states the safety rules and their argument.
"""

import os

from kemari.errors import KemariError

# Before gRPC is imported (by aetcd): no fork handlers.  The agent forks QEMU (with a
# pre-exec hook, so a real fork) while the arbiter's gRPC threads run; gRPC's fork
# handlers then ran in the child ("Other threads are currently calling into gRPC,
# skipping fork() handlers") and a failover QEMU started right after an etcd outage
# died of SIGSEGV before it ran.  The child only execs: it needs no gRPC.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")


class ArbiterError(KemariError):
    """The HA arbiter (etcd) is unreachable, refused a request, or holds an invalid record."""


class ArbiterUnreachable(ArbiterError):
    """etcd did not answer in time or refused the connection; a change sent may or may
    not have been applied (read the record again before acting on it)."""
