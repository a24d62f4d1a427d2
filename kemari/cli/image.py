"""``kemari image build|disk|info``: the guest kernel + initramfs and ext4 data disks."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from kemari.image.builder import build_image, image_dir, read_manifest, verify_image
from kemari.image.disk import create_data_disk, parse_size_mib


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``kemari image``."""
    parser = subparsers.add_parser(
        "image",
        help="build the guest image, create data disks",
        description="Build the guest kernel + initramfs from Debian packages, or make disks.",
    )
    commands = parser.add_subparsers(dest="image_command", required=True, metavar="SUBCOMMAND")

    build = commands.add_parser("build", help="build (or reuse) the cached guest image")
    build.add_argument("--cache", type=Path, help="cache directory (default: ~/.cache/kemari)")
    build.add_argument("--force", action="store_true", help="rebuild even if inputs are unchanged")
    build.set_defaults(func=_build)

    disk = commands.add_parser("disk", help="create a raw ext4 data disk (the guest's /data)")
    disk.add_argument("path", type=Path, help="raw image file to create")
    disk.add_argument("--size", required=True, help="size, e.g. 64M, 1G (plain number: MiB)")
    disk.add_argument("--force", action="store_true", help="overwrite an existing file")
    disk.set_defaults(func=_disk)

    info = commands.add_parser("info", help="describe the built image and check its files")
    info.add_argument("--cache", type=Path, help="cache directory (default: ~/.cache/kemari)")
    info.set_defaults(func=_info)


def _build(args: argparse.Namespace) -> int:
    started = time.monotonic()
    image = build_image(args.cache, force=args.force)
    print(f"kernel  {image.kernel}  ({image.kernel_version})")
    print(f"initrd  {image.initrd}")
    print(f"ready in {time.monotonic() - started:.1f} s")
    return 0


def _disk(args: argparse.Namespace) -> int:
    size_mib = parse_size_mib(args.size)
    create_data_disk(args.path, size_mib, overwrite=args.force)
    print(f"{args.path}: {size_mib} MiB ext4 data disk")
    return 0


def _info(args: argparse.Namespace) -> int:
    manifest = read_manifest(args.cache)
    print(f"directory        {image_dir(args.cache)}")
    print(
        f"kernel           {manifest['kernel_version']} "
        f"({manifest.get('kernel_package')} {manifest.get('kernel_package_version')})"
    )
    print(f"busybox-static   {manifest.get('busybox_version')}")
    print(f"modules          {' '.join(manifest.get('modules', []))}")
    print(f"built-in         {' '.join(manifest.get('builtin_modules', []))}")
    print(f"compiler         {manifest.get('compiler')}")
    damaged = verify_image(args.cache)
    for name, digest in sorted(manifest["files"].items()):
        state = "DAMAGED" if name in damaged else "ok"
        print(f"{name:<16} sha256 {digest}  {state}")
    return 1 if damaged else 0
