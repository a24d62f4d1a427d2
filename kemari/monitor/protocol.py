"""Wire format of the Kemari monitor: one JSON object per line, each way.

Request:  ``{"command": ["info", "status"]}``
Reply:    ``{"return": <data>, "text": "<human rendering>"}``
          or ``{"error": {"class": "<ErrorClass>", "desc": "<one line>"}}``

Lines are UTF-8 and at most :data:`MAX_LINE` bytes; anything else is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kemari.errors import MonitorError

MAX_LINE = 64 * 1024
MAX_WORDS = 32


@dataclass(frozen=True)
class Reply:
    """A successful command result: machine data plus its human rendering."""

    data: Any
    text: str


def encode_request(words: list[str]) -> bytes:
    """Encode one command (a list of words) as a request line."""
    return json.dumps({"command": words}).encode() + b"\n"


def decode_request(line: bytes) -> list[str]:
    """Decode and validate a request line into its command words."""
    message = _decode_line(line)
    words = message.get("command")
    if (
        not isinstance(words, list)
        or not words
        or len(words) > MAX_WORDS
        or not all(isinstance(w, str) and w for w in words)
    ):
        raise MonitorError("request needs 'command': a non-empty list of words")
    return words


def encode_reply(reply: Reply) -> bytes:
    """Encode a successful reply line."""
    return json.dumps({"return": reply.data, "text": reply.text}).encode() + b"\n"


def encode_error(error_class: str, desc: str) -> bytes:
    """Encode an error reply line."""
    return json.dumps({"error": {"class": error_class, "desc": desc}}).encode() + b"\n"


def decode_reply(line: bytes) -> Reply:
    """Decode a reply line; an error reply raises :class:`MonitorError` with its text."""
    message = _decode_line(line)
    if "error" in message:
        error = message["error"]
        desc = error.get("desc") if isinstance(error, dict) else None
        raise MonitorError(str(desc) if desc else "monitor returned a malformed error")
    if "return" not in message or not isinstance(message.get("text"), str):
        raise MonitorError("monitor reply lacks 'return' or 'text'")
    return Reply(data=message["return"], text=message["text"])


def _decode_line(line: bytes) -> dict[str, Any]:
    if len(line) > MAX_LINE:
        raise MonitorError(f"monitor line longer than {MAX_LINE} bytes")
    try:
        message = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MonitorError(f"monitor line is not JSON: {exc}") from exc
    if not isinstance(message, dict):
        raise MonitorError("monitor line is not a JSON object")
    return message
