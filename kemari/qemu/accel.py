"""Accelerator choice: KVM only where hardware virtualization is really there, else TCG.

``/dev/kvm`` alone proves nothing: some hosts expose it through ``kvm_pvm``
(pagetable-based virtual machines), which runs stock guests about 1000x too
slowly.  KVM is usable only when ``/dev/kvm`` is there *and* the CPU advertises
``vmx`` (Intel) or ``svm`` (AMD) *and* the matching ``kvm_intel``/``kvm_amd``
module is loaded.  The decision is a pure function of :class:`HostVirtFacts`
so it can be tested with any facts; :func:`gather_host_facts` reads them from
this host.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Literal

from kemari.config import Accel as Requested
from kemari.errors import ConfigError

Accel = Literal["kvm", "tcg"]

# CPU flag -> the KVM module that drives it.
_HARDWARE_BACKENDS = {"vmx": "kvm_intel", "svm": "kvm_amd"}
# Every module that can provide /dev/kvm, in the order we report them.
KVM_BACKEND_MODULES = ("kvm_intel", "kvm_amd", "kvm_pvm")


@dataclasses.dataclass(frozen=True)
class HostVirtFacts:
    """What the host offers for virtualization, as plain data."""

    dev_kvm_exists: bool
    dev_kvm_accessible: bool
    cpu_flags: frozenset[str]
    loaded_modules: frozenset[str]

    @property
    def kvm_backends(self) -> tuple[str, ...]:
        """The loaded modules that provide ``/dev/kvm`` (e.g. ``("kvm_pvm",)``)."""
        return tuple(name for name in KVM_BACKEND_MODULES if name in self.loaded_modules)


@dataclasses.dataclass(frozen=True)
class AccelDecision:
    """The accelerator QEMU will use and a human sentence saying why."""

    accel: Accel
    reason: str


def kvm_unusable_reason(facts: HostVirtFacts) -> str | None:
    """Why KVM cannot run stock guests at full speed here, or None when it can."""
    if not facts.dev_kvm_exists:
        return "/dev/kvm does not exist (no KVM module loaded)"
    hardware_flags = sorted(flag for flag in _HARDWARE_BACKENDS if flag in facts.cpu_flags)
    backends = facts.kvm_backends
    if not hardware_flags:
        if "kvm_pvm" in backends:
            return (
                "/dev/kvm is provided by kvm_pvm (the CPU has no vmx/svm), "
                "which runs stock guests ~1000x too slowly"
            )
        return "the CPU advertises neither vmx nor svm (no hardware virtualization)"
    wanted = [_HARDWARE_BACKENDS[flag] for flag in hardware_flags]
    if not any(module in backends for module in wanted):
        loaded = ", ".join(backends) if backends else "none"
        return (
            f"the CPU has {'/'.join(hardware_flags)} but {' or '.join(wanted)} is not loaded "
            f"(loaded KVM backends: {loaded})"
        )
    if not facts.dev_kvm_accessible:
        return "/dev/kvm exists but this user cannot open it read-write"
    return None


def decide_accel(requested: Requested, facts: HostVirtFacts) -> AccelDecision:
    """Resolve ``auto|kvm|tcg`` against the host facts.

    ``auto`` falls back to TCG with the reason; an explicit ``kvm`` that cannot
    work raises :class:`ConfigError` with the same reason.
    """
    if requested is Requested.TCG:
        return AccelDecision("tcg", "TCG requested explicitly")
    problem = kvm_unusable_reason(facts)
    if problem is None:
        module = next(m for m in facts.kvm_backends if m in _HARDWARE_BACKENDS.values())
        how = "requested explicitly" if requested is Requested.KVM else "auto"
        return AccelDecision("kvm", f"KVM ({how}): hardware virtualization via {module}")
    if requested is Requested.KVM:
        raise ConfigError(f"accel: kvm requested but unusable: {problem}")
    return AccelDecision("tcg", f"TCG (auto): {problem}")


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The ``flags`` of the first CPU in ``/proc/cpuinfo`` text (all CPUs share them)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def gather_host_facts(root: Path = Path("/")) -> HostVirtFacts:
    """Read the virtualization facts of this host (``root`` lets a test point elsewhere)."""
    dev_kvm = root / "dev" / "kvm"
    try:
        cpuinfo = (root / "proc" / "cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        cpuinfo = ""
    modules_dir = root / "sys" / "module"
    loaded = frozenset(name for name in KVM_BACKEND_MODULES if (modules_dir / name).is_dir())
    return HostVirtFacts(
        dev_kvm_exists=dev_kvm.exists(),
        dev_kvm_accessible=os.access(dev_kvm, os.R_OK | os.W_OK),
        cpu_flags=parse_cpu_flags(cpuinfo),
        loaded_modules=loaded,
    )


def choose_accel(requested: Requested) -> AccelDecision:
    """Decide the accelerator for ``requested`` on this host."""
    return decide_accel(requested, gather_host_facts())
