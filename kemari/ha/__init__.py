"""Automatic failover groundwork (issue 9): the per-VM record in etcd and the arbiter.

``record`` is pure (the record, its encoding and its transitions); ``arbiter`` talks to
a real etcd v3 cluster.  docs/ha.md states the safety rules and their argument.
"""

from kemari.errors import KemariError


class ArbiterError(KemariError):
    """The HA arbiter (etcd) is unreachable, refused a request, or holds an invalid record."""


class ArbiterUnreachable(ArbiterError):
    """etcd did not answer in time or refused the connection; a change sent may or may
    not have been applied (read the record again before acting on it)."""
