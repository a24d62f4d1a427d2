"""NBD wire codec: known byte layouts from the spec, round trips, and request checking."""

from __future__ import annotations

import contextlib
import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kemari.nbd import protocol
from kemari.nbd.protocol import (
    ClientFlag,
    Command,
    CommandFlag,
    Errno,
    HandshakeFlag,
    InfoRequest,
    OptionReply,
    ProtocolViolation,
    Request,
    TransmissionFlag,
)

u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
names = st.text(st.characters(blacklist_characters="\0", blacklist_categories=["Cs"]), max_size=64)
requests = st.builds(Request, flags=u16, command=u16, handle=u64, offset=u64, length=u32)

BOTH = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES


def test_greeting_bytes_match_the_spec() -> None:
    greeting = protocol.encode_greeting(BOTH)
    assert greeting == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
    assert protocol.decode_greeting(greeting) == BOTH


def test_request_and_reply_bytes_match_the_spec() -> None:
    request = Request(flags=1, command=Command.WRITE, handle=7, offset=512, length=4096)
    assert protocol.encode_request(request) == (
        bytes.fromhex("25609513")
        + b"\x00\x01\x00\x01"
        + (7).to_bytes(8, "big")
        + (512).to_bytes(8, "big")
        + (4096).to_bytes(4, "big")
    )
    assert protocol.encode_simple_reply(Errno.ENOSPC, 7) == (
        bytes.fromhex("67446698") + (28).to_bytes(4, "big") + (7).to_bytes(8, "big")
    )


def test_option_reply_and_info_bytes_match_the_spec() -> None:
    reply = protocol.encode_option_reply(protocol.Option.GO, OptionReply.ERR_UNSUP)
    assert reply == bytes.fromhex("0003e889045565a9" + "00000007" + "80000001" + "00000000")
    info = protocol.encode_info_export(1 << 30, TransmissionFlag.HAS_FLAGS)
    assert info == b"\x00\x00" + (1 << 30).to_bytes(8, "big") + b"\x00\x01"
    assert protocol.encode_info_block_size(1, 4096, 1 << 25) == (
        b"\x00\x03" + b"\x00\x00\x00\x01" + b"\x00\x00\x10\x00" + b"\x02\x00\x00\x00"
    )


def test_export_name_reply_pads_unless_no_zeroes() -> None:
    flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH
    assert len(protocol.encode_export_name_reply(4096, flags, no_zeroes=False)) == 10 + 124
    assert protocol.encode_export_name_reply(4096, flags, no_zeroes=True) == (
        (4096).to_bytes(8, "big") + b"\x00\x05"
    )


def test_client_flags() -> None:
    raw = protocol.encode_client_flags(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)
    assert protocol.decode_client_flags(raw, BOTH) == ClientFlag.FIXED_NEWSTYLE | 2
    with pytest.raises(ProtocolViolation, match="unknown or unoffered"):
        protocol.decode_client_flags(raw, HandshakeFlag.FIXED_NEWSTYLE)
    with pytest.raises(ProtocolViolation, match="unknown or unoffered"):
        protocol.decode_client_flags(b"\x00\x00\x00\x04", BOTH)


@given(u32)
def test_client_flags_accepts_exactly_the_offered_bits(raw: int) -> None:
    data = raw.to_bytes(4, "big")
    if raw & ~3:
        with pytest.raises(ProtocolViolation):
            protocol.decode_client_flags(data, BOTH)
    else:
        assert protocol.decode_client_flags(data, BOTH) == raw


@given(requests)
def test_request_round_trip(request: Request) -> None:
    assert protocol.decode_request(protocol.encode_request(request)) == request


@given(st.binary(min_size=protocol.REQUEST_SIZE, max_size=protocol.REQUEST_SIZE))
def test_request_decoding_checks_the_magic(data: bytes) -> None:
    if data[:4] == bytes.fromhex("25609513"):
        assert protocol.encode_request(protocol.decode_request(data)) == data
    else:
        with pytest.raises(ProtocolViolation, match="bad request magic"):
            protocol.decode_request(data)


@given(st.sampled_from(list(Errno)), u64)
def test_simple_reply_round_trip(error: Errno, handle: int) -> None:
    assert protocol.decode_simple_reply(protocol.encode_simple_reply(error, handle)) == (
        error,
        handle,
    )


@given(u32, st.binary(max_size=64))
def test_option_round_trip(option: int, data: bytes) -> None:
    encoded = protocol.encode_option(option, data)
    header = protocol.decode_option_header(encoded[: protocol.OPTION_HEADER_SIZE])
    assert header == protocol.OptionHeader(option=option, length=len(data))
    assert encoded[protocol.OPTION_HEADER_SIZE :] == data


@given(u32, st.sampled_from(list(OptionReply)), st.binary(max_size=64))
def test_option_reply_round_trip(option: int, reply: OptionReply, data: bytes) -> None:
    encoded = protocol.encode_option_reply(option, reply, data)
    header = protocol.decode_option_reply_header(encoded[: protocol.OPTION_REPLY_HEADER_SIZE])
    assert header == protocol.OptionReplyHeader(option=option, reply=reply, length=len(data))


def test_bad_option_magic() -> None:
    with pytest.raises(ProtocolViolation, match="bad option magic"):
        protocol.decode_option_header(b"NBDMAGIC" + bytes(8))


@given(names, st.lists(u16, max_size=20).map(tuple))
def test_info_request_round_trip(name: str, items: tuple[int, ...]) -> None:
    request = InfoRequest(name=name, items=items)
    assert protocol.decode_info_request(protocol.encode_info_request(request)) == request


