"""``kemari doctor``: what this host offers Kemari, and how to fix what is missing.

Every check is read-only (no module is loaded, no namespace or device is
created).  A check that fails and is *required* (needed to run a VM or build
the guest image) makes the report not OK; the rest only warn (needed for the
test suite, or slower but working, like TCG).
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.metadata
import os
import platform
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

from kemari.config import Accel
from kemari.errors import QemuError
from kemari.image.builder import image_dir
from kemari.qemu.accel import AccelDecision, decide_accel, gather_host_facts
from kemari.qemu.binary import qemu_binary
from kemari.qemu.debian import QEMU_PACKAGE, qemu_version

_COMMAND_TIMEOUT_S = 10.0
_PT_INTERP = 3
_ELF_MAGIC = b"\x7fELF"


class Status(enum.Enum):
    """Outcome of one check."""

    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclasses.dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, what was found, how to fix it."""

    name: str
    status: Status
    detail: str
    fix: str | None = None
    required: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``--json``."""
        return {
            "name": self.name,
            "status": self.status.value,
            "detail": self.detail,
            "fix": self.fix,
            "required": self.required,
        }


@dataclasses.dataclass(frozen=True)
class Report:
    """Every check, plus the two decisions other commands act on (QEMU and accel)."""

    checks: tuple[Check, ...]
    accel: AccelDecision
    qemu_path: str | None
    qemu_version: str | None
    qemu_reason: str | None

    @property
    def ok(self) -> bool:
        """False when a required check failed."""
        return not any(c.required and c.status is Status.FAIL for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``--json``."""
        return {
            "ok": self.ok,
            "accel": {"accel": self.accel.accel, "reason": self.accel.reason},
            "qemu": {
                "path": self.qemu_path,
                "version": self.qemu_version,
                "reason": self.qemu_reason,
            },
            "checks": [check.to_dict() for check in self.checks],
        }


def guest_image_manifest() -> Path:
    """Where ``kemari image build`` records a finished image."""
    return image_dir() / "manifest.json"


def run_checks() -> Report:
    """Run every check on this host."""
    facts = gather_host_facts()
    accel = decide_accel(Accel.AUTO, facts)
    checks: list[Check] = []
    qemu_path = version = reason = None
    try:
        binary = qemu_binary(accel.accel)
        qemu_path, reason = str(binary.path), binary.reason
        version = qemu_version(binary.path)
        checks.append(Check("qemu", Status.OK, f"{qemu_path}: {version} ({reason})", None, True))
    except QemuError as exc:
        checks.append(Check("qemu", Status.FAIL, str(exc), f"apt-get install {QEMU_PACKAGE}", True))
    checks.append(
        Check(
            "accel",
            Status.OK if accel.accel == "kvm" else Status.WARN,
            f"{accel.accel}: {accel.reason}",
        )
    )
    backends = facts.kvm_backends
    if not facts.dev_kvm_exists:
        checks.append(Check("/dev/kvm", Status.WARN, "absent", None))
    elif backends == ("kvm_pvm",):
        checks.append(Check("/dev/kvm", Status.WARN, "provided by kvm_pvm: not used", None))
    else:
        checks.append(
            Check("/dev/kvm", Status.OK, f"provided by {', '.join(backends) or 'unknown'}")
        )
    checks.append(_python_package("qemu.qmp", "pip install qemu.qmp"))
    checks.append(_char_device("/dev/net/tun", "guest NICs need tap devices", "modprobe tun"))
    checks.append(_root())
    checks.append(_netns())
    checks.append(_bridge())
    checks += [
        _tool("qemu-img", "qemu-utils", "disk images", required=True),
        _tool("qemu-io", "qemu-utils", "NBD conformance tests"),
        _tool("nbdinfo", "libnbd-bin", "NBD conformance tests"),
        _tool("nbdcopy", "libnbd-bin", "NBD conformance tests"),
        _tool("mkfs.ext4", "e2fsprogs", "the guest data disk", required=True),
        _tool("cpio", "cpio", "the guest initramfs", required=True),
        _tool("zstd", "zstd", "the guest kernel package"),
        _tool("tcpdump", "tcpdump", "network debugging"),
        _busybox_static(),
        _static_libc(),
        _guest_image(),
    ]
    return Report(tuple(checks), accel, qemu_path, version, reason)


def _python_package(name: str, fix: str) -> Check:
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return Check(f"python {name}", Status.FAIL, "not installed", fix, True)
    return Check(f"python {name}", Status.OK, f"version {version}", None, True)


def _char_device(path: str, why: str, fix: str) -> Check:
    if Path(path).is_char_device():
        return Check(path, Status.OK, "present", None, True)
    return Check(path, Status.FAIL, f"missing ({why})", fix, True)


