"""Unix socket paths: claiming one safely (a live listener is never stolen)."""

from __future__ import annotations

import contextlib
import socket
import stat
from pathlib import Path

from kemari.errors import ConfigError


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

    Raises :class:`ConfigError` when a live process listens there or when the
    path is something other than a socket (we never delete a user's file).
    """
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
