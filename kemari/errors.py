"""The one exception root of Kemari and its families.

Every error Kemari raises on purpose derives from :class:`KemariError`, so the
CLI can print it as one clear line and exit non-zero.  Lower-level exceptions
are chained with ``raise ... from exc``.
"""


class KemariError(Exception):
    """Root of every error Kemari raises on purpose."""


class ConfigError(KemariError):
    """A VM configuration value (flag or TOML) is invalid."""


class QemuError(KemariError):
    """QEMU could not be started, refused its command line, or died."""


class ImageError(KemariError):
    """The guest image could not be built or is missing."""


class NbdError(KemariError):
    """The NBD server hit an unrecoverable problem (not a per-request error)."""


class NetError(KemariError):
    """The guest network path (tap, stream socket, namespaces) failed."""


class MonitorError(KemariError):
    """The Kemari monitor channel failed or a command was invalid."""


class StreamError(KemariError):
    """A QEMU migration stream is malformed, unsupported or cut short."""


class TransactionError(KemariError):
    """The ft-transaction protocol between active and standby hosts was violated or cut."""


class PersistError(KemariError):
    """A file Kemari keeps on disk is missing, torn, foreign, of another version, too
    large, or cannot be written (kemari.persist has one subclass per kind)."""


class ReplicaError(KemariError):
    """The standby's replica (RAM files, journal, metadata) is invalid, in use or unwritable."""


class CheckpointError(KemariError):
    """Checkpointing the primary failed or protection ended (the guest runs unprotected)."""


class FailoverError(KemariError):
    """The standby cannot take over: no committed replica, or the failover QEMU did not start."""


class EventTapError(KemariError):
    """Guest outputs could not be held, carried or released as the event-tap requires."""


class StateError(KemariError):
    """A role transition the state machine's table does not allow (kemari.roles.state)."""
