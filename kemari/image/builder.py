"""``kemari image build``: the guest kernel and initramfs, cached and reproducible.

Inputs: Debian's ``linux-image-cloud-amd64`` (resolved to the real
``linux-image-<abi>-cloud-amd64`` package), ``busybox-static``, the files in
``kemari/image/guest/`` (``init`` and ``kguest.c``, compiled statically with the
host's gcc) and :data:`BUILDER_VERSION`.  Outputs, in ``<cache>/image/``:
``vmlinuz``, ``initrd.img``, ``kguest`` and ``manifest.json``.  A build whose
inputs match the manifest is reused; the same inputs give byte-identical outputs.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from io import BytesIO
from pathlib import Path
from typing import Any

from kemari.cache import cache_dir as kemari_cache_dir
from kemari.cache import exclusive_lock
from kemari.errors import ImageError
from kemari.image import debs, modules
from kemari.image.initramfs import Initramfs

# Bump whenever the builder changes what it puts into the outputs.
BUILDER_VERSION = 1

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
_KERNEL_PACKAGE_RE = re.compile(r"^linux-image-[0-9][0-9a-z.+-]*-cloud-amd64$")
_GUEST_SOURCES = ("init", "kguest.c")
_CFLAGS = ("-static", "-O2", "-Wall", "-Wextra", "-Werror", "-s")


@dataclass(frozen=True)
class GuestImage:
    """A built guest: boot it with ``-kernel kernel -initrd initrd``."""

    kernel: Path
    initrd: Path
    kernel_version: str
    kguest: Path  # the same static workload binary, runnable on the host


def image_dir(cache_dir: Path | None = None) -> Path:
    """Directory of the built image inside the cache."""
    return (cache_dir or kemari_cache_dir()) / "image"


def read_manifest(cache_dir: Path | None = None) -> dict[str, Any]:
    """The manifest of the built image; :class:`ImageError` if there is none."""
    path = image_dir(cache_dir) / "manifest.json"
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ImageError("guest image not built: run kemari image build") from exc
    except (OSError, ValueError) as exc:
        raise ImageError(f"unreadable image manifest {path}: {exc}") from exc
    if not isinstance(manifest.get("kernel_version"), str) or not isinstance(
        manifest.get("files"), dict
    ):
        raise ImageError(f"image manifest {path} is incomplete: run kemari image build --force")
    return manifest


def default_image(cache_dir: Path | None = None) -> GuestImage:
    """The already built image; :class:`ImageError` if it is absent."""
    manifest = read_manifest(cache_dir)
    image = _image_from(image_dir(cache_dir), manifest)
    for path in (image.kernel, image.initrd, image.kguest):
        if not path.is_file():
            raise ImageError("guest image not built: run kemari image build")
    return image


def verify_image(cache_dir: Path | None = None) -> list[str]:
    """Names of output files whose SHA-256 does not match the manifest (empty: intact)."""
    directory = image_dir(cache_dir)
    files: dict[str, str] = read_manifest(cache_dir)["files"]
    return [
        name
        for name, digest in sorted(files.items())
        if not (directory / name).is_file() or debs.sha256_file(directory / name) != digest
    ]


def build_image(cache_dir: Path | None = None, force: bool = False) -> GuestImage:
    """Build the guest image into the cache, or reuse it if its inputs are unchanged."""
    cache = cache_dir or kemari_cache_dir()
    if platform.machine() != "x86_64":
        raise ImageError(
            f"the guest image is x86_64 and needs an x86_64 host, not {platform.machine()}"
        )
    cache.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(cache / "image.lock"):
        kernel_meta, busybox_pkg = debs.resolve(KERNEL_META_PACKAGE, BUSYBOX_PACKAGE)
        (kernel_pkg,) = debs.resolve(_real_kernel_package(kernel_meta))
        inputs = {
            "builder_version": BUILDER_VERSION,
            "kernel_package": kernel_pkg.name,
            "kernel_package_version": kernel_pkg.version,
            "busybox_version": busybox_pkg.version,
            "guest_sources_sha256": guest_sources_digest(),
            "compiler": _compiler_version(),
        }
        out_dir = image_dir(cache)
        if not force:
            reusable = _reusable(cache, inputs)
            if reusable is not None:
                return reusable

        deb_dir = cache / "debs"
        debs.download(kernel_meta, deb_dir)
        kernel_root = debs.extract(
            debs.download(kernel_pkg, deb_dir), cache / "extract" / kernel_pkg.key
        )
        busybox_root = debs.extract(
            debs.download(busybox_pkg, deb_dir), cache / "extract" / busybox_pkg.key
        )
        kernel_version = _kernel_version(kernel_root)
        modules_dir = kernel_root / "lib" / "modules" / kernel_version
        plan = modules.plan(modules_dir)

        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmp:
            staging = Path(tmp)
            shutil.copyfile(kernel_root / "boot" / f"vmlinuz-{kernel_version}", staging / "vmlinuz")
            compile_kguest(staging / "kguest")
            initrd = make_initramfs(
                busybox=busybox_root / "bin" / "busybox",
                kguest=staging / "kguest",
                modules_dir=modules_dir,
                plan=plan,
            )
            (staging / "initrd.img").write_bytes(initrd)
            manifest = {
                **inputs,
                "kernel_version": kernel_version,
                "modules": [modules.module_name(path) for path in plan.load_order],
                "builtin_modules": list(plan.builtin),
                "files": {
                    name: debs.sha256_file(staging / name)
                    for name in ("vmlinuz", "initrd.img", "kguest")
                },
            }
            # Outputs first, manifest last: a manifest always describes complete files.
            for name in ("vmlinuz", "initrd.img", "kguest"):
                (staging / name).replace(out_dir / name)
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            (staging / "manifest.json").replace(out_dir / "manifest.json")
        _prune(cache, {pkg.key for pkg in (kernel_meta, kernel_pkg, busybox_pkg)})
        return _image_from(out_dir, manifest)


def make_initramfs(
    *, busybox: Path, kguest: Path, modules_dir: Path, plan: modules.ModulePlan
) -> bytes:
    """The gzip-compressed initramfs: /init, busybox with applet links, kguest, modules."""
    archive = Initramfs()
    for directory in ("dev", "proc", "sys", "run", "data", "etc", "root"):
        archive.add_dir(directory)
    archive.add_dir("tmp", 0o1777)
    # The kernel opens /dev/console for /init before devtmpfs is mounted.
    archive.add_char_device("dev/console", 5, 1)
    archive.add_file("init", _guest_file("init"), 0o755)
    archive.add_file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in _busybox_applets(busybox):
        if applet not in ("bin/busybox", "init"):
            archive.add_symlink(applet, "/bin/busybox")
    archive.add_file("bin/kguest", kguest.read_bytes(), 0o755)
    order = []
    for relative in plan.load_order:
        target = f"lib/modules/{modules_dir.name}/{modules.plain_name(relative)}"
        archive.add_file(target, modules.read_module(modules_dir, relative))
        order.append(target)
    archive.add_file("etc/modules.order", "".join(f"{path}\n" for path in order).encode())
    out = BytesIO()
    archive.write(out)
    return out.getvalue()


def compile_kguest(output: Path) -> None:
    """Compile guest/kguest.c into a static x86_64 binary at ``output``."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise ImageError("gcc is missing: install gcc and libc6-dev")
    with tempfile.TemporaryDirectory(prefix="kemari-kguest-") as tmp:
        source = Path(tmp) / "kguest.c"
        source.write_bytes(_guest_file("kguest.c"))
        done = subprocess.run(
            [gcc, *_CFLAGS, "-o", str(output), str(source)],
            capture_output=True,
            text=True,
            check=False,
        )
    if done.returncode != 0:
        hint = " (static libc missing? install libc6-dev)" if "-lc" in done.stderr else ""
        raise ImageError(f"compiling kguest failed{hint}:\n{done.stderr.strip()}")


