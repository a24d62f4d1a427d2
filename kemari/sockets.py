"""Unix socket paths: checking their length, claiming one safely (a live listener is
never stolen), and private files: sockets, directories and logs made with explicit modes
whatever the umask (docs/security.md, "Local access")."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

from kemari.errors import ConfigError

# Linux's sockaddr_un.sun_path holds 108 bytes, the terminating NUL included.
MAX_SOCKET_PATH = 107
# Local access (docs/security.md): only the owner may connect to a socket, enter the
# runtime directory or write a log; the group may read logs.
SOCKET_MODE = 0o600
DIRECTORY_MODE = 0o700
PARENT_DIRECTORY_MODE = 0o755
LOG_MODE = 0o640
# The umask under which a socket is bound (and QEMU runs): a socket gets 0o777 & ~umask.
SOCKET_UMASK = 0o177
_umask_lock = threading.Lock()


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """Run the block under ``mask`` (the umask is per process: one block at a time)."""
    with _umask_lock:
        old = os.umask(mask)
        try:
            yield
        finally:
            os.umask(old)


def bind_private_socket(path: Path, what: str = "socket") -> socket.socket:
    """A unix stream socket bound at ``path`` with mode 0600 whatever the umask.

    Bound under umask 0177, so the socket file never exists with a looser mode, and
    chmod'ed again to say so explicitly.  The caller listens (``asyncio.start_unix_server
    (sock=...)``); ``path`` must have been claimed (:func:`claim_socket_path`).
    """
    check_socket_path(path, f"{what} path")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with umask(SOCKET_UMASK):
            sock.bind(str(path))
        os.chmod(path, SOCKET_MODE)
    except BaseException:
        sock.close()
        raise
    return sock


def make_private_dir(path: Path) -> bool:
    """Create ``path`` with mode 0700 (missing parents 0755), whatever the umask; an
    existing directory is tightened to 0700.  Returns True when ``path`` was created."""
    missing = []
    parent = path
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        mode = DIRECTORY_MODE if directory == path else PARENT_DIRECTORY_MODE
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode)
        os.chmod(directory, mode)  # mkdir's mode is masked by the umask
    if not missing:
        if not path.is_dir():
            raise NotADirectoryError(f"{path} is not a directory")
        if stat.S_IMODE(path.stat().st_mode) != DIRECTORY_MODE:
            os.chmod(path, DIRECTORY_MODE)
    return bool(missing)


def create_log(path: Path) -> None:
    """Make sure ``path`` exists with mode 0640 (the guest's serial log), whatever the
    umask, before another process (QEMU) opens it for writing."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, LOG_MODE)
    try:
        os.fchmod(fd, LOG_MODE)
    finally:
        os.close(fd)


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
