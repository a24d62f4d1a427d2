"""Tests of kemari.persist: the frame of every small replica file, atomic replace, errors."""

from __future__ import annotations

import json
import os
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kemari import persist
from kemari.errors import KemariError, PersistError
from kemari.persist import (
    HEADER,
    ForeignFileError,
    Format,
    MissingFileError,
    NewerVersionError,
    OlderVersionError,
    OversizedFileError,
    TornFileError,
)
from kemari.replica import applier, outputstore, store

FMT = Format("test record", b"KMR:TEST", 3, 1 << 16)
SETTINGS = settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])


def framed(payload: bytes, fmt: Format = FMT) -> bytes:
    return b"".join(bytes(piece) for piece in persist.encode(fmt, payload))


def test_errors_are_one_family_under_the_kemari_root():
    for kind in (
        MissingFileError,
        TornFileError,
        ForeignFileError,
        NewerVersionError,
        OlderVersionError,
        OversizedFileError,
    ):
        assert issubclass(kind, PersistError)
    assert issubclass(PersistError, KemariError)


def test_header_layout_is_the_documented_one(tmp_path):
    persist.write_file(tmp_path / "f", FMT, b"hello")
    data = (tmp_path / "f").read_bytes()
    magic, version, crc, length = struct.unpack_from("<8sIIQ", data)
    assert (magic, version, length, data[24:]) == (b"KMR:TEST", 3, 5, b"hello")
    assert crc == zlib.crc32(data[16:24] + b"hello", zlib.crc32(data[:12]))
    assert not (tmp_path / "f.tmp").exists()


@SETTINGS
@given(
    payload=st.binary(max_size=5000),
    magic=st.binary(min_size=8, max_size=8),
    version=st.integers(1, (1 << 32) - 1),
    split=st.integers(0, 5000),
    durable=st.booleans(),
)
def test_round_trip(tmp_path, payload, magic, version, split, durable):
    fmt = Format("random", magic, version, 8192)
    path = tmp_path / "file"
    # The payload may be given in pieces; the file holds them concatenated.
    pieces = [payload[:split], memoryview(payload[split:])]
    persist.write_file(path, fmt, pieces, durable=durable)
    assert persist.read_file(path, fmt) == payload
    assert bytes(persist.decode(fmt, path.read_bytes())) == payload


def test_many_pieces_of_any_size_are_written_in_order(tmp_path):
    # More pieces than one writev(2) takes, empty ones among them.
    pieces = [bytes([n % 251]) * (n % 7) for n in range(3000)]
    fmt = Format("pieces", b"KMR:PCES", 1, 1 << 20)
    persist.write_file(tmp_path / "f", fmt, pieces)
    assert persist.read_file(tmp_path / "f", fmt) == b"".join(pieces)


@SETTINGS
@given(payload=st.binary(max_size=300), data=st.data())
def test_any_truncation_is_torn(tmp_path, payload, data):
    whole = framed(payload)
    cut = data.draw(st.integers(0, len(whole) - 1))
    path = tmp_path / "file"
    path.write_bytes(whole[:cut])
    with pytest.raises(TornFileError, match=r"cut short|torn"):
        persist.read_file(path, FMT)
    with pytest.raises(TornFileError):
        persist.decode(FMT, whole[:cut])


@SETTINGS
@given(payload=st.binary(max_size=300), data=st.data())
def test_any_flipped_byte_is_refused_never_returned(tmp_path, payload, data):
    whole = bytearray(framed(payload))
    position = data.draw(st.integers(0, len(whole) - 1))
    whole[position] ^= data.draw(st.integers(1, 255))
    path = tmp_path / "file"
    path.write_bytes(whole)
    with pytest.raises(PersistError) as caught:
        persist.read_file(path, FMT)
    # Which kind depends on the field hit; a payload or CRC byte is always "torn".
    if position < 8:
        assert isinstance(caught.value, ForeignFileError)
    elif position >= 12:
        assert isinstance(caught.value, TornFileError | OversizedFileError)


def test_torn_file(tmp_path):
    path = tmp_path / "state"
    persist.write_file(path, FMT, b"x" * 100)
    whole = path.read_bytes()
    path.write_bytes(whole[:-1])
    with pytest.raises(TornFileError, match=r"header declares 100 payload bytes, the file has 99"):
        persist.read_file(path, FMT)
    path.write_bytes(whole + b"!")
    with pytest.raises(TornFileError, match="the file has 101"):
        persist.read_file(path, FMT)
    path.write_bytes(whole[:10])
    with pytest.raises(TornFileError, match="cut short: 10 bytes"):
        persist.read_file(path, FMT)
    path.write_bytes(b"")
    with pytest.raises(TornFileError, match="cut short: 0 bytes"):
        persist.read_file(path, FMT)
    path.write_bytes(whole[:-1] + bytes([whole[-1] ^ 0x40]))
    with pytest.raises(TornFileError, match="CRC does not match"):
        persist.read_file(path, FMT)


