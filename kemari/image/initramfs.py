"""A deterministic initramfs writer: newc cpio archive, gzip-compressed.

The same entries always give the same bytes: entries are written sorted by
path (parents before children), with fixed inode numbers, owner root:root,
mtime 0 and a gzip header without name or timestamp.
"""

from __future__ import annotations

import gzip
import stat
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import BinaryIO

from kemari.errors import ImageError

_NEWC_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    """One archive member; ``mode`` includes the file type bits (``stat.S_IF*``)."""

    path: str
    mode: int
    data: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0


class Initramfs:
    """Collects entries, then writes them as one archive in a canonical order."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}

    def add_dir(self, path: str, perm: int = 0o755) -> None:
        """Add a directory and any missing parents."""
        self._add(Entry(_normalize(path), stat.S_IFDIR | perm))

    def add_file(self, path: str, data: bytes, perm: int = 0o644) -> None:
        """Add a regular file (parents are created as needed)."""
        self._add(Entry(_normalize(path), stat.S_IFREG | perm, data))

    def add_symlink(self, path: str, target: str) -> None:
        """Add a symbolic link pointing at ``target``."""
        self._add(Entry(_normalize(path), stat.S_IFLNK | 0o777, target.encode()))

    def add_char_device(self, path: str, major: int, minor: int, perm: int = 0o600) -> None:
        """Add a character device node (e.g. /dev/console, needed before devtmpfs)."""
        self._add(Entry(_normalize(path), stat.S_IFCHR | perm, b"", major, minor))

    def paths(self) -> list[str]:
        """Every member path, in archive order."""
        return sorted(self._entries, key=_order_key)

    def write(self, out: BinaryIO) -> None:
        """Write the gzip-compressed newc archive to ``out``."""
        # mtime=0 and an empty filename keep the gzip header free of build-time data.
        with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=9) as gz:
            for inode, path in enumerate(self.paths(), start=1):
                gz.write(_member(self._entries[path], inode))
            gz.write(_member(Entry(_TRAILER, 0), 0))

    def _add(self, entry: Entry) -> None:
        parent = str(PurePosixPath(entry.path).parent)
        if parent != ".":
            if parent not in self._entries:
                self.add_dir(parent)
            elif not stat.S_ISDIR(self._entries[parent].mode):
                raise ImageError(f"initramfs: {entry.path} is inside non-directory {parent}")
        existing = self._entries.get(entry.path)
        if existing is not None and existing != entry:
            if stat.S_ISDIR(existing.mode) and stat.S_ISDIR(entry.mode):
                return
            raise ImageError(f"initramfs: {entry.path} added twice with different contents")
        self._entries[entry.path] = entry


def read_members(data: bytes) -> dict[str, Entry]:
    """Parse an uncompressed newc archive (used to inspect and test what was written)."""
    members: dict[str, Entry] = {}
    pos = 0
    while True:
        header = data[pos : pos + 110]
        if len(header) < 110 or header[:6] != _NEWC_MAGIC:
            raise ImageError(f"initramfs: bad cpio header at offset {pos}")
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rmaj, rmin, namesize = (
            fields[1],
            fields[6],
            fields[9],
            fields[10],
            fields[11],
        )
        name_start = pos + 110
        name = data[name_start : name_start + namesize - 1].decode()
        data_start = _align4(name_start + namesize)
        content = data[data_start : data_start + filesize]
        pos = _align4(data_start + filesize)
        if name == _TRAILER:
            return members
        members[name] = Entry(name, mode, content, rmaj, rmin)


def _member(entry: Entry, inode: int) -> bytes:
    name = entry.path.encode() + b"\0"
    fields = (
        inode,
        entry.mode,
        0,  # uid
        0,  # gid
        2 if stat.S_ISDIR(entry.mode) else 1,  # nlink
        0,  # mtime
        len(entry.data),
        0,  # devmajor
        0,  # devminor
        entry.rdev_major,
        entry.rdev_minor,
        len(name),
        0,  # check (unused by newc)
    )
    header = _NEWC_MAGIC + b"".join(b"%08X" % value for value in fields)
    head = header + name
    head += b"\0" * (_align4(len(head)) - len(head))
    body = entry.data + b"\0" * (_align4(len(entry.data)) - len(entry.data))
    return head + body


def _align4(value: int) -> int:
    return (value + 3) & ~3


def _normalize(path: str) -> str:
    clean = str(PurePosixPath("/", path)).lstrip("/")
    if not clean or ".." in PurePosixPath(clean).parts:
        raise ImageError(f"initramfs: invalid member path {path!r}")
    return clean


def _order_key(path: str) -> tuple[str, ...]:
    # Comparing component tuples puts every directory right before its contents.
    return PurePosixPath(path).parts
