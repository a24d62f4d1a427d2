"""Small files Kemari keeps on disk: one frame format, atomic replace, bounded checked reads.

Every small file the standby's replica writes (docs/replica.md, "Files") is one *frame*::

    offset  size  field
    0       8     magic            per format (``Format.magic``), e.g. b"KMR:STAT"
    8       4     format version   u32, little-endian
    12      4     crc32            zlib.crc32 of bytes 0..12, 16..24 and the payload
    16      8     payload length   u64, little-endian
    24      n     payload          the format's own bytes

like Firecracker's snapshot files (magic and version up front, a checksum over the whole
thing), so a file is recognised before it is trusted:

- a **foreign** file (wrong magic: not this format, or written by an older Kemari before
  it had this header) raises :class:`ForeignFileError`;
- a **newer** format version than this build reads raises :class:`NewerVersionError`, an
  **older** one :class:`OlderVersionError`;
- a **torn** file (shorter or longer than its header says, or failing its CRC) raises
  :class:`TornFileError`;
- an **oversized** one (declared payload, or the file itself, above ``max_payload``)
  raises :class:`OversizedFileError` before anything beyond the header is read.

Each is a one-line :class:`~kemari.errors.PersistError` naming the file and what was
expected.  Writing is :func:`write_file`: a temporary file in the same directory, fsync of
the file, rename over the old one, fsync of the directory.  Readers see the old or the new
file, never a mix, whatever kills the process; with ``durable`` (the default) that also
holds for a crash of the host.  ``durable=False`` skips the two fsyncs and is meant only
for memory filesystems (:func:`is_volatile`), where they buy nothing.

This module is at the bottom of the layers: it imports only :mod:`kemari.errors`.
"""

import contextlib
import errno
import os
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from kemari.errors import PersistError

HEADER = struct.Struct("<8sIIQ")  # magic, version, crc32, payload length
MAGIC_SIZE = 8
MAX_VERSION = (1 << 32) - 1
TEMPORARY_SUFFIX = ".tmp"
_IOV_MAX = 1024  # the Linux limit of buffers per writev(2)

Buffer = bytes | bytearray | memoryview


class MissingFileError(PersistError):
    """The file does not exist."""


class TornFileError(PersistError):
    """The file is cut short, longer than its header says, or fails its CRC."""


class ForeignFileError(PersistError):
    """The file does not start with the format's magic (another format, or pre-header)."""


class NewerVersionError(PersistError):
    """The file has a newer format version than this build reads."""


class OlderVersionError(PersistError):
    """The file has an older format version than this build reads."""


class OversizedFileError(PersistError):
    """The payload (declared or actual) is larger than the format allows."""


@dataclass(frozen=True, slots=True)
class Format:
    """One kind of file: its name in messages, magic, current version and size bound."""

    name: str  # e.g. "replica state", used as "... is not a replica state file"
    magic: bytes  # exactly 8 bytes
    version: int  # written, and the only version read (1..2**32-1)
    max_payload: int  # bytes; checked before a payload is allocated or written

    def __post_init__(self) -> None:
        if len(self.magic) != MAGIC_SIZE:
            raise ValueError(f"magic {self.magic!r} is not {MAGIC_SIZE} bytes")
        if not 1 <= self.version <= MAX_VERSION:
            raise ValueError(f"version {self.version} is not in 1..2**32-1")
        if self.max_payload < 0:
            raise ValueError(f"max_payload {self.max_payload} is negative")


# ----- the frame ------------------------------------------------------------------------


def _checksum(head: bytes, payload: Iterable[Buffer]) -> int:
    crc = zlib.crc32(head[:12])
    crc = zlib.crc32(head[16:], crc)
    for piece in payload:
        crc = zlib.crc32(piece, crc)
    return crc


def _pieces(payload: Buffer | Iterable[Buffer]) -> list[Buffer]:
    if isinstance(payload, bytes | bytearray | memoryview):
        return [payload]
    return list(payload)


