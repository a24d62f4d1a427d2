"""Kernel modules for the initramfs: which ones, in which load order, as plain .ko.

The dependency graph is the kernel package's own ``modules.dep``.  Debian's
package does not ship that file (its postinst runs depmod), so it is generated
by ``depmod -b`` inside the unpacked package tree, never on the host's
``/lib/modules``.  Modules the kernel has built in (``modules.builtin``) need
no loading.
"""

from __future__ import annotations

import gzip
import lzma
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from kemari.errors import ImageError

# What the guest needs: virtio PCI transport, virtio disk and NIC, ext4 for /data.
GUEST_MODULES: tuple[str, ...] = ("virtio_pci", "virtio_blk", "virtio_net", "ext4")

_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


@dataclass(frozen=True)
class ModulePlan:
    """Modules to load (relative paths under lib/modules/VER, dependencies first)."""

    load_order: tuple[str, ...]
    builtin: tuple[str, ...]


def module_name(path: str) -> str:
    """``kernel/drivers/net/virtio_net.ko.xz`` -> ``virtio_net`` (kmod's '-' == '_')."""
    base = PurePosixPath(path).name
    for suffix in _SUFFIXES:
        if base.endswith(suffix):
            return base[: -len(suffix)].replace("-", "_")
    raise ImageError(f"not a kernel module file name: {path}")


def parse_modules_dep(text: str) -> dict[str, tuple[str, ...]]:
    """Parse modules.dep: module path -> paths of the modules it depends on."""
    graph: dict[str, tuple[str, ...]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        path, sep, deps = line.partition(":")
        if not sep:
            raise ImageError(f"modules.dep line {number} has no ':'")
        graph[path.strip()] = tuple(deps.split())
    return graph


def load_order(graph: Mapping[str, Iterable[str]], roots: Iterable[str]) -> list[str]:
    """Topological order of ``roots`` and everything they need, dependencies first.

    Deterministic: dependencies are visited in sorted order.  A cycle or a
    dependency missing from the graph is an error.
    """
    order: list[str] = []
    state: dict[str, str] = {}  # path -> "visiting" | "done"

    def visit(path: str, chain: tuple[str, ...]) -> None:
        if state.get(path) == "done":
            return
        if state.get(path) == "visiting":
            raise ImageError(f"module dependency cycle: {' -> '.join((*chain, path))}")
        if path not in graph:
            raise ImageError(f"module {path} is needed by {chain[-1]} but not in modules.dep")
        state[path] = "visiting"
        for dep in sorted(graph[path]):
            visit(dep, (*chain, path))
        state[path] = "done"
        order.append(path)

    for root in sorted(roots):
        visit(root, ())
    return order


def plan(modules_dir: Path, wanted: Iterable[str] = GUEST_MODULES) -> ModulePlan:
    """Work out which of ``wanted`` to load, and their load order, for one kernel tree."""
    graph = parse_modules_dep(_modules_dep(modules_dir))
    builtin_file = modules_dir / "modules.builtin"
    builtin_text = builtin_file.read_text() if builtin_file.exists() else ""
    builtin = {module_name(line.strip()) for line in builtin_text.splitlines() if line.strip()}
    by_name = {module_name(path): path for path in graph}
    roots = []
    builtin_wanted = []
    for name in wanted:
        if name in builtin:
            builtin_wanted.append(name)
        elif name in by_name:
            roots.append(by_name[name])
        else:
            raise ImageError(f"kernel {modules_dir.name} has no module or built-in {name}")
    return ModulePlan(tuple(load_order(graph, roots)), tuple(builtin_wanted))


def read_module(modules_dir: Path, relative: str) -> bytes:
    """The module's ELF bytes, decompressed (busybox insmod takes plain .ko only)."""
    path = modules_dir / relative
    data = path.read_bytes()
    if relative.endswith(".ko"):
        return data
    if relative.endswith(".ko.xz"):
        return lzma.decompress(data)
    if relative.endswith(".ko.gz"):
        return gzip.decompress(data)
    if relative.endswith(".ko.zst"):
        if shutil.which("zstd") is None:
            raise ImageError(f"{relative} is zstd-compressed: install zstd")
        done = subprocess.run(["zstd", "-dcq", str(path)], capture_output=True, check=False)
        if done.returncode != 0:
            raise ImageError(f"cannot decompress {relative}: {done.stderr.decode().strip()}")
        return done.stdout
    raise ImageError(f"unknown module format: {relative}")


def plain_name(relative: str) -> str:
    """Path of the module inside the initramfs tree (always uncompressed .ko)."""
    for suffix in _SUFFIXES:
        if relative.endswith(suffix):
            return relative[: -len(suffix)] + ".ko"
    raise ImageError(f"not a kernel module file name: {relative}")


def _modules_dep(modules_dir: Path) -> str:
    dep = modules_dir / "modules.dep"
    if not dep.exists():
        depmod = shutil.which("depmod") or shutil.which("depmod", path="/usr/sbin:/sbin")
        if depmod is None:
            raise ImageError(
                "the kernel package has no modules.dep and depmod is missing: install kmod"
            )
        # -b: operate on the unpacked tree, whose root is two levels above lib/modules/VER.
        base = modules_dir.parent.parent.parent
        done = subprocess.run(
            [depmod, "-b", str(base), modules_dir.name], capture_output=True, text=True, check=False
        )
        if done.returncode != 0 or not dep.exists():
            raise ImageError(f"depmod failed for {modules_dir.name}: {done.stderr.strip()}")
    return dep.read_text()
