"""Unix socket paths: checking their length, claiming one safely (a live listener is
never stolen)."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from pathlib import Path

from kemari.errors import ConfigError

# Linux's sockaddr_un.sun_path holds 108 bytes, the terminating NUL included.
MAX_SOCKET_PATH = 107


def check_socket_path(path: Path, what: str = "socket path") -> None:
    """Raise :class:`ConfigError` when ``path`` is too long to bind or connect to.

    Python's own error for it is ``OSError: AF_UNIX path too long``, which names
    neither the path nor the limit.
    """
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        raise ConfigError(
            f"{what} {path} is {size} bytes long; unix socket paths are limited to "
            f"{MAX_SOCKET_PATH} bytes"
        )


def socket_in_use(path: Path) -> bool:
    """True when something accepts connections on the unix socket at ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def claim_socket_path(path: Path) -> None:
    """Make ``path`` free for a new listener, removing only a stale socket.

    Raises :class:`ConfigError` when the path is too long for a socket, when a live
    process listens there or when the path is something other than a socket (we never
    delete a user's file).
    """
    check_socket_path(path)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the directory of {path}: {exc.strerror}") from exc
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"socket path {path} exists and is not a socket")
    if socket_in_use(path):
        raise ConfigError(f"socket path {path} is in use by a running process")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
