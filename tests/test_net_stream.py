"""Unit and property tests of the ``-netdev stream`` framing (kemari.net.stream)."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kemari.net.stream import (
    ETHERNET_HEADER_LEN,
    QEMU_MAX_FRAME,
    FrameDecoder,
    FramingError,
    encode_frame,
)

frames_strategy = st.lists(
    st.binary(min_size=ETHERNET_HEADER_LEN, max_size=2000), min_size=0, max_size=20
)


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    bounds = [0, *points, len(data)]
    return [data[start:end] for start, end in itertools.pairwise(bounds)]


def test_encoding_is_big_endian_length_then_frame():
    frame = bytes(range(60))
    assert encode_frame(frame) == b"\x00\x00\x00\x3c" + frame


def test_decoder_returns_frames_in_order():
    frames = [b"a" * 14, b"b" * 60, b"c" * 1514]
    decoder = FrameDecoder()
    assert decoder.feed(b"".join(encode_frame(f) for f in frames)) == frames
    assert decoder.pending == 0


def test_partial_frame_is_kept_until_complete():
    decoder = FrameDecoder()
    wire = encode_frame(b"x" * 100)
    assert decoder.feed(wire[:2]) == []
    assert decoder.feed(wire[2:50]) == []
    assert decoder.pending == 50
    assert decoder.feed(wire[50:]) == [b"x" * 100]


@given(frames=frames_strategy, cuts=st.lists(st.integers(min_value=0), max_size=30))
def test_round_trip_under_arbitrary_chunking(frames, cuts):
    wire = b"".join(encode_frame(f) for f in frames)
    decoder = FrameDecoder()
    decoded: list[bytes] = []
    for chunk in _chunks(wire, cuts):
        decoded += decoder.feed(chunk)
    assert decoded == frames
    assert decoder.pending == 0


@given(length=st.integers(min_value=QEMU_MAX_FRAME + 1, max_value=2**32 - 1))
def test_oversized_length_is_rejected_before_its_body(length):
    decoder = FrameDecoder()
    with pytest.raises(FramingError, match="exceeds the maximum"):
        decoder.feed(struct.pack(">I", length))


@given(length=st.integers(min_value=0, max_value=ETHERNET_HEADER_LEN - 1))
def test_zero_and_runt_lengths_are_rejected(length):
    decoder = FrameDecoder()
    with pytest.raises(FramingError, match="shorter than an Ethernet header"):
        decoder.feed(struct.pack(">I", length) + b"\0" * length)


def test_frames_before_a_bad_header_are_handed_over_with_the_error():
    good = [b"g" * 20, b"h" * 30]
    wire = b"".join(encode_frame(f) for f in good) + struct.pack(">I", 0)
    decoder = FrameDecoder()
    with pytest.raises(FramingError) as caught:
        decoder.feed(wire)
    assert list(caught.value.complete_frames) == good


def test_failed_decoder_refuses_more_data():
    decoder = FrameDecoder()
    with pytest.raises(FramingError):
        decoder.feed(struct.pack(">I", 0))
    with pytest.raises(FramingError, match="already failed"):
        decoder.feed(encode_frame(b"z" * 20))


def test_configured_maximum_applies_to_both_directions():
    decoder = FrameDecoder(max_frame=1518)
    assert decoder.feed(encode_frame(b"m" * 1518, max_frame=1518)) == [b"m" * 1518]
    with pytest.raises(FramingError):
        decoder.feed(struct.pack(">I", 1519))
    with pytest.raises(FramingError):
        encode_frame(b"m" * 1519, max_frame=1518)
    with pytest.raises(FramingError):
        encode_frame(b"")


@pytest.mark.parametrize("bad", [0, ETHERNET_HEADER_LEN - 1, QEMU_MAX_FRAME + 1])
def test_decoder_maximum_is_validated(bad):
    with pytest.raises(ValueError, match="max_frame"):
        FrameDecoder(max_frame=bad)
