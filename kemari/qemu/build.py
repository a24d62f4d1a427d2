"""Build Kemari's patched ``qemu-system-x86_64`` from Debian's own ``qemu`` source package.

QEMU 7.2 deadlocks at the first COLO checkpoint under TCG (see
``patches/qemu-7.2-colo-tcg-bql.patch`` and ``docs/qemu-patch.md``).  This module
fetches the source of exactly the installed ``qemu-system-x86`` package with
``apt-get source``, applies Kemari's patch on top of Debian's patches, builds only
``x86_64-softmmu`` with the features Kemari uses, and caches the result under
``$KEMARI_CACHE_DIR/qemu/<key>/`` (default ``~/.cache/kemari/qemu/<key>/``).  The
key names the Debian source version and a hash of the recipe (patch bytes and
configure options), so a new Debian upload or a changed patch builds again.

The system QEMU is never touched: the binary lives in the cache as
``<key>/usr/bin/qemu-system-x86_64`` next to ``<key>/usr/share`` and ``<key>/usr/lib``
symlinks to the system's, so QEMU's relocatable data paths (``<exe>/../share/qemu``
and the firmware path) resolve to Debian's ROMs, keymaps and firmware.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from kemari.cache import cache_dir, exclusive_lock
from kemari.errors import QemuError
from kemari.qemu.debian import QEMU_PACKAGE, QEMU_PROGRAM, qemu_version

PATCH_PATH = Path(__file__).resolve().parents[2] / "patches" / "qemu-7.2-colo-tcg-bql.patch"
DEB_SRC_LIST = Path("/etc/apt/sources.list.d/kemari-deb-src.sources")

# Debian packages the build needs (a minimal subset of qemu's Build-Depends for the
# configuration below; `apt-get build-dep qemu` would pull in hundreds more).
BUILD_PACKAGES: tuple[str, ...] = (
    "dpkg-dev",  # dpkg-source: unpack the .dsc and apply Debian's patches
    "patch",
    "gcc",
    "libc6-dev",
    "pkg-config",
    "python3",
    "ninja-build",
    "meson",
    "libglib2.0-dev",
    "libpixman-1-dev",
    "zlib1g-dev",
    "libfdt-dev",  # x86_64-softmmu requires libfdt
)

# Only x86_64-softmmu; everything optional off except what Kemari uses.  Always built
# regardless of these flags: QMP, the nbd block driver, virtio devices, -netdev stream,
# memory-backend-file and migration.  COLO needs CONFIG_REPLICATION: without it
# colo_do_checkpoint_transaction() calls abort().  Paths match debian/rules so the
# relocated data and firmware paths are Debian's.
CONFIGURE_OPTIONS: tuple[str, ...] = (
    "--prefix=/usr",
    "--sysconfdir=/etc",
    "--libexecdir=/usr/lib/qemu",
    "--localstatedir=/var",
    "--firmwarepath=/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu",
    "--with-git-submodules=ignore",
    "--disable-install-blobs",
    "--target-list=x86_64-softmmu",
    "--without-default-features",
    "--enable-tcg",
    "--enable-replication",
    "--enable-fdt=system",
    "--disable-docs",
    "--disable-tools",
)

_DEBIAN_VERSION = re.compile(r"^(?:\d+:)?7\.2\+dfsg-[0-9A-Za-z.+~-]+$")
_NINJA_PROGRESS = re.compile(r"^\[(\d+)/(\d+)\]")
_RESULT_FILE = "build.json"
_BUILD_DIR = "build-kemari"

Progress = Callable[[str], None]


def _print_progress(line: str) -> None:
    print(f"qemu build: {line}", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class BuildKey:
    """What a cached build was made from: Debian's source version and Kemari's recipe."""

    debian_version: str
    recipe_sha256: str

    @property
    def name(self) -> str:
        """Directory name: the version made path-safe plus the first 12 hex of the recipe hash."""
        safe = re.sub(r"[^0-9A-Za-z.+~-]", "_", self.debian_version)
        return f"{safe}-{self.recipe_sha256[:12]}"

    @property
    def pkgversion(self) -> str:
        """The ``--with-pkgversion`` string: Debian's, plus the patch marker."""
        return f"Debian {self.debian_version}, kemari colo-tcg-bql {self.recipe_sha256[:12]}"