def guest_sources_digest() -> str:
    """SHA-256 over the names and contents of the guest/ source files."""
    digest = hashlib.sha256()
    for name in _GUEST_SOURCES:
        data = _guest_file(name)
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def _guest_file(name: str) -> bytes:
    return resources.files("kemari.image").joinpath("guest", name).read_bytes()


def _real_kernel_package(meta: debs.Package) -> str:
    for name in meta.depends:
        if _KERNEL_PACKAGE_RE.match(name):
            return name
    raise ImageError(f"{meta.name} {meta.version} depends on no linux-image-*-cloud-amd64 package")


def _kernel_version(root: Path) -> str:
    versions = sorted(p.name for p in (root / "lib" / "modules").iterdir() if p.is_dir())
    if len(versions) != 1 or not (root / "boot" / f"vmlinuz-{versions[0]}").is_file():
        raise ImageError(f"unexpected kernel package layout in {root}: modules for {versions}")
    return versions[0]


def _busybox_applets(busybox: Path) -> list[str]:
    done = subprocess.run(
        [str(busybox), "--list-full"], capture_output=True, text=True, check=False
    )
    applets = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or "bin/sh" not in applets:
        raise ImageError(f"{busybox} --list-full failed: {done.stderr.strip()}")
    return applets


def _compiler_version() -> str:
    gcc = shutil.which("gcc")
    if gcc is None:
        raise ImageError("gcc is missing: install gcc and libc6-dev")
    done = subprocess.run([gcc, "--version"], capture_output=True, text=True, check=False)
    return done.stdout.splitlines()[0] if done.stdout else "unknown"


def _reusable(cache: Path, inputs: dict[str, Any]) -> GuestImage | None:
    try:
        manifest = read_manifest(cache)
    except ImageError:
        return None
    if any(manifest.get(key) != value for key, value in inputs.items()):
        return None
    if verify_image(cache):
        return None
    return _image_from(image_dir(cache), manifest)


def _image_from(directory: Path, manifest: dict[str, Any]) -> GuestImage:
    return GuestImage(
        kernel=directory / "vmlinuz",
        initrd=directory / "initrd.img",
        kernel_version=str(manifest["kernel_version"]),
        kguest=directory / "kguest",
    )


def _prune(cache: Path, keep: set[str]) -> None:
    # Downloads and unpacked trees of superseded package versions (e.g. an older kernel).
    for deb in (cache / "debs").glob("*.deb"):
        if deb.name.removesuffix(".deb") not in keep:
            deb.unlink()
    # Under the build lock, anything else in extract/ (also an unpack cut short) is garbage.
    for tree in (cache / "extract").iterdir():
        if tree.name in keep:
            continue
        if tree.is_dir():
            shutil.rmtree(tree)
        else:
            tree.unlink()
