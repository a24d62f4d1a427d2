"""Wire constants of QEMU 7.2's migration stream (x86_64, x-colo) and the codec's errors.

Every number here is taken from QEMU 7.2 sources; the file/function is named next to
it.  docs/stream.md describes the layout these constants build.
"""

import enum

from kemari.errors import StreamError

# migration/savevm.h
FILE_MAGIC = 0x5145564D  # "QEVM"
FILE_VERSION = 3

# x86_64 TARGET_PAGE_BITS; the configuration/target-page-bits subsection is only sent
# when a target's page size differs from its minimum, which never happens on x86.
PAGE_BITS = 12
PAGE_SIZE = 1 << PAGE_BITS
PAGE_MASK = PAGE_SIZE - 1

# Fixed metadata of the "ram" SaveStateEntry (migration/ram.c ram_mig_init, ram_load).
RAM_IDSTR = "ram"
RAM_INSTANCE_ID = 0
RAM_VERSION_ID = 4

# Validated capability names that can appear in configuration/capabilities
# (savevm.c should_validate_capability): only x-ignore-shared in 7.2.
CAPABILITY_IGNORE_SHARED = "x-ignore-shared"

# Limits the codec enforces before allocating anything.  QEMU itself bounds names by a
# u8 length; the byte limits are far above what a real x86 guest produces.
MAX_MACHINE_TYPE_LEN = 256
MAX_CAPABILITIES = 64
MAX_RAM_BLOCKS = 1024
MAX_VMDESC_LEN = 16 << 20
MAX_DEVICE_STATE_LEN = 256 << 20
UUID_LEN = 16


class SectionType(enum.IntEnum):
    """Top-level stream bytes (migration/savevm.h QEMU_VM_*)."""

    EOF = 0x00
    START = 0x01
    PART = 0x02
    END = 0x03
    FULL = 0x04
    SUBSECTION = 0x05
    VMDESCRIPTION = 0x06
    CONFIGURATION = 0x07
    COMMAND = 0x08
    FOOTER = 0x7E


class VmCommand(enum.IntEnum):
    """QEMU_VM_COMMAND subcommands (savevm.c enum qemu_vm_cmd)."""

    INVALID = 0
    OPEN_RETURN_PATH = 1
    PING = 2
    POSTCOPY_ADVISE = 3
    POSTCOPY_LISTEN = 4
    POSTCOPY_RUN = 5
    POSTCOPY_RAM_DISCARD = 6
    PACKAGED = 7
    ENABLE_COLO = 8
    POSTCOPY_RESUME = 9
    RECV_BITMAP = 10


# Payload lengths of the commands a precopy x-colo primary can send
# (savevm.c mig_cmd_args); every other command is rejected as unsupported.
SUPPORTED_COMMAND_LENGTHS: dict[VmCommand, int] = {
    VmCommand.OPEN_RETURN_PATH: 0,
    VmCommand.PING: 4,
    VmCommand.ENABLE_COLO: 0,
}


class RamFlag(enum.IntFlag):
    """Flags in the low bits of a RAM record's be64 (ram.c RAM_SAVE_FLAG_*)."""

    FULL = 0x01  # obsolete, never sent
    ZERO = 0x02
    MEM_SIZE = 0x04
    PAGE = 0x08
    EOS = 0x10
    CONTINUE = 0x20
    XBZRLE = 0x40
    HOOK = 0x80  # qemu-file.h, RDMA only
    COMPRESS_PAGE = 0x100


# Flags that name a real encoding Kemari does not decode (capabilities it never enables).
UNSUPPORTED_RAM_FLAGS = RamFlag.XBZRLE | RamFlag.HOOK | RamFlag.COMPRESS_PAGE


class ColoMessage(enum.IntEnum):
    """qapi/migration.json COLOMessage, sent as be32 (migration/colo.c colo_send_message)."""

    CHECKPOINT_READY = 0
    CHECKPOINT_REQUEST = 1
    CHECKPOINT_REPLY = 2
    VMSTATE_SEND = 3
    VMSTATE_SIZE = 4
    VMSTATE_RECEIVED = 5
    VMSTATE_LOADED = 6


class MalformedStreamError(StreamError):
    """The bytes violate the stream grammar or a validation rule."""


class UnsupportedStreamError(StreamError):
    """The stream is well formed but uses a feature Kemari does not handle."""


class IncompleteStreamError(StreamError):
    """The input ended in the middle of an item."""
