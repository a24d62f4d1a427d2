"""NBD wire format: constants and pure encode/decode of handshake, options, requests, replies.

Everything here is side-effect free so it can be property-tested; the server
(:mod:`kemari.nbd.server`) does the I/O.  Values follow the NBD protocol
specification (NetworkBlockDevice/nbd ``doc/proto.md``); all integers are
big-endian on the wire.  Only the fixed newstyle handshake and simple replies
are spoken: structured replies and extended headers are refused, so clients
fall back to simple replies.
"""

from __future__ import annotations

import enum
import errno
import struct
from dataclasses import dataclass

from kemari.errors import NbdError

# Magic numbers.
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC", first word of the server greeting
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT", greeting and every option request
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

# Size constraints we advertise with NBD_INFO_BLOCK_SIZE (the spec's defaults:
# byte-granular access, 4 KiB preferred, 32 MiB largest READ/WRITE payload).
MIN_BLOCK_SIZE = 1
PREFERRED_BLOCK_SIZE = 4096
MAX_PAYLOAD = 32 * 1024 * 1024

# Longest option payload we read; NBD_OPT_GO carries a name (<= 4096 bytes)
# plus up to 65535 two-byte info requests, which fits comfortably.
MAX_OPTION_DATA = 256 * 1024
MAX_NAME = 4096

# Fixed-size structures.
_GREETING = struct.Struct(">QQH")
_CLIENT_FLAGS = struct.Struct(">I")
_OPTION_HEADER = struct.Struct(">QII")
_OPTION_REPLY_HEADER = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_EXPORT_NAME_REPLY = struct.Struct(">QH")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")

GREETING_SIZE = _GREETING.size
CLIENT_FLAGS_SIZE = _CLIENT_FLAGS.size
OPTION_HEADER_SIZE = _OPTION_HEADER.size
OPTION_REPLY_HEADER_SIZE = _OPTION_REPLY_HEADER.size
REQUEST_SIZE = _REQUEST.size
SIMPLE_REPLY_SIZE = _SIMPLE_REPLY.size
EXPORT_NAME_PADDING = 124


class HandshakeFlag(enum.IntFlag):
    """Flags the server sends in its greeting."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    """Flags the client answers the greeting with."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlag(enum.IntFlag):
    """Per-export flags describing which commands the client may send."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Option(enum.IntEnum):
    """Option haggling requests (only some are implemented by the server)."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_REP_ERROR = 1 << 31


class OptionReply(enum.IntEnum):
    """Reply types to options; errors have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _REP_ERROR | 1
    ERR_POLICY = _REP_ERROR | 2
    ERR_INVALID = _REP_ERROR | 3
    ERR_PLATFORM = _REP_ERROR | 4
    ERR_TLS_REQD = _REP_ERROR | 5
    ERR_UNKNOWN = _REP_ERROR | 6
    ERR_SHUTDOWN = _REP_ERROR | 7
    ERR_BLOCK_SIZE_REQD = _REP_ERROR | 8
    ERR_TOO_BIG = _REP_ERROR | 9


class Info(enum.IntEnum):
    """Information items of NBD_OPT_INFO / NBD_OPT_GO (NBD_REP_INFO payloads)."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Command(enum.IntEnum):
    """Transmission-phase request types."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CommandFlag(enum.IntFlag):
    """Per-request flags."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


class Errno(enum.IntEnum):
    """Error values of simple replies (the spec fixes these numbers, not the host's errno)."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class ProtocolViolation(NbdError):
    """The peer broke the protocol so badly that the connection must be dropped."""


# --- handshake ---------------------------------------------------------------


def encode_greeting(flags: HandshakeFlag) -> bytes:
    """The server's first message: NBDMAGIC, IHAVEOPT, handshake flags."""
    return _GREETING.pack(NBDMAGIC, IHAVEOPT, flags)


def decode_greeting(data: bytes) -> HandshakeFlag:
    """Parse a server greeting (client side; used by tests and tools)."""
    magic, opt_magic, flags = _GREETING.unpack(data)
    if magic != NBDMAGIC or opt_magic != IHAVEOPT:
        raise ProtocolViolation("not a fixed newstyle NBD greeting")
    return HandshakeFlag(flags)


def encode_client_flags(flags: ClientFlag) -> bytes:
    """The client's 32-bit answer to the greeting."""
    return _CLIENT_FLAGS.pack(flags)


