"""A userspace stand-in for a guest NIC: speaks QEMU's stream framing to a NetBridge.

It connects to the bridge's socket exactly as QEMU's ``-netdev stream`` client
does and answers ARP requests and ICMP echo requests for one IPv4 address, so
``ping`` from a client namespace exercises the whole path (client -> LAN ->
host br0 -> tap -> bridge -> socket -> here, and back) without a guest OS.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import struct

from kemari.errors import NetError
from kemari.net.bridge import FlowCounters
from kemari.net.stream import FrameDecoder, encode_frame

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
_ETH = struct.Struct("!6s6sH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")
_IPV4_MIN = struct.Struct("!BBHHHBBH4s4s")
_ARP_REQUEST, _ARP_REPLY = 1, 2
_ICMP_PROTO = 1
_ICMP_ECHO_REQUEST, _ICMP_ECHO_REPLY = 8, 0


def internet_checksum(data: bytes) -> int:
    """RFC 1071 ones'-complement checksum."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def parse_mac(text: str) -> bytes:
    """``52:54:00:12:34:56`` -> 6 bytes."""
    try:
        mac = bytes(int(part, 16) for part in text.split(":"))
    except ValueError as exc:
        raise NetError(f"invalid MAC address {text!r}") from exc
    if len(mac) != 6:
        raise NetError(f"invalid MAC address {text!r}")
    return mac


class EchoResponder:
    """Pure logic: the reply (if any) a host with ``mac``/``ip`` sends to a frame."""

    def __init__(self, mac: bytes, ip: ipaddress.IPv4Address) -> None:
        self.mac = mac
        self.ip = ip.packed

    def reply(self, frame: bytes) -> bytes | None:
        """Answer ARP who-has and ICMP echo for our address; ignore everything else."""
        if len(frame) < _ETH.size:
            return None
        _, source, ethertype = _ETH.unpack_from(frame)
        payload = frame[_ETH.size :]
        if ethertype == ETHERTYPE_ARP:
            return self._arp_reply(source, payload)
        if ethertype == ETHERTYPE_IPV4:
            return self._echo_reply(source, payload)
        return None

    def _arp_reply(self, source: bytes, payload: bytes) -> bytes | None:
        if len(payload) < _ARP.size:
            return None
        htype, ptype, hlen, plen, oper, sha, spa, _, tpa = _ARP.unpack_from(payload)
        if (htype, ptype, hlen, plen, oper) != (1, ETHERTYPE_IPV4, 6, 4, _ARP_REQUEST):
            return None
        if tpa != self.ip:
            return None
        arp = _ARP.pack(1, ETHERTYPE_IPV4, 6, 4, _ARP_REPLY, self.mac, self.ip, sha, spa)
        return _ETH.pack(source, self.mac, ETHERTYPE_ARP) + arp

    def _echo_reply(self, source: bytes, packet: bytes) -> bytes | None:
        if len(packet) < _IPV4_MIN.size:
            return None
        version_ihl, tos, total_length, ident, frag, _ttl, proto, _, src, dst = (
            _IPV4_MIN.unpack_from(packet)
        )
        header_length = (version_ihl & 0x0F) * 4
        if version_ihl >> 4 != 4 or header_length < _IPV4_MIN.size or proto != _ICMP_PROTO:
            return None
        if dst != self.ip or frag & 0x3FFF or not header_length < total_length <= len(packet):
            return None
        icmp = bytearray(packet[header_length:total_length])
        if len(icmp) < 8 or icmp[0] != _ICMP_ECHO_REQUEST:
            return None
        icmp[0] = _ICMP_ECHO_REPLY
        icmp[2:4] = b"\0\0"
        icmp[2:4] = struct.pack("!H", internet_checksum(bytes(icmp)))
        header = _IPV4_MIN.pack(
            0x45, tos, 20 + len(icmp), ident, 0, 64, _ICMP_PROTO, 0, self.ip, src
        )
        header = header[:10] + struct.pack("!H", internet_checksum(header)) + header[12:]
        return _ETH.pack(source, self.mac, ETHERTYPE_IPV4) + header + bytes(icmp)


class FakeNic:
    """One stream connection to a NetBridge, answering ARP and ping for ``ip``."""

    def __init__(self, mac: str, ip: str) -> None:
        self.responder = EchoResponder(parse_mac(mac), ipaddress.IPv4Address(ip))
        self.sent = FlowCounters()
        self.received = FlowCounters()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._decoder = FrameDecoder()
        self._half_closed = False

    async def connect(self, path: str) -> None:
        """Connect like ``-netdev stream,server=off,addr.type=unix``."""
        try:
            self._reader, self._writer = await asyncio.open_unix_connection(path)
        except OSError as exc:
            raise NetError(f"fake NIC cannot connect to {path}: {exc}") from exc

    def send(self, frame: bytes) -> None:
        """Queue one frame towards the bridge."""
        if self._writer is None:
            raise NetError("fake NIC is not connected")
        self._writer.write(encode_frame(frame))
        self.sent.add(frame)

    def send_raw(self, data: bytes) -> None:
        """Write bytes that need not be valid framing (to test the bridge's validation)."""
        if self._writer is None:
            raise NetError("fake NIC is not connected")
        self._writer.write(data)

    async def serve(self) -> None:
        """Answer frames until the bridge closes the connection."""
        if self._reader is None or self._writer is None:
            raise NetError("fake NIC is not connected")
        while data := await self._reader.read(65536):
            for frame in self._decoder.feed(data):
                self.received.add(frame)
                reply = None if self._half_closed else self.responder.reply(frame)
                if reply is not None:
                    self.send(reply)
            if not self._half_closed:
                await self._writer.drain()

    async def finish(self) -> None:
        """Stop sending (half-close), then read until the bridge closes its side.

        Afterwards the counters are final on both ends: every frame the bridge
        forwarded to this NIC has been read.
        """
        if self._writer is None:
            raise NetError("fake NIC is not connected")
        self._half_closed = True
        await self._writer.drain()
        self._writer.write_eof()

    async def close(self) -> None:
        """Drop the connection at once."""
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
            self._writer = None
