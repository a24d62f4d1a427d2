"""Framing of QEMU's ``-netdev stream`` / ``-netdev socket`` byte stream.

On a stream socket QEMU sends and expects each Ethernet frame as a big-endian
32-bit length followed by that many bytes of frame (no virtio-net header: the
stream backend never negotiates one).  QEMU 7.2 writes frames this way in
``net_stream_receive`` (net/stream.c) and reassembles incoming ones in
``net_fill_rstate`` (net/net.c) into a buffer of ``NET_BUFSIZE`` = 4096 + 65536
bytes, terminating the connection on a longer one.

:class:`FrameDecoder` is a pure incremental decoder (feed it any chunking of the
stream, get whole frames back); :func:`encode_frame` is its inverse.  Neither
does I/O, so both are unit- and property-tested without sockets.
"""

from __future__ import annotations

import struct

from kemari.errors import NetError

LENGTH_HEADER = struct.Struct(">I")

# QEMU's NET_BUFSIZE: the longest frame its stream reader accepts.
QEMU_MAX_FRAME = 4096 + 65536
# Destination MAC, source MAC and EtherType: nothing shorter is an Ethernet frame.
ETHERNET_HEADER_LEN = 14


class FramingError(NetError):
    """The byte stream violates the framing; the connection cannot be resynchronised.

    ``complete_frames`` holds the valid frames that preceded the violation in the
    same chunk: they were really sent and the caller should still deliver them.
    """

    def __init__(self, message: str, complete_frames: tuple[bytes, ...] = ()) -> None:
        super().__init__(message)
        self.complete_frames = complete_frames


def _check_length(length: int, max_frame: int) -> None:
    if length < ETHERNET_HEADER_LEN:
        raise FramingError(
            f"frame length {length} is shorter than an Ethernet header ({ETHERNET_HEADER_LEN})"
        )
    if length > max_frame:
        raise FramingError(f"frame length {length} exceeds the maximum of {max_frame}")


def encode_frame(frame: bytes, max_frame: int = QEMU_MAX_FRAME) -> bytes:
    """Return ``frame`` with its length header, ready to write to the stream."""
    _check_length(len(frame), max_frame)
    return LENGTH_HEADER.pack(len(frame)) + frame


class FrameDecoder:
    """Turns arbitrary chunks of a framed byte stream back into frames.

    Invariant: ``_buffer`` never holds a whole frame after :meth:`feed` returns,
    and a length header is validated as soon as its four bytes are in, so an
    oversized length is rejected before any of its body is buffered.  After a
    :class:`FramingError` the decoder is poisoned: the stream has lost its frame
    boundaries and the connection must be dropped.
    """

    def __init__(self, max_frame: int = QEMU_MAX_FRAME) -> None:
        if not ETHERNET_HEADER_LEN <= max_frame <= QEMU_MAX_FRAME:
            raise ValueError(
                f"max_frame must be in [{ETHERNET_HEADER_LEN}, {QEMU_MAX_FRAME}], got {max_frame}"
            )
        self.max_frame = max_frame
        self._buffer = bytearray()
        self._failed: FramingError | None = None

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """Consume ``data``; return every frame it completed, in stream order."""
        if self._failed is not None:
            raise FramingError(f"stream already failed: {self._failed}")
        self._buffer += data
        frames: list[bytes] = []
        offset = 0
        end = len(self._buffer)
        while end - offset >= LENGTH_HEADER.size:
            (length,) = LENGTH_HEADER.unpack_from(self._buffer, offset)
            try:
                _check_length(length, self.max_frame)
            except FramingError as exc:
                self._failed = exc
                self._buffer.clear()
                raise FramingError(str(exc), tuple(frames)) from None
            body_start = offset + LENGTH_HEADER.size
            if end - body_start < length:
                break
            frames.append(bytes(self._buffer[body_start : body_start + length]))
            offset = body_start + length
        del self._buffer[:offset]
        return frames
