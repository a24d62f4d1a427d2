"""A missing prerequisite fails the tests that need it; it never skips them.

The proof runs the checkpoint and failover tests in a child pytest whose Kemari cache
(``$KEMARI_CACHE_DIR``, where ``kemari qemu build`` puts the patched QEMU and
``kemari image build`` the guest image) is an empty directory: none may be skipped, the
checkpoint and failover tests must fail at setup, and every failure must be the one-line
message naming the patched QEMU and the command that builds it.  Nothing boots: the
failures come before any QEMU starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from support import prerequisites

TESTS_DIR = Path(__file__).resolve().parent

# Every module whose tests checkpoint a guest or fail over (all of them run --accel tcg,
# so they need the patched QEMU on every host, KVM or not).
NEEDS_PATCHED_QEMU = [
    "test_checkpoint_source.py",
    "test_failover.py",
    "test_eventtap_disk_guest.py",
    "test_protection.py",
    "test_storage_modes.py",
    "test_eventtap_guest.py",
    "test_eventtap_backpressure.py",
    "test_protocol_phases.py",
    "test_records_soak.py",
]
# The tests in those modules that need no patched QEMU: one runs Debian's QEMU (it
# takes no checkpoint), two start no QEMU at all.
NEEDS_NO_PATCHED_QEMU = (
    "not during_the_initial_sync and not positive_u32 and not without_any_replica"
)


def outcomes(junit: Path) -> dict[str, tuple[str, str]]:
    """test id -> (outcome, message) from a JUnit XML report."""
    result = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome, message = "passed", ""
        for kind in ("skipped", "error", "failure"):
            element = case.find(kind)
            if element is not None:
                outcome, message = kind, element.get("message") or element.text or ""
        result[name] = (outcome, message)
    return result


def test_without_the_patched_qemu_the_checkpoint_tests_fail_with_the_fix(tmp_path: Path) -> None:
    empty_cache = tmp_path / "empty-cache"
    empty_cache.mkdir()
    environment = dict(os.environ, KEMARI_CACHE_DIR=str(empty_cache))
    environment.pop(prerequisites.PATCHED_QEMU_OVERRIDE, None)
    junit = tmp_path / "junit.xml"
    child = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs",
            f"--junitxml={junit}", "-k", NEEDS_NO_PATCHED_QEMU,
            *(str(TESTS_DIR / module) for module in NEEDS_PATCHED_QEMU),
        ],
        cwd=TESTS_DIR.parent, env=environment, capture_output=True, text=True, timeout=300,
        check=False,
    )  # fmt: skip
    report = child.stdout[-4000:] + child.stderr[-2000:]
    assert child.returncode == 1, report  # 1: tests failed (not 0, not a usage error)
    results = outcomes(junit)
    assert not [name for name, (kind, _) in results.items() if kind == "skipped"], report
    expected = (
        f"missing prerequisite: Kemari's patched QEMU (checkpoints under TCG deadlock "
        f"without it) is not built in {empty_cache / 'qemu'}; run scripts/setup "
        "(or: .venv/bin/kemari qemu build)"
    )
    failed = {name for name, (kind, _) in results.items() if kind in ("error", "failure")}
    for name in failed:
        message = results[name][1]
        if os.geteuid() != 0 and "missing prerequisite: root" in message:
            continue  # the conftest root check comes first for tests marked root
        assert expected in message, (name, message)
    # The checkpoint and failover tests themselves are among them.
    core = {
        f"tests.test_checkpoint_source::test_{name}"
        for name in (
            "initial_sync_and_on_demand_checkpoints_track_the_guest",
            "checkpoints_carry_writes_to_tlb_resident_pages",
            "the_guest_runs_while_its_checkpoint_is_forwarded",
            "a_window_of_0_keeps_the_guest_paused_until_commit_returns",
            "standby_lost_during_a_checkpoint_leaves_the_guest_running",
        )
    } | {
        f"tests.test_failover::test_failover_continues_the_counter_after_kill_rounds[{guest}]"
        for guest in ("linux", "ticker")
    }
    assert core <= failed, sorted(core - failed)
    assert len(failed) >= 20, report


def test_a_missing_tool_fails_with_the_package_that_installs_it() -> None:
    with pytest.raises(pytest.fail.Exception) as failure:
        prerequisites.tool("kemari-no-such-tool", "kemari-no-such-package")
    assert str(failure.value) == (
        "missing prerequisite: kemari-no-such-tool is not in PATH; run scripts/setup "
        "(or: apt-get install kemari-no-such-package)"
    )
