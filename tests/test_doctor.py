"""``kemari doctor`` on this host: the real command, its JSON and its exit status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from kemari.doctor import Check, Report, Status, elf_has_interpreter, format_report
from kemari.qemu.accel import AccelDecision


def doctor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kemari.cli.main", "doctor", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def test_doctor_json_structure_and_tcg_decision() -> None:
    done = doctor("--json")
    report = json.loads(done.stdout)
    assert set(report) == {"ok", "accel", "qemu", "checks"}
    assert report["accel"]["accel"] == "tcg"
    assert "kvm_pvm" in report["accel"]["reason"] or "vmx" in report["accel"]["reason"]
    assert report["qemu"]["path"].endswith("qemu-system-x86_64")
    assert report["qemu"]["version"].startswith("QEMU emulator version")
    names = [check["name"] for check in report["checks"]]
    for expected in (
        "qemu",
        "accel",
        "/dev/kvm",
        "/dev/net/tun",
        "netns",
        "bridge",
        "qemu-img",
        "qemu-io",
        "nbdinfo",
        "nbdcopy",
        "mkfs.ext4",
        "busybox-static",
        "gcc static libc",
        "guest image",
    ):
        assert expected in names
    for check in report["checks"]:
        assert set(check) == {"name", "status", "detail", "fix", "required"}
        assert check["status"] in ("ok", "warn", "fail")
    required_failed = any(c["required"] and c["status"] == "fail" for c in report["checks"])
    assert report["ok"] is not required_failed
    assert done.returncode == (1 if required_failed else 0)


def test_doctor_text_output_names_the_accel_reason() -> None:
    done = doctor()
    assert "accel" in done.stdout
    assert "tcg" in done.stdout
    assert done.stdout.rstrip().splitlines()[-1].startswith("kemari doctor: ")


def test_doctor_sees_a_built_image_through_kemari_cache_dir(tmp_path: Path) -> None:
    env = dict(os.environ, KEMARI_CACHE_DIR=str(tmp_path))
    image = next(c for c in json.loads(doctor("--json", env=env).stdout)["checks"]
                 if c["name"] == "guest image")  # fmt: skip
    assert image["status"] == "warn"
    assert str(tmp_path) in image["detail"]
    (tmp_path / "image").mkdir()
    (tmp_path / "image" / "manifest.json").write_text("{}")
    image = next(c for c in json.loads(doctor("--json", env=env).stdout)["checks"]
                 if c["name"] == "guest image")  # fmt: skip
    assert image["status"] == "ok"


def test_required_failure_makes_the_report_not_ok() -> None:
    decision = AccelDecision("tcg", "test")
    fine = Check("a", Status.WARN, "optional missing", "apt-get install a")
    broken = Check("b", Status.FAIL, "required missing", "apt-get install b", required=True)
    assert Report((fine,), decision, None, None, None).ok
    report = Report((fine, broken), decision, None, None, None)
    assert not report.ok
    text = format_report(report)
    assert "fix (required): apt-get install b" in text
    assert "NOT ready" in text


def test_static_and_dynamic_elf_are_told_apart() -> None:
    assert not elf_has_interpreter(Path("/bin/busybox").read_bytes())
    assert elf_has_interpreter(Path(sys.executable).resolve().read_bytes())