@dataclasses.dataclass(frozen=True)
class PatchedQemu:
    """A finished build in the cache."""

    key: BuildKey
    binary: Path
    version: str


def cache_root() -> Path:
    """The patched QEMU builds: ``qemu/`` in Kemari's cache (kemari.cache)."""
    return cache_dir() / "qemu"


def recipe_sha256(patch: bytes, configure_options: Sequence[str]) -> str:
    """Hash of everything Kemari adds to Debian's source: the patch and the configure options."""
    digest = hashlib.sha256()
    digest.update(len(patch).to_bytes(8, "big"))
    digest.update(patch)
    for option in configure_options:
        digest.update(b"\0" + option.encode())
    return digest.hexdigest()


def validate_debian_version(version: str) -> str:
    """Return ``version`` if it is a Debian qemu 7.2 source version, else raise QemuError."""
    if not _DEBIAN_VERSION.fullmatch(version):
        raise QemuError(
            f"installed {QEMU_PACKAGE} comes from qemu source version {version!r}; "
            f"Kemari's patch is for Debian's QEMU 7.2 (1:7.2+dfsg-*) only"
        )
    return version


def installed_source_version() -> str:
    """Source version of the installed ``qemu-system-x86`` (without a binNMU suffix)."""
    try:
        completed = subprocess.run(
            ["dpkg-query", "-W", "-f", "${source:Package} ${source:Version}", QEMU_PACKAGE],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError as exc:
        raise QemuError(f"dpkg-query failed: {exc}") from exc
    fields = completed.stdout.split()
    if completed.returncode != 0 or len(fields) != 2:
        raise QemuError(f"{QEMU_PACKAGE} is not installed: apt-get install {QEMU_PACKAGE}")
    package, version = fields
    if package != "qemu":
        raise QemuError(f"{QEMU_PACKAGE} is built from source package {package!r}, not 'qemu'")
    return validate_debian_version(version)


def read_patch(path: Path = PATCH_PATH) -> bytes:
    """The patch file's bytes; QemuError if it is missing."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise QemuError(f"cannot read Kemari's QEMU patch {path}: {exc}") from exc


def current_key() -> BuildKey:
    """The key a build for the installed Debian QEMU and this checkout's patch has."""
    return BuildKey(
        debian_version=installed_source_version(),
        recipe_sha256=recipe_sha256(read_patch(), CONFIGURE_OPTIONS),
    )


def cached_build(key: BuildKey, root: Path | None = None) -> PatchedQemu | None:
    """The finished build for ``key`` if the cache has one, else None.

    A build counts only once its result file exists; that file is written last.
    """
    directory = (root or cache_root()) / key.name
    binary = directory / "usr" / "bin" / QEMU_PROGRAM
    try:
        result = json.loads((directory / _RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(result, dict) or not os.access(binary, os.X_OK):
        return None
    version = result.get("version")
    if not isinstance(version, str) or key.pkgversion not in version:
        return None
    return PatchedQemu(key=key, binary=binary, version=version)


def patched_qemu() -> PatchedQemu | None:
    """The cached patched QEMU for the installed Debian QEMU, or None if not built yet."""
    return cached_build(current_key())


def build_patched_qemu(
    *, force: bool = False, jobs: int | None = None, progress: Progress = _print_progress
) -> PatchedQemu:
    """Build (or find in the cache) the patched QEMU and return it.

    Idempotent: with a finished build for the current key this returns at once
    unless ``force``.  Concurrent callers serialize on a lock file.  The source and
    build tree are removed after success; the cache keeps only the binary.
    """
    key = current_key()
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(root / ".build.lock"):
        if not force:
            found = cached_build(key, root)
            if found is not None:
                progress(f"cached: {found.binary}")
                return found
        return _build(key, root, jobs or os.cpu_count() or 1, progress)


def _build(key: BuildKey, root: Path, jobs: int, progress: Progress) -> PatchedQemu:
    started = time.monotonic()
    # Leftovers of interrupted builds (any key); the build lock says none is in use.
    for leftover in [*root.glob("work-*"), *root.glob("staging-*")]:
        shutil.rmtree(leftover)
    work = root / f"work-{key.name}"
    work.mkdir()
    ensure_build_packages(progress)
    source = fetch_source(key.debian_version, work, progress)
    apply_patch(source, read_patch(), progress)
    binary = _compile(source, key, jobs, progress)
    result = _install(binary, key, root)
    shutil.rmtree(work)
    progress(f"done in {time.monotonic() - started:.0f} s: {result.binary}")
    progress(result.version)
    return result


def ensure_build_packages(progress: Progress) -> None:
    """Install the missing packages of :data:`BUILD_PACKAGES` (root only; else QemuError)."""
    missing = [package for package in BUILD_PACKAGES if not _dpkg_installed(package)]
    if not missing:
        return
    command = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if os.geteuid() != 0:
        raise QemuError(f"build dependencies missing; run as root: {' '.join(command)}")
    progress(f"installing build dependencies: {' '.join(missing)}")
    _run(
        command,
        what="installing build dependencies",
        env_extra={"DEBIAN_FRONTEND": "noninteractive"},
    )


def _dpkg_installed(package: str) -> bool:
    completed = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Status}", package],
        capture_output=True,
        text=True,
        check=False,
    )
    return completed.returncode == 0 and completed.stdout.endswith("install ok installed")


def ensure_deb_src(version: str, progress: Progress) -> None:
    """Make ``apt-get source qemu=VERSION`` possible: add deb-src entries when apt has none.

    As root: writes :data:`DEB_SRC_LIST` (bookworm, bookworm-updates, bookworm-security)
    unless it exists, and runs ``apt-get update``.  QemuError if the source is still
    unknown, or when not root.
    """
    if _source_available(version):
        return
    if os.geteuid() != 0:
        raise QemuError(
            f"apt knows no source package qemu={version}: as root, add deb-src entries for "
            f"bookworm, bookworm-updates and bookworm-security (e.g. {DEB_SRC_LIST}) and run "
            "apt-get update, or run kemari qemu build as root"
        )
    if not DEB_SRC_LIST.exists():
        progress(f"adding deb-src entries in {DEB_SRC_LIST}")
        DEB_SRC_LIST.write_text(_deb_src_entries())
    progress("apt-get update (for the deb-src entries)")
    _run(["apt-get", "update", "-q"], what="apt-get update")
    if not _source_available(version):
        raise QemuError(
            f"source package qemu={version} is not in Debian's archive (tried bookworm, "
            f"bookworm-updates, bookworm-security); upgrade {QEMU_PACKAGE} and build again"
        )


def _deb_src_entries() -> str:
    stanzas = [
        ("http://deb.debian.org/debian", "bookworm bookworm-updates"),
        ("http://deb.debian.org/debian-security", "bookworm-security"),
    ]
    return "\n".join(
        "Types: deb-src\n"
        f"URIs: {uri}\n"
        f"Suites: {suites}\n"
        "Components: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        for uri, suites in stanzas
    )


def _source_available(version: str) -> bool:
    completed = subprocess.run(
        ["apt-cache", "showsrc", "qemu"], capture_output=True, text=True, check=False
    )
    return f"\nVersion: {version}\n" in f"\n{completed.stdout}"


def fetch_source(version: str, work: Path, progress: Progress) -> Path:
    """Download qemu=VERSION into ``work`` and unpack it with Debian's patches applied."""
    ensure_deb_src(version, progress)
    progress(f"downloading Debian source qemu={version}")
    _run(
        ["apt-get", "source", "--download-only", f"qemu={version}"], what="apt-get source", cwd=work
    )
    dsc = list(work.glob("qemu_*.dsc"))
    if len(dsc) != 1:
        raise QemuError(f"apt-get source left {len(dsc)} .dsc files in {work}, expected 1")
    source = work / "src"
    progress("unpacking and applying Debian's patches (dpkg-source -x)")
    _run(["dpkg-source", "-x", dsc[0].name, source.name], what="dpkg-source -x", cwd=work)
    return source


def apply_patch(source: Path, patch: bytes, progress: Progress) -> None:
    """Apply the patch to the unpacked source; QemuError (source unchanged) if it does not fit."""
    progress(f"applying {PATCH_PATH.name}")
    base = ["patch", "-p1", "--forward", "--batch", "--no-backup-if-mismatch"]
    for args, what in (([*base, "--dry-run"], "checking"), (base, "applying")):
        completed = subprocess.run(args, input=patch, cwd=source, capture_output=True, check=False)
        if completed.returncode != 0:
            output = (completed.stdout + completed.stderr).decode(errors="replace").strip()
            raise QemuError(
                f"{what} {PATCH_PATH.name} against {source} failed "
                f"(does the Debian source still match QEMU 7.2?):\n{output}"
            )


def _compile(source: Path, key: BuildKey, jobs: int, progress: Progress) -> Path:
    build = source / _BUILD_DIR
    build.mkdir()
    progress("configuring: x86_64-softmmu, TCG, replication (COLO), default features off")
    _run(
        ["../configure", *CONFIGURE_OPTIONS, f"--with-pkgversion={key.pkgversion}"],
        what="configure",
        cwd=build,
    )
    progress(f"compiling {QEMU_PROGRAM} with {jobs} jobs (about 6-7 min on 2 cores)")
    _run_ninja(["ninja", "-j", str(jobs), QEMU_PROGRAM], build, progress)
    binary = build / QEMU_PROGRAM
    if not os.access(binary, os.X_OK):
        raise QemuError(f"ninja finished but {binary} is missing")
    return binary


def _run_ninja(command: list[str], cwd: Path, progress: Progress) -> None:
    """Run ninja, reporting every 10 % of the steps and keeping the tail of its output."""
    tail: list[str] = []
    reported = -1
    try:
        with subprocess.Popen(
            command,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        ) as child:
            assert child.stdout is not None  # stdout=PIPE above
            for line in child.stdout:
                tail = [*tail[-39:], line.rstrip()]
                match = _NINJA_PROGRESS.match(line)
                if match:
                    done, total = int(match[1]), int(match[2])
                    decile = done * 10 // total
                    if decile > reported:
                        reported = decile
                        progress(f"compiled {done}/{total} ({decile * 10} %)")
            returncode = child.wait()
    except OSError as exc:
        raise QemuError(f"cannot run {command[0]}: {exc}") from exc
    if returncode != 0:
        raise QemuError(f"compiling QEMU failed (exit {returncode}):\n" + "\n".join(tail))


def _install(built: Path, key: BuildKey, root: Path) -> PatchedQemu:
    """Move the binary into ``root/<key>/usr/bin``; the result file is written last."""
    final = root / key.name
    staging = root / f"staging-{key.name}"
    for stale in (final, staging):
        if stale.exists():
            shutil.rmtree(stale)
    bindir = staging / "usr" / "bin"
    bindir.mkdir(parents=True)
    # QEMU resolves its data and firmware directories relative to <exe>/../..:
    # these symlinks make them Debian's /usr/share/qemu, /usr/share/seabios, /usr/lib/ipxe.
    (staging / "usr" / "share").symlink_to("/usr/share")
    (staging / "usr" / "lib").symlink_to("/usr/lib")
    shutil.copy2(built, bindir / QEMU_PROGRAM)
    staging.rename(final)
    binary = final / "usr" / "bin" / QEMU_PROGRAM
    version = qemu_version(binary)
    if key.pkgversion not in version:
        raise QemuError(f"built {binary} reports {version!r}, expected it to name {key.pkgversion}")
    result = {
        "debian_version": key.debian_version,
        "recipe_sha256": key.recipe_sha256,
        "configure_options": list(CONFIGURE_OPTIONS),
        "version": version,
    }
    (final / _RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return PatchedQemu(key=key, binary=binary, version=version)


def _run(
    command: list[str],
    *,
    what: str,
    cwd: Path | None = None,
    env_extra: dict[str, str] | None = None,
) -> None:
    """Run a build step quietly; on failure raise QemuError with the end of its output."""
    env = {**os.environ, **(env_extra or {})}
    try:
        completed = subprocess.run(
            command, cwd=cwd, env=env, capture_output=True, text=True, errors="replace", check=False
        )
    except OSError as exc:
        raise QemuError(f"{what}: cannot run {command[0]}: {exc}") from exc
    if completed.returncode != 0:
        output = (completed.stdout + completed.stderr).strip().splitlines()
        raise QemuError(
            f"{what} failed (exit {completed.returncode}): {' '.join(command)}\n"
            + "\n".join(output[-40:])
        )
