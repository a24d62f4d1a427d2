"""The user side of the monitor: send one command, get one reply (blocking, for the CLI)."""

from __future__ import annotations

import socket
from pathlib import Path

from kemari.errors import MonitorError
from kemari.monitor import protocol
from kemari.sockets import check_socket_path


def run_command(path: Path, words: list[str], timeout: float = 30.0) -> protocol.Reply:
    """Send ``words`` to the monitor at ``path`` and return its reply."""
    check_socket_path(path, "monitor socket path")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except FileNotFoundError as exc:
            raise MonitorError(f"no monitor at {path} (is the VM running?)") from exc
        except ConnectionRefusedError as exc:
            raise MonitorError(f"monitor at {path} refuses connections (stale socket?)") from exc
        except OSError as exc:
            raise MonitorError(f"cannot connect to monitor at {path}: {exc.strerror}") from exc
        try:
            sock.sendall(protocol.encode_request(words))
            line = _read_line(sock)
        except TimeoutError as exc:
            raise MonitorError(f"monitor at {path} did not answer in {timeout:.0f} s") from exc
        except OSError as exc:
            raise MonitorError(f"monitor at {path}: {exc.strerror}") from exc
    return protocol.decode_reply(line)


def _read_line(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise MonitorError("monitor closed the connection without answering")
        chunks.append(chunk)
        size += len(chunk)
        if chunk.endswith(b"\n") or b"\n" in chunk:
            return b"".join(chunks).split(b"\n", 1)[0]
        if size > protocol.MAX_LINE:
            raise MonitorError("monitor reply too long")
