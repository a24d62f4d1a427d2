"""Accelerator choice: the real decision on this host, and the pure rule fed with facts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kemari.config import Accel
from kemari.errors import ConfigError
from kemari.qemu.accel import (
    HostVirtFacts,
    choose_accel,
    decide_accel,
    gather_host_facts,
    parse_cpu_flags,
)

CPUINFO = """\
processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme de pse tsc msr pae vmx sse sse2
bogomips\t: 4800.00

processor\t: 1
flags\t\t: fpu vme de pse tsc msr pae vmx sse sse2
"""


def facts(
    *, dev_kvm: bool = True, flags: str = "", modules: str = "", accessible: bool = True
) -> HostVirtFacts:
    return HostVirtFacts(
        dev_kvm_exists=dev_kvm,
        dev_kvm_accessible=accessible,
        cpu_flags=frozenset(flags.split()),
        loaded_modules=frozenset(modules.split()),
    )


def test_this_host_auto_picks_tcg_and_says_why() -> None:
    host = gather_host_facts()
    decision = choose_accel(Accel.AUTO)
    assert decision.accel == "tcg"
    if "kvm_pvm" in host.kvm_backends:
        assert "kvm_pvm" in decision.reason
    else:
        assert "vmx" in decision.reason or "/dev/kvm" in decision.reason


def test_this_host_explicit_kvm_is_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError, match="kvm requested but unusable"):
        choose_accel(Accel.KVM)


def test_this_host_facts_match_proc_and_sys() -> None:
    host = gather_host_facts()
    assert host.dev_kvm_exists == os.path.exists("/dev/kvm")
    assert host.cpu_flags == parse_cpu_flags(Path("/proc/cpuinfo").read_text())
    assert ("kvm_pvm" in host.loaded_modules) == os.path.isdir("/sys/module/kvm_pvm")


def test_facts_read_from_another_root(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "cpuinfo").write_text(CPUINFO)
    (tmp_path / "sys" / "module" / "kvm_intel").mkdir(parents=True)
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "kvm").touch()
    read = gather_host_facts(tmp_path)
    assert read.dev_kvm_exists
    assert "vmx" in read.cpu_flags
    assert read.kvm_backends == ("kvm_intel",)
    assert decide_accel(Accel.AUTO, read).accel == "kvm"


def test_parse_cpu_flags_takes_the_flags_line() -> None:
    assert parse_cpu_flags(CPUINFO) == frozenset(
        ["fpu", "vme", "de", "pse", "tsc", "msr", "pae", "vmx", "sse", "sse2"]
    )
    assert parse_cpu_flags("processor : 0\n") == frozenset()


@pytest.mark.parametrize(
    ("host", "accel", "reason_part"),
    [
        (facts(flags="vmx", modules="kvm kvm_intel"), "kvm", "kvm_intel"),
        (facts(flags="svm", modules="kvm kvm_amd"), "kvm", "kvm_amd"),
        (facts(flags="sse2", modules="kvm kvm_pvm"), "tcg", "kvm_pvm"),
        (facts(flags="vmx", modules="kvm kvm_pvm"), "tcg", "kvm_intel is not loaded"),
        (facts(flags="svm", modules="kvm kvm_intel"), "tcg", "kvm_amd is not loaded"),
        (facts(dev_kvm=False, flags="vmx", modules="kvm_intel"), "tcg", "/dev/kvm does not"),
        (facts(flags="sse2", modules=""), "tcg", "neither vmx nor svm"),
        (facts(flags="vmx", modules="kvm_intel", accessible=False), "tcg", "cannot open"),
    ],
)
def test_auto_decision(host: HostVirtFacts, accel: str, reason_part: str) -> None:
    decision = decide_accel(Accel.AUTO, host)
    assert decision.accel == accel
    assert reason_part in decision.reason


def test_explicit_tcg_is_always_tcg() -> None:
    assert decide_accel(Accel.TCG, facts(flags="vmx", modules="kvm_intel")).accel == "tcg"


def test_explicit_kvm_on_unusable_host_raises() -> None:
    with pytest.raises(ConfigError, match="kvm_pvm"):
        decide_accel(Accel.KVM, facts(flags="sse2", modules="kvm_pvm"))


def test_unknown_accel_is_refused_where_it_is_parsed() -> None:
    with pytest.raises(ConfigError, match="accel: 'hvf' is not one of auto, kvm, tcg"):
        Accel.parse("hvf", "accel")


@given(
    st.booleans(),
    st.booleans(),
    st.sets(st.sampled_from(["vmx", "svm", "sse2", "lm"])),
    st.sets(st.sampled_from(["kvm_intel", "kvm_amd", "kvm_pvm"])),
)
def test_kvm_only_with_flag_and_matching_module(
    dev_kvm: bool, accessible: bool, flags: set[str], modules: set[str]
) -> None:
    host = HostVirtFacts(dev_kvm, accessible, frozenset(flags), frozenset(modules))
    decision = decide_accel(Accel.AUTO, host)
    hardware = ("vmx" in flags and "kvm_intel" in modules) or (
        "svm" in flags and "kvm_amd" in modules
    )
    assert (decision.accel == "kvm") == (dev_kvm and accessible and hardware)
    assert decision.reason
