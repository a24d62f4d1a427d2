"""Debian packages for the guest image: resolve, download and unpack, never install.

Versions come from the host's apt lists (``apt-cache show``, candidate version),
downloads from its configured mirrors (``apt-get download``, which verifies them
against the signed lists), and ``dpkg-deb -x`` unpacks into Kemari's cache.  The
host's package database is never touched.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kemari.errors import ImageError

# A Debian package name (Policy 5.6.1) and version (5.6.12), as passed to apt.
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_VERSION_RE = re.compile(r"^[0-9A-Za-z.+~:-]+$")


@dataclass(frozen=True)
class Package:
    """One binary package at its candidate version."""

    name: str
    version: str
    sha256: str
    depends: tuple[str, ...]

    @property
    def key(self) -> str:
        """``name_version_amd64`` (epoch colon escaped like apt does): names cache entries."""
        return f"{self.name}_{self.version.replace(':', '%3a')}_amd64"

    @property
    def deb_name(self) -> str:
        """File name of the .deb in the cache."""
        return f"{self.key}.deb"


def resolve(*names: str) -> list[Package]:
    """Candidate versions of ``names`` from the host's apt lists (one apt-cache call)."""
    for name in names:
        if not _NAME_RE.match(name):
            raise ImageError(f"invalid Debian package name {name!r}")
    output = _run(["apt-cache", "show", "--no-all-versions", *names], f"look up {', '.join(names)}")
    stanzas = {fields.get("Package", ""): fields for fields in parse_control(output)}
    packages = []
    for name in names:
        fields = stanzas.get(name, {})
        version = fields.get("Version", "")
        sha256 = fields.get("SHA256", "")
        if not _VERSION_RE.match(version) or not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise ImageError(
                f"apt has no downloadable candidate for {name} (run 'apt-get update' first)"
            )
        packages.append(Package(name, version, sha256, parse_depends(fields.get("Depends", ""))))
    return packages


def parse_control(text: str) -> list[dict[str, str]]:
    """Parse Debian control data into stanzas (continuation lines joined)."""
    stanzas: list[dict[str, str]] = []
    fields: dict[str, str] = {}
    key = ""
    for line in [*text.splitlines(), ""]:
        if not line.strip():
            if fields:
                stanzas.append(fields)
            fields, key = {}, ""
        elif line[0] in " \t" and key:
            fields[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return stanzas


def parse_depends(value: str) -> tuple[str, ...]:
    """Package names of a Depends field; of each ``a | b`` alternative only the first."""
    names = []
    for clause in value.split(","):
        first = clause.split("|")[0].strip()
        name = first.split("(")[0].split(":")[0].strip()
        if name:
            names.append(name)
    return tuple(names)


def download(package: Package, deb_dir: Path) -> Path:
    """Return the cached .deb of ``package``, downloading it if absent or damaged."""
    deb_dir.mkdir(parents=True, exist_ok=True)
    target = deb_dir / package.deb_name
    if target.exists() and sha256_file(target) == package.sha256:
        return target
    with tempfile.TemporaryDirectory(dir=deb_dir, prefix=".download-") as tmp:
        command = ["apt-get", "download", "-q"]
        if os.geteuid() == 0:
            # As root, apt fetches as the unprivileged _apt user, which cannot
            # write into our cache: download as root instead (still verified).
            command += ["-o", "APT::Sandbox::User=root"]
        command.append(f"{package.name}={package.version}")
        _run(command, f"download {package.name} {package.version}", cwd=Path(tmp))
        debs = list(Path(tmp).glob("*.deb"))
        if len(debs) != 1:
            raise ImageError(f"apt-get download {package.name} left {len(debs)} .deb files")
        if sha256_file(debs[0]) != package.sha256:
            raise ImageError(f"downloaded {package.name} does not match the apt lists' SHA256")
        # rename() is atomic: a cached .deb is always complete.
        debs[0].rename(target)
    return target


def extract(deb: Path, root: Path) -> Path:
    """Unpack ``deb`` into ``root`` (once; a finished unpack is reused) and return it."""
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".extract-"))
    try:
        _run(["dpkg-deb", "-x", str(deb), str(tmp)], f"unpack {deb.name}")
        # Only a complete unpack gets the final name.
        tmp.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's contents."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _run(command: list[str], what: str, cwd: Path | None = None) -> str:
    if shutil.which(command[0]) is None:
        raise ImageError(f"cannot {what}: {command[0]} is not installed (Debian host needed)")
    try:
        done = subprocess.run(
            command, cwd=cwd, capture_output=True, text=True, check=False, timeout=900
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImageError(f"cannot {what}: {exc}") from exc
    if done.returncode != 0:
        detail = (done.stderr.strip() or done.stdout.strip()).splitlines()
        raise ImageError(f"cannot {what}: {detail[-1] if detail else 'failed'}")
    return done.stdout