def _root() -> Check:
    if os.geteuid() == 0:
        return Check("root", Status.OK, "running as root")
    return Check(
        "root",
        Status.WARN,
        "not root: taps, bridges and network namespaces need root",
        "run kemari as root",
    )


def _netns() -> Check:
    ip = shutil.which("ip")
    if ip is None:
        return Check("netns", Status.FAIL, "ip not found", "apt-get install iproute2", True)
    if not Path("/proc/self/ns/net").exists():
        return Check("netns", Status.FAIL, "kernel without network namespaces", None, True)
    listed, output = _run([ip, "netns", "list"])
    if not listed:
        return Check("netns", Status.FAIL, f"ip netns list: {output}", None, True)
    return Check("netns", Status.OK, f"{ip} with network namespace support", None, True)


def _bridge() -> Check:
    if Path("/sys/module/bridge").is_dir():
        return Check("bridge", Status.OK, "bridge module loaded", None, True)
    release = platform.release()
    builtin = Path("/lib/modules", release, "modules.builtin")
    if builtin.is_file() and "/bridge.ko" in builtin.read_text(errors="replace"):
        return Check("bridge", Status.OK, "bridge built into the kernel", None, True)
    modinfo = shutil.which("modinfo")
    if modinfo is not None and _run([modinfo, "bridge"])[0]:
        return Check("bridge", Status.OK, "bridge module available (loads on use)", None, True)
    return Check(
        "bridge",
        Status.FAIL,
        f"no bridge support found for kernel {release}",
        "modprobe bridge (apt-get install kmod)",
        True,
    )


def _tool(program: str, package: str, why: str, *, required: bool = False) -> Check:
    path = shutil.which(program)
    if path is None:
        missing_status = Status.FAIL if required else Status.WARN
        return Check(
            program, missing_status, f"missing (for {why})", f"apt-get install {package}", required
        )
    return Check(program, Status.OK, path, None, required)


def _busybox_static() -> Check:
    fix = "apt-get install busybox-static"
    path = Path("/bin/busybox")
    if not path.is_file():
        return Check("busybox-static", Status.FAIL, "/bin/busybox missing", fix, True)
    try:
        dynamic = elf_has_interpreter(path.read_bytes())
    except ValueError as exc:
        return Check("busybox-static", Status.FAIL, f"{path}: {exc}", fix, True)
    if dynamic:
        return Check("busybox-static", Status.FAIL, f"{path} is dynamically linked", fix, True)
    return Check("busybox-static", Status.OK, f"{path} (static)", None, True)


def elf_has_interpreter(image: bytes) -> bool:
    """True when a 64-bit little-endian ELF image asks for a dynamic loader (PT_INTERP)."""
    if image[:4] != _ELF_MAGIC or len(image) < 64 or image[4] != 2 or image[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    (phoff,) = struct.unpack_from("<Q", image, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", image, 0x36)
    if phentsize < 4 or phoff + phentsize * phnum > len(image):
        raise ValueError("truncated ELF program headers")
    return any(
        struct.unpack_from("<I", image, phoff + index * phentsize)[0] == _PT_INTERP
        for index in range(phnum)
    )


def _static_libc() -> Check:
    fix = "apt-get install gcc libc6-dev"
    gcc = shutil.which("gcc")
    if gcc is None:
        return Check("gcc static libc", Status.WARN, "gcc missing", fix)
    ran, found = _run([gcc, "-print-file-name=libc.a"])
    if not ran or not Path(found).is_absolute() or not Path(found).is_file():
        return Check("gcc static libc", Status.WARN, "libc.a not found", fix)
    return Check("gcc static libc", Status.OK, f"{gcc}, {Path(found).resolve()}")


def _guest_image() -> Check:
    manifest = guest_image_manifest()
    if manifest.is_file():
        return Check("guest image", Status.OK, f"built ({manifest})")
    return Check(
        "guest image", Status.WARN, f"not built ({manifest} missing)", "kemari image build"
    )


def _run(argv: list[str]) -> tuple[bool, str]:
    """Run a short command: (True, stripped stdout) or (False, a one-line reason)."""
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    if done.returncode == 0:
        return True, done.stdout.strip()
    errors = done.stderr.strip().splitlines()
    return False, errors[-1] if errors else f"exit status {done.returncode}"


def format_report(report: Report) -> str:
    """The human table: status, check, detail, and the fix under anything not OK."""
    width = max(len(check.name) for check in report.checks)
    lines = []
    for check in report.checks:
        lines.append(f"[{check.status.value.upper():>4}] {check.name:<{width}}  {check.detail}")
        if check.fix is not None and check.status is not Status.OK:
            needed = " (required)" if check.required and check.status is Status.FAIL else ""
            lines.append(f"       {'':<{width}}  fix{needed}: {check.fix}")
    verdict = "ready" if report.ok else "NOT ready: a required check failed"
    lines.append(f"kemari doctor: {verdict}")
    return "\n".join(lines)