def test_foreign_file_including_the_pre_header_formats(tmp_path):
    path = tmp_path / "state.bin"
    # What state.bin looked like before it had this header (magic KMRS, u32 version 1).
    path.write_bytes(struct.pack("<4sIQdQI", b"KMRS", 1, 5, 0.0, 0, 0))
    with pytest.raises(ForeignFileError) as caught:
        persist.read_file(path, FMT)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path} is not a version 3 test record file")
    assert "older Kemari" in message
    path.write_text('{"format": 1, "blocks": []}')
    with pytest.raises(ForeignFileError, match=r"starts with b'\{\"format'"):
        persist.read_file(path, FMT)
    other = Format("other record", b"KMR:OTHR", 3, 100)
    persist.write_file(path, other, b"")
    with pytest.raises(ForeignFileError, match="KMR:OTHR"):
        persist.read_file(path, FMT)
    path.write_bytes(b"XY")  # short, and not a prefix of the magic
    with pytest.raises(ForeignFileError):
        persist.read_file(path, FMT)
    path.write_bytes(b"KMR:")  # a prefix of the magic: cut short
    with pytest.raises(TornFileError):
        persist.read_file(path, FMT)


def test_newer_and_older_versions(tmp_path):
    path = tmp_path / "f"
    persist.write_file(path, Format("test record", FMT.magic, 4, 100), b"future")
    with pytest.raises(NewerVersionError, match="version 4 test record file; this Kemari reads"):
        persist.read_file(path, FMT)
    persist.write_file(path, Format("test record", FMT.magic, 2, 100), b"past")
    with pytest.raises(OlderVersionError, match="older Kemari"):
        persist.read_file(path, FMT)


def test_oversized_file_is_refused_before_its_payload_is_read(tmp_path):
    small = Format("test record", FMT.magic, FMT.version, 16)
    path = tmp_path / "f"
    persist.write_file(path, FMT, b"y" * 17)
    with pytest.raises(OversizedFileError, match="declares 17 bytes in 17, more than the 16"):
        persist.read_file(path, small)
    # A header declaring a huge payload: refused from the header alone.
    path.write_bytes(HEADER.pack(FMT.magic, FMT.version, 0, 1 << 60))
    with pytest.raises(OversizedFileError, match=str(1 << 60)):
        persist.read_file(path, FMT)
    # A (sparse) file of 1 TiB whatever its header says: refused from its size; reading
    # it would fail with MemoryError, so nothing beyond the header was read.
    with path.open("wb") as handle:
        handle.write(HEADER.pack(FMT.magic, FMT.version, 0, 4))
        handle.truncate(HEADER.size + (1 << 40))
    with pytest.raises(OversizedFileError, match=f"in {1 << 40}, more than"):
        persist.read_file(path, FMT)
    with pytest.raises(OversizedFileError, match=r"payload of 17 bytes exceeds its bound of 16"):
        persist.write_file(path, small, b"y" * 17)


def test_missing_file(tmp_path):
    with pytest.raises(MissingFileError, match="no test record file"):
        persist.read_file(tmp_path / "nothing", FMT)


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "f"
    persist.write_file(path, FMT, b"old")
    (tmp_path / "f.tmp").mkdir()  # the temporary name is taken: open() fails
    with pytest.raises(PersistError, match="cannot write test record file"):
        persist.write_file(path, FMT, b"new")
    assert persist.read_file(path, FMT) == b"old"


def test_replace_symlink(tmp_path):
    link = tmp_path / "current"
    persist.replace_symlink(link, "gen-000001")
    persist.replace_symlink(link, "gen-000002", durable=False)
    assert os.readlink(link) == "gen-000002"
    assert not (tmp_path / "current.tmp").exists()


def test_bad_formats_are_programming_errors():
    with pytest.raises(ValueError, match="8 bytes"):
        Format("x", b"short", 1, 1)
    with pytest.raises(ValueError, match="version"):
        Format("x", b"KMR:XXXX", 0, 1)


def test_every_replica_format_has_its_own_magic():
    formats = [
        store.LAYOUT_FORMAT,
        store.STATE_FORMAT,
        store.HANDED_OVER_FORMAT,
        applier.STREAM_FORMAT,
        applier.VMDESC_FORMAT,
        outputstore.OUTPUTS_FORMAT,
    ]
    assert len({fmt.magic for fmt in formats}) == len(formats)
    assert len({fmt.name for fmt in formats}) == len(formats)


@SETTINGS
@given(
    epoch=st.integers(0, (1 << 63) - 1),
    committed_at=st.floats(allow_nan=False),
    device_state=st.binary(max_size=2000),
)
def test_replica_state_round_trip(tmp_path, epoch, committed_at, device_state):
    path = tmp_path / "state.bin"
    store._write_state(path, epoch, committed_at, device_state, durable=False)
    assert store._read_state(path) == (epoch, committed_at, device_state)


@SETTINGS
@given(
    machine_type=st.text(min_size=1, max_size=40),
    section_id=st.integers(0, (1 << 32) - 1),
    blocks=st.lists(
        st.tuples(
            st.text(min_size=1, max_size=255),
            st.integers(1, 1 << 40),
            st.none() | st.integers(0, (1 << 64) - 1),
        ),
        max_size=20,
    ),
)
def test_stream_description_round_trip(tmp_path, machine_type, section_id, blocks):
    info = applier.StreamInfo(
        machine_type, section_id, tuple(applier.RamBlock(*block) for block in blocks)
    )
    path = tmp_path / "stream.json"
    applier._write_file(
        path, applier.STREAM_FORMAT, json.dumps(info.to_json()).encode(), durable=False
    )
    payload = persist.read_file(path, applier.STREAM_FORMAT)
    assert applier.StreamInfo.from_json(payload, path) == info