@given(st.binary(max_size=80))
def test_info_request_decoding_never_crashes(data: bytes) -> None:
    with contextlib.suppress(ProtocolViolation):
        request = protocol.decode_info_request(data)
        assert protocol.encode_info_request(request) == data


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00\x00\x09abc\x00\x00",  # name longer than the data
        b"\x00\x00\x00\x03abc\x00\x02\x00\x00",  # two items announced, one sent
        b"\x00\x00\x00\x02\xff\xfe\x00\x00",  # name not UTF-8
        b"\x00\x00\x00\x02a\x00\x00\x00",  # name with NUL
    ],
)
def test_malformed_info_requests(data: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        protocol.decode_info_request(data)


def test_decode_name_limits() -> None:
    assert protocol.decode_name("é".encode()) == "é"
    with pytest.raises(ProtocolViolation, match="longer than 4096"):
        protocol.decode_name(b"x" * 4097)


SIZE = 1 << 20


def _check(command: Command, offset: int, length: int, flags: int = 0, ro: bool = False) -> Errno:
    request = Request(flags=flags, command=command, handle=1, offset=offset, length=length)
    return protocol.check_request(request, SIZE, ro)


def test_check_request_errors_follow_the_spec() -> None:
    assert _check(Command.READ, SIZE - 512, 512) == Errno.OK
    assert _check(Command.READ, SIZE - 512, 513) == Errno.EINVAL
    assert _check(Command.WRITE, SIZE, 1) == Errno.ENOSPC
    assert _check(Command.WRITE_ZEROES, SIZE - 1, 2) == Errno.ENOSPC
    assert _check(Command.TRIM, SIZE - 1, 2) == Errno.EINVAL
    assert _check(Command.WRITE, 0, 512, ro=True) == Errno.EPERM
    assert _check(Command.TRIM, 0, 512, ro=True) == Errno.EPERM
    assert _check(Command.WRITE_ZEROES, 0, 512, ro=True) == Errno.EPERM
    assert _check(Command.READ, 0, 512, ro=True) == Errno.OK
    assert _check(Command.FLUSH, 0, 0, ro=True) == Errno.OK
    assert _check(Command.FLUSH, 512, 0) == Errno.EINVAL
    assert _check(Command.READ, 0, protocol.MAX_PAYLOAD + 1) == Errno.EINVAL
    assert _check(Command.WRITE, 0, protocol.MAX_PAYLOAD + 1) == Errno.EINVAL
    assert _check(Command.BLOCK_STATUS, 0, 512) == Errno.EINVAL
    assert _check(Command.CACHE, 0, 512) == Errno.EINVAL
    assert _check(Command.WRITE, 0, 512, flags=CommandFlag.NO_HOLE) == Errno.EINVAL
    assert _check(Command.READ, 0, 512, flags=CommandFlag.DF) == Errno.EINVAL
    assert _check(Command.WRITE_ZEROES, 0, 512, flags=CommandFlag.FAST_ZERO) == Errno.EINVAL
    assert _check(Command.WRITE_ZEROES, 0, 512, flags=CommandFlag.NO_HOLE | 1) == Errno.OK
    assert _check(Command.READ, 0, 512, flags=CommandFlag.FUA) == Errno.OK
    unknown = Request(flags=0, command=99, handle=1, offset=0, length=0)
    assert protocol.check_request(unknown, SIZE, False) == Errno.EINVAL


def test_payloadless_commands_may_exceed_the_payload_limit() -> None:
    big = 2 * protocol.MAX_PAYLOAD
    request = Request(flags=0, command=Command.TRIM, handle=1, offset=0, length=big)
    assert protocol.check_request(request, big, False) == Errno.OK
    zero = Request(flags=0, command=Command.WRITE_ZEROES, handle=1, offset=0, length=big)
    assert protocol.check_request(zero, big, False) == Errno.OK


@given(requests, st.integers(0, 2**40), st.booleans())
def test_accepted_requests_are_in_bounds_and_allowed(
    request: Request, size: int, read_only: bool
) -> None:
    if request.command == Command.DISC:
        return
    error = protocol.check_request(request, size, read_only)
    if error != Errno.OK:
        return
    command = Command(request.command)
    assert command in (
        Command.READ,
        Command.WRITE,
        Command.FLUSH,
        Command.TRIM,
        Command.WRITE_ZEROES,
    )
    assert not request.flags & ~int(CommandFlag.FUA | CommandFlag.NO_HOLE)
    if command is Command.FLUSH:
        assert request.offset == request.length == 0
    else:
        assert request.offset + request.length <= size
    if command in (Command.READ, Command.WRITE):
        assert request.length <= protocol.MAX_PAYLOAD
    if read_only:
        assert command in (Command.READ, Command.FLUSH)


@pytest.mark.parametrize(
    ("host", "nbd"),
    [
        (errno.ENOSPC, Errno.ENOSPC),
        (errno.EDQUOT, Errno.ENOSPC),
        (errno.EFBIG, Errno.ENOSPC),
        (errno.EROFS, Errno.EPERM),
        (errno.EACCES, Errno.EPERM),
        (errno.EINVAL, Errno.EINVAL),
        (errno.EIO, Errno.EIO),
        (errno.ESTALE, Errno.EIO),
        (None, Errno.EIO),
    ],
)
def test_host_errors_map_to_nbd_errors(host: int | None, nbd: Errno) -> None:
    assert protocol.errno_to_nbd(host) == nbd


@pytest.mark.parametrize("bit", range(16))
def test_every_undocumented_flag_bit_is_refused(bit: int) -> None:
    flags = 1 << bit
    expected = Errno.OK if flags == CommandFlag.FUA else Errno.EINVAL
    assert _check(Command.WRITE, 0, 512, flags=flags) == expected
