"""A fake standby that answers HELLO (the digest is public) and then never reads again.

Run as a script it prints its port and blocks; :func:`stuck_standby` runs it as a child
process for a test and yields that port.  Issue 10.5's probe: the primary's sends must
meet their deadline instead of waiting for it forever.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from kemari.transaction.wire import FrameDecoder, Hello, HelloAck, Role, encode_frame


@contextlib.contextmanager
def stuck_standby() -> Iterator[int]:
    """A running stuck standby on 127.0.0.1; yields its port, kills it afterwards."""
    process = subprocess.Popen(
        [sys.executable, __file__],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert process.stdout is not None
        yield int(process.stdout.readline())
    finally:
        process.kill()
        process.wait()


def _serve() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    print(listener.getsockname()[1], flush=True)
    conn, _ = listener.accept()
    decoder = FrameDecoder()
    hello: Hello | None = None
    while hello is None:
        wanted = 36 if decoder.at_frame_boundary else decoder.wanted
        for frame in decoder.feed(conn.recv(wanted)):
            if not isinstance(frame.payload, Hello):
                raise SystemExit(f"expected HELLO, got {frame.payload.TYPE.name}")
            hello = frame.payload
    ack = HelloAck(Role.STANDBY, hello.vm_name, hello.config_digest, (), nonce=bytes(32))
    conn.sendall(b"".join(encode_frame(ack, 0)))
    time.sleep(3600)  # never reads again: the behaviour under test


if __name__ == "__main__":
    _serve()