def _nbytes(piece: Buffer) -> int:
    return piece.nbytes if isinstance(piece, memoryview) else len(piece)


def encode(fmt: Format, payload: Buffer | Iterable[Buffer]) -> list[Buffer]:
    """The frame of ``payload`` (one buffer or several, concatenated): header, then payload.

    OversizedFileError if the payload is larger than ``fmt.max_payload``.
    """
    pieces = _pieces(payload)
    length = sum(_nbytes(piece) for piece in pieces)
    if length > fmt.max_payload:
        raise OversizedFileError(
            f"{fmt.name} payload of {length} bytes exceeds its bound of {fmt.max_payload}"
        )
    unsigned = HEADER.pack(fmt.magic, fmt.version, 0, length)
    header = HEADER.pack(fmt.magic, fmt.version, _checksum(unsigned, pieces), length)
    return [header, *pieces]


def _check_header(fmt: Format, head: bytes, size: int, where: object) -> int:
    """Check the first bytes of a ``size``-byte file; return the declared payload length."""
    expected = f"a version {fmt.version} {fmt.name} file"
    magic = head[:MAGIC_SIZE]
    if magic != fmt.magic:
        if len(magic) < MAGIC_SIZE and fmt.magic.startswith(magic):
            raise TornFileError(f"{where} is cut short: {size} bytes, not even a header")
        raise ForeignFileError(
            f"{where} is not {expected} (it starts with {magic!r}, not {fmt.magic!r}): "
            "a foreign file, or one written by an older Kemari"
        )
    if size < HEADER.size:
        raise TornFileError(f"{where} is cut short: {size} bytes, not even a header")
    _, version, _, length = HEADER.unpack_from(head)
    if version > fmt.version:
        raise NewerVersionError(
            f"{where} is a version {version} {fmt.name} file; this Kemari reads version "
            f"{fmt.version} (written by a newer Kemari)"
        )
    if version < fmt.version:
        raise OlderVersionError(
            f"{where} is a version {version} {fmt.name} file; this Kemari reads version "
            f"{fmt.version} (written by an older Kemari)"
        )
    if length > fmt.max_payload or size - HEADER.size > fmt.max_payload:
        raise OversizedFileError(
            f"{where} declares {length} bytes in {size - HEADER.size}, more than the "
            f"{fmt.max_payload} a {fmt.name} file may hold"
        )
    if size != HEADER.size + length:
        raise TornFileError(
            f"{where} is torn: its header declares {length} payload bytes, "
            f"the file has {size - HEADER.size}"
        )
    return int(length)


def _check_crc(fmt: Format, head: bytes, payload: Buffer, where: object) -> None:
    (stored,) = struct.unpack_from("<I", head, 12)
    if _checksum(head, [payload]) != stored:
        raise TornFileError(f"{where} is torn or damaged: its {fmt.name} CRC does not match")


def decode(fmt: Format, data: Buffer, where: object = "data") -> memoryview:
    """The payload of a whole frame held in memory (``where`` names it in errors)."""
    view = memoryview(data).cast("B")
    head = bytes(view[: HEADER.size])
    length = _check_header(fmt, head, view.nbytes, where)
    payload = view[HEADER.size : HEADER.size + length]
    _check_crc(fmt, head, payload, where)
    return payload


# ----- files ------------------------------------------------------------------------------


