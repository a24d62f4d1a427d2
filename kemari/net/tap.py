"""Host tap device: one Ethernet frame per read/write on a /dev/net/tun descriptor.

The tap is created with ``IFF_TAP | IFF_NO_PI`` (raw frames, no packet-info
prefix) and is *not* persistent: the kernel removes the interface when the last
descriptor closes, so a crashed Kemari leaves no tap behind.  Link state, address
and bridge membership are set with ``ip link`` in the caller's network namespace.

A Linux bridge without an address of its own set takes the lowest MAC among its
ports.  The tap's address is therefore ``fe:`` plus random bytes (libvirt's rule),
above any real NIC's: with the kernel's random one, adding the tap (or its removal
when Kemari dies) could change the host's own address on ``br0``, and peers'
stale ARP entries then stall new connections to the host for seconds (found by the
records soak: a standby restarted on a host right after its agent died could not
be reached).
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import struct
import subprocess
from types import TracebackType

from kemari.errors import NetError

_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFNAMSIZ = 16
_IFREQ = struct.Struct("16sH")
# Linux accepts most bytes in names; we only allow ones that are safe on a command line.
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")
# Larger than any frame a tap without IFF_VNET_HDR can deliver (MTU is at most 65535).
READ_SIZE = 65536 + 4096


def validate_ifname(name: str) -> str:
    """Return ``name`` if it is a usable interface name (1-15 safe chars), else raise."""
    if not _NAME_PATTERN.fullmatch(name):
        raise NetError(
            f"invalid interface name {name!r}: 1-15 characters from [A-Za-z0-9_.-], "
            "not starting with a punctuation character"
        )
    return name


def tap_mac() -> str:
    """A random locally administered unicast MAC starting with ``fe`` (see the docstring)."""
    return ":".join(f"{byte:02x}" for byte in b"\xfe" + secrets.token_bytes(5))


def run_ip(*args: str) -> None:
    """Run ``ip ARGS`` and turn a failure into a :class:`NetError` with its stderr."""
    try:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise NetError("the 'ip' command is missing (install iproute2)") from exc
    except subprocess.CalledProcessError as exc:
        raise NetError(f"ip {' '.join(args)}: {exc.stderr.strip()}") from exc


class Tap:
    """An open, up tap interface; :meth:`close` (or leaving the ``with``) removes it."""

    def __init__(self, name: str, bridge: str | None = None) -> None:
        self.name = validate_ifname(name)
        self.bridge = None if bridge is None else validate_ifname(bridge)
        self._fd: int | None = None

    def open(self) -> None:
        """Create the tap, bring it up and, if asked, enslave it to the bridge."""
        if self._fd is not None:
            raise NetError(f"tap {self.name} is already open")
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise NetError(f"cannot open /dev/net/tun: {exc.strerror}") from exc
        try:
            request = _IFREQ.pack(self.name.encode(), _IFF_TAP | _IFF_NO_PI)
            try:
                fcntl.ioctl(fd, _TUNSETIFF, request)
            except OSError as exc:
                raise NetError(f"cannot create tap {self.name}: {exc.strerror}") from exc
            # Ordering: the address is set before the tap joins the bridge (so the
            # bridge's own address never changes), and the tap joins the bridge before
            # the link goes up (so no frame reaches it while it is stand-alone).
            run_ip("link", "set", "dev", self.name, "address", tap_mac())
            if self.bridge is not None:
                run_ip("link", "set", "dev", self.name, "master", self.bridge)
            run_ip("link", "set", "dev", self.name, "up")
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def fileno(self) -> int:
        """The non-blocking tap descriptor (for the event loop)."""
        if self._fd is None:
            raise NetError(f"tap {self.name} is not open")
        return self._fd

    def read_frame(self) -> bytes | None:
        """One frame from the host side, or None when none is waiting."""
        try:
            return os.read(self.fileno(), READ_SIZE)
        except BlockingIOError:
            return None

    def write_frame(self, frame: bytes) -> None:
        """Inject one frame into the host side as if it arrived on the wire."""
        try:
            written = os.write(self.fileno(), frame)
        except OSError as exc:
            raise NetError(f"tap {self.name}: writing a {len(frame)}-byte frame: {exc}") from exc
        if written != len(frame):
            raise NetError(f"tap {self.name}: short write {written} of {len(frame)} bytes")

    def close(self) -> None:
        """Close the descriptor; the kernel then deletes the (non-persistent) tap."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> Tap:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