def decode_client_flags(data: bytes, offered: HandshakeFlag) -> ClientFlag:
    """Parse client flags; unknown or unoffered bits are a violation (spec: drop the link)."""
    (raw,) = _CLIENT_FLAGS.unpack(data)
    allowed = ClientFlag.FIXED_NEWSTYLE
    if offered & HandshakeFlag.NO_ZEROES:
        allowed |= ClientFlag.NO_ZEROES
    if raw & ~int(allowed):  # int(): ~ on an IntFlag only covers its defined bits
        raise ProtocolViolation(f"client sent unknown or unoffered flags {raw:#x}")
    return ClientFlag(raw)


# --- option haggling ---------------------------------------------------------


@dataclass(frozen=True)
class OptionHeader:
    """An option request header; ``length`` bytes of option data follow it."""

    option: int
    length: int


def encode_option(option: int, data: bytes = b"") -> bytes:
    """One complete option request (client side)."""
    return _OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data


def decode_option_header(data: bytes) -> OptionHeader:
    """Parse an option header; a wrong magic is a violation."""
    magic, option, length = _OPTION_HEADER.unpack(data)
    if magic != IHAVEOPT:
        raise ProtocolViolation(f"bad option magic {magic:#x}")
    return OptionHeader(option=option, length=length)


@dataclass(frozen=True)
class OptionReplyHeader:
    """An option reply header; ``length`` bytes of reply data follow it."""

    option: int
    reply: int
    length: int


def encode_option_reply(option: int, reply: OptionReply, data: bytes = b"") -> bytes:
    """One complete option reply."""
    return _OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def decode_option_reply_header(data: bytes) -> OptionReplyHeader:
    """Parse an option reply header (client side)."""
    magic, option, reply, length = _OPTION_REPLY_HEADER.unpack(data)
    if magic != OPTION_REPLY_MAGIC:
        raise ProtocolViolation(f"bad option reply magic {magic:#x}")
    return OptionReplyHeader(option=option, reply=reply, length=length)


def decode_name(raw: bytes) -> str:
    """Validate a protocol string (UTF-8, no NUL, at most 4096 bytes)."""
    if len(raw) > MAX_NAME:
        raise ProtocolViolation(f"string longer than {MAX_NAME} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolViolation("string is not UTF-8") from exc
    if "\0" in text:
        raise ProtocolViolation("string contains NUL")
    return text


@dataclass(frozen=True)
class InfoRequest:
    """The payload of NBD_OPT_INFO / NBD_OPT_GO: an export name and wanted info items."""

    name: str
    items: tuple[int, ...]


def encode_info_request(request: InfoRequest) -> bytes:
    """Encode the data of an NBD_OPT_INFO / NBD_OPT_GO option."""
    name = request.name.encode()
    return (
        struct.pack(">I", len(name))
        + name
        + struct.pack(f">H{len(request.items)}H", len(request.items), *request.items)
    )


def decode_info_request(data: bytes) -> InfoRequest:
    """Decode NBD_OPT_INFO / NBD_OPT_GO data; inconsistent lengths are a violation.

    The caller answers a violation here with NBD_REP_ERR_INVALID: the option
    framing itself was intact, so the connection can go on.
    """
    if len(data) < 6:
        raise ProtocolViolation("info request shorter than 6 bytes")
    (name_length,) = struct.unpack_from(">I", data, 0)
    if name_length > len(data) - 6:
        raise ProtocolViolation("info request name length exceeds the option data")
    name = decode_name(data[4 : 4 + name_length])
    (count,) = struct.unpack_from(">H", data, 4 + name_length)
    if len(data) != 6 + name_length + 2 * count:
        raise ProtocolViolation("info request item count does not match the option data")
    items = struct.unpack_from(f">{count}H", data, 6 + name_length)
    return InfoRequest(name=name, items=tuple(items))


def encode_info_export(size: int, flags: TransmissionFlag) -> bytes:
    """NBD_INFO_EXPORT payload of an NBD_REP_INFO reply."""
    return _INFO_EXPORT.pack(Info.EXPORT, size, flags)


def encode_info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    """NBD_INFO_BLOCK_SIZE payload of an NBD_REP_INFO reply."""
    return _INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, minimum, preferred, maximum)


def encode_info_name(name: str) -> bytes:
    """NBD_INFO_NAME payload of an NBD_REP_INFO reply."""
    return struct.pack(">H", Info.NAME) + name.encode()


def encode_rep_server(name: str) -> bytes:
    """NBD_REP_SERVER payload: one export of an NBD_OPT_LIST answer."""
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw


def encode_export_name_reply(size: int, flags: TransmissionFlag, no_zeroes: bool) -> bytes:
    """The (non-framed) answer to NBD_OPT_EXPORT_NAME."""
    padding = b"" if no_zeroes else bytes(EXPORT_NAME_PADDING)
    return _EXPORT_NAME_REPLY.pack(size, flags) + padding


# --- transmission ------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """A transmission request header (a WRITE's payload follows it on the wire)."""

    flags: int
    command: int
    handle: int
    offset: int
    length: int


def encode_request(request: Request) -> bytes:
    """Encode a request header (client side)."""
    return _REQUEST.pack(
        REQUEST_MAGIC,
        request.flags,
        request.command,
        request.handle,
        request.offset,
        request.length,
    )


def decode_request(data: bytes) -> Request:
    """Decode a request header; a wrong magic is a violation (the stream is out of sync)."""
    magic, flags, command, handle, offset, length = _REQUEST.unpack(data)
    if magic != REQUEST_MAGIC:
        raise ProtocolViolation(f"bad request magic {magic:#x}")
    return Request(flags=flags, command=command, handle=handle, offset=offset, length=length)


def encode_simple_reply(error: Errno, handle: int) -> bytes:
    """A simple reply header (a successful READ's data follows it)."""
    return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)


def decode_simple_reply(data: bytes) -> tuple[int, int]:
    """Decode a simple reply header into (error, handle) (client side)."""
    magic, error, handle = _SIMPLE_REPLY.unpack(data)
    if magic != SIMPLE_REPLY_MAGIC:
        raise ProtocolViolation(f"bad reply magic {magic:#x}")
    return error, handle


# Flags each command accepts.  FUA is valid on every command once SEND_FUA is
# advertised (the spec says clients set it on reads too); NO_HOLE only on
# WRITE_ZEROES.  DF, REQ_ONE and FAST_ZERO need features we never advertise.
_ACCEPTED_FLAGS: dict[Command, CommandFlag] = {
    Command.READ: CommandFlag.FUA,
    Command.WRITE: CommandFlag.FUA,
    Command.FLUSH: CommandFlag.FUA,
    Command.TRIM: CommandFlag.FUA,
    Command.WRITE_ZEROES: CommandFlag.FUA | CommandFlag.NO_HOLE,
}
_WRITING = frozenset({Command.WRITE, Command.TRIM, Command.WRITE_ZEROES})
_PAYLOAD_LIMITED = frozenset({Command.READ, Command.WRITE})


def check_request(request: Request, size: int, read_only: bool) -> Errno:
    """Return the error a request must be answered with, or :attr:`Errno.OK`.

    Order matters and mirrors the spec's SHOULDs: unknown command or flag
    (EINVAL), a write to a read-only export (EPERM), an over-long READ/WRITE
    payload (EINVAL), FLUSH with non-zero offset/length (EINVAL), then bounds:
    past the end is ENOSPC for writes and write-zeroes, EINVAL for reads and
    trims.  TRIM and WRITE_ZEROES carry no payload, so any in-bounds length is
    served.  DISC is never checked (it gets no reply).
    """
    try:
        command = Command(request.command)
    except ValueError:
        return Errno.EINVAL
    accepted = _ACCEPTED_FLAGS.get(command)
    if accepted is None or request.flags & ~int(accepted):
        return Errno.EINVAL
    if read_only and command in _WRITING:
        return Errno.EPERM
    if command in _PAYLOAD_LIMITED and request.length > MAX_PAYLOAD:
        return Errno.EINVAL
    if command is Command.FLUSH:
        return Errno.EINVAL if request.offset or request.length else Errno.OK
    if request.offset + request.length > size:
        return Errno.ENOSPC if command in (Command.WRITE, Command.WRITE_ZEROES) else Errno.EINVAL
    return Errno.OK


_HOST_ERRNO_TO_NBD: dict[int, Errno] = {
    errno.EPERM: Errno.EPERM,
    errno.EACCES: Errno.EPERM,
    errno.EROFS: Errno.EPERM,
    errno.ENOSPC: Errno.ENOSPC,
    errno.EDQUOT: Errno.ENOSPC,
    errno.EFBIG: Errno.ENOSPC,
    errno.EINVAL: Errno.EINVAL,
    errno.ENOMEM: Errno.ENOMEM,
}


def errno_to_nbd(host_errno: int | None) -> Errno:
    """Map a host errno from the backend to an NBD error (spec: EDQUOT/EFBIG are ENOSPC)."""
    if host_errno is None:
        return Errno.EIO
    return _HOST_ERRNO_TO_NBD.get(host_errno, Errno.EIO)