def write_file(
    path: Path, fmt: Format, payload: Buffer | Iterable[Buffer], *, durable: bool = True
) -> None:
    """Replace ``path`` with a frame of ``payload``, atomically.

    Order: write ``<name>.tmp`` in the same directory, fsync it, rename it over ``path``,
    fsync the directory.  ``durable=False`` (memory filesystems only) skips both fsyncs.
    PersistError (OversizedFileError for a too-large payload) on failure; ``path`` is then
    unchanged.
    """
    frame = encode(fmt, payload)
    temporary = path.with_name(path.name + TEMPORARY_SUFFIX)
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, frame)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
        if durable:
            fsync_directory(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise PersistError(f"cannot write {fmt.name} file {path}: {exc}") from exc


def _write_all(fd: int, pieces: list[Buffer]) -> None:
    """Write ``pieces`` in order with as few writev(2) calls as the kernel allows."""
    views = [memoryview(piece).cast("B") for piece in pieces]
    first = 0
    while first < len(views):
        written = os.writev(fd, views[first : first + _IOV_MAX])
        if not written:  # views[first] is never empty here
            raise OSError(errno.EIO, "writev wrote nothing")
        while written and first < len(views):
            size = views[first].nbytes
            if written >= size:
                written -= size
                first += 1
            else:
                views[first] = views[first][written:]
                written = 0
        while first < len(views) and not views[first]:
            first += 1


def read_file(path: Path, fmt: Format) -> bytes:
    """The payload of ``path``, checked (header, bounds, CRC) before it is returned.

    At most ``HEADER.size + fmt.max_payload`` bytes are ever read; the payload is allocated
    only after its declared length was checked against the bound and the file's size.
    """
    try:
        handle = path.open("rb")
    except FileNotFoundError as exc:
        raise MissingFileError(f"{path} is missing (no {fmt.name} file)") from exc
    except OSError as exc:
        raise PersistError(f"cannot read {fmt.name} file {path}: {exc}") from exc
    try:
        with handle:
            size = os.fstat(handle.fileno()).st_size
            head = handle.read(HEADER.size)
            length = _check_header(fmt, head, size, path)
            payload = handle.read(length)
    except OSError as exc:
        raise PersistError(f"cannot read {fmt.name} file {path}: {exc}") from exc
    if len(payload) != length:  # the file shrank under us
        raise TornFileError(f"{path} is torn: {len(payload)} of {length} payload bytes")
    _check_crc(fmt, head, payload, path)
    return payload


def replace_symlink(path: Path, target: str, *, durable: bool = True) -> None:
    """Point the symlink ``path`` at ``target`` atomically (new link, rename, directory fsync)."""
    temporary = path.with_name(path.name + TEMPORARY_SUFFIX)
    try:
        temporary.unlink(missing_ok=True)
        os.symlink(target, temporary)
        os.replace(temporary, path)
        if durable:
            fsync_directory(path.parent)
    except OSError as exc:
        raise PersistError(f"cannot point {path} at {target}: {exc}") from exc


# ----- filesystems --------------------------------------------------------------------------


def fsync_directory(directory: Path) -> None:
    """Make a rename, a new or a removed entry in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Filesystems whose contents live only in memory: an fsync buys nothing there, and
# their contents survive a crash of the process (not of the host).
VOLATILE_FILESYSTEMS = frozenset({"tmpfs", "ramfs", "hugetlbfs"})


def _unescape_mount_path(field: str) -> str:
    """Undo /proc/self/mountinfo's octal escapes (space, tab, newline, backslash)."""
    out = []
    index = 0
    while index < len(field):
        escape = field[index + 1 : index + 4]
        if field[index] == "\\" and len(escape) == 3 and escape.isdigit():
            out.append(chr(int(escape, 8)))
            index += 4
        else:
            out.append(field[index])
            index += 1
    return "".join(out)


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding ``path`` (longest mount point that contains it)."""
    target = os.path.realpath(path)
    best_mount = ""
    best_type = "unknown"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
            for line in mountinfo:
                fields = line.split(" - ", 1)
                if len(fields) != 2:
                    continue
                mount_point = _unescape_mount_path(fields[0].split()[4])
                fs_type = fields[1].split()[0]
                inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
                if inside and len(mount_point) >= len(best_mount):
                    best_mount, best_type = mount_point, fs_type
    except OSError as exc:
        raise PersistError(f"cannot read /proc/self/mountinfo: {exc}") from exc
    return best_type


def is_volatile(path: Path) -> bool:
    """True when ``path`` lies on a memory-only filesystem (tmpfs, ramfs, hugetlbfs)."""
    return filesystem_type(path) in VOLATILE_FILESYSTEMS
