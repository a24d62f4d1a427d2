"""Kemari's patched QEMU: cache key logic, the patch against Debian's real source, the built binary.

The source tests download Debian's qemu source package (about 24 MB) with apt-get;
the binary tests build the patched QEMU if the cache has none (about 7 minutes on
2 cores; ``scripts/setup`` normally did it already) and then run real COLO
checkpoints under TCG through ``benchmarks/colo_checkpoint_probe.py``.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kemari.errors import QemuError
from kemari.qemu.build import (
    CONFIGURE_OPTIONS,
    BuildKey,
    PatchedQemu,
    apply_patch,
    build_patched_qemu,
    cached_build,
    current_key,
    fetch_source,
    installed_source_version,
    read_patch,
    recipe_sha256,
    validate_debian_version,
)
from kemari.qemu.cmdline import MachineSpec, MemoryFile
from kemari.qemu.debian import QEMU_PROGRAM
from kemari.qemu.machine import QemuMachine

REPO = Path(__file__).resolve().parents[1]
PROBE = REPO / "benchmarks" / "colo_checkpoint_probe.py"

_revisions = st.from_regex(r"[0-9][0-9A-Za-z.+~]{0,20}", fullmatch=True)


def _quiet(line: str) -> None:
    del line


# -- cache key ------------------------------------------------------------------------


def test_recipe_hash_changes_with_patch_and_options() -> None:
    patch = read_patch()
    base = recipe_sha256(patch, CONFIGURE_OPTIONS)
    assert recipe_sha256(patch + b"\n", CONFIGURE_OPTIONS) != base
    assert recipe_sha256(patch, (*CONFIGURE_OPTIONS, "--enable-kvm")) != base
    # Option boundaries count: ("a", "bc") and ("ab", "c") are different recipes.
    assert recipe_sha256(patch, ("a", "bc")) != recipe_sha256(patch, ("ab", "c"))


@given(_revisions, _revisions)
def test_key_names_are_path_safe_and_distinct(first: str, second: str) -> None:
    versions = [validate_debian_version(f"1:7.2+dfsg-{rev}") for rev in (first, second)]
    keys = [BuildKey(version, "ab" * 32) for version in versions]
    for key in keys:
        assert "/" not in key.name and ":" not in key.name
        assert key.name.endswith("-" + "ab" * 6)
    assert (keys[0].name == keys[1].name) == (first == second)


@pytest.mark.parametrize(
    "version", ["", "8.0+dfsg-1", "1:7.2+dfsg-7/../../etc", "1:7.2+dfsg-7 x", "7.2.0-1"]
)
def test_foreign_versions_are_refused(version: str) -> None:
    with pytest.raises(QemuError, match=r"7\.2"):
        validate_debian_version(version)


def test_installed_version_is_the_source_version() -> None:
    version = installed_source_version()
    binary_version = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", "qemu-system-x86"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # A binNMU (+bN) is rebuilt from the same source: the key must not include it.
    assert binary_version.startswith(version)
    assert re.search(r"\+b\d+$", version) is None


def _fake_build(root: Path, key: BuildKey, version: str) -> Path:
    """Lay out a cache entry the way _install does, with a shell script as the binary."""
    bindir = root / key.name / "usr" / "bin"
    bindir.mkdir(parents=True)
    binary = bindir / QEMU_PROGRAM
    binary.write_text(f"#!/bin/sh\necho '{version}'\n")
    binary.chmod(0o755)
    return binary


def test_cache_lookup_requires_the_result_file_and_matching_version(tmp_path: Path) -> None:
    key = BuildKey("1:7.2+dfsg-7+deb12u18", "cd" * 32)
    assert cached_build(key, tmp_path) is None
    version = f"QEMU emulator version 7.2.22 ({key.pkgversion})"
    binary = _fake_build(tmp_path, key, version)
    assert cached_build(key, tmp_path) is None  # interrupted build: no result file yet
    result = tmp_path / key.name / "build.json"
    result.write_text("{not json")
    assert cached_build(key, tmp_path) is None
    result.write_text('{"version": "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7)"}')
    assert cached_build(key, tmp_path) is None  # built from another recipe
    result.write_text(f'{{"version": "{version}"}}')
    assert cached_build(key, tmp_path) == PatchedQemu(key=key, binary=binary, version=version)
    other = BuildKey("1:7.2+dfsg-7+deb12u19", key.recipe_sha256)
    assert cached_build(other, tmp_path) is None


# -- the patch against Debian's real source ----------------------------------------------


@pytest.fixture(scope="module")
def debian_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Debian's qemu source for the installed version, Debian's patches applied."""
    work = tmp_path_factory.mktemp("qemu-source")
    return fetch_source(installed_source_version(), work, _quiet)


def test_patch_applies_to_debian_source_and_only_once(debian_source: Path) -> None:
    colo = debian_source / "migration" / "colo.c"
    physmem = debian_source / "softmmu" / "physmem.c"
    before = colo.read_text()
    apply_patch(debian_source, read_patch(), _quiet)
    after = colo.read_text()
    assert after.count("qemu_mutex_lock_iothread();\n    qemu_savevm_live_state(") == 1
    assert len(after.splitlines()) == len(before.splitlines()) + 2
    flushed = physmem.read_text()
    assert "run_on_cpu(cpuas->cpu, tcg_flush_after_sync, RUN_ON_CPU_NULL);" in flushed
    with pytest.raises(QemuError, match="failed"):
        apply_patch(debian_source, read_patch(), _quiet)
    assert colo.read_text() == after  # a refused patch changes nothing
    assert physmem.read_text() == flushed


def test_patch_that_does_not_fit_is_refused_cleanly(debian_source: Path) -> None:
    broken = read_patch().replace(b"qemu_fflush(fb);", b"qemu_fflush(nonexistent);")
    savevm = debian_source / "migration" / "savevm.c"
    before = savevm.read_text()
    with pytest.raises(QemuError, match="does the Debian source still match"):
        apply_patch(debian_source, broken, _quiet)
    assert savevm.read_text() == before


# -- the built binary -------------------------------------------------------------------


@pytest.fixture(scope="module")
def patched() -> Iterator[PatchedQemu]:
    yield build_patched_qemu(progress=_quiet)


def test_patched_binary_is_debians_qemu_with_the_fix(patched: PatchedQemu) -> None:
    key = current_key()
    assert patched.key == key
    assert f"Debian {key.debian_version}, kemari colo-tcg-bql" in patched.version
    found = shutil.which(QEMU_PROGRAM)
    assert found is not None
    stock = Path(found)
    stock_version = subprocess.run(
        [str(stock), "--version"], capture_output=True, text=True, check=True
    ).stdout.split()[3]
    assert patched.version.split()[3] == stock_version  # same upstream QEMU, e.g. 7.2.22
    assert patched.binary.resolve() != stock.resolve()
    assert build_patched_qemu(progress=_quiet) == patched  # cached: same result, no rebuild


@pytest.mark.guest
def test_patched_qemu_completes_colo_checkpoints_under_tcg(patched: PatchedQemu) -> None:
    probe = [sys.executable, str(PROBE), "--binary", str(patched.binary)]
    completed = subprocess.run(
        [*probe, "--checkpoints", "30", "--periodic", "1", "--timeout", "20"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    assert "DEADLOCK" not in output
    assert "on demand    30 checkpoints" in output, output
    assert "after the checkpoints the VM is running" in output, output


def test_patched_binary_has_what_kemari_uses(patched: PatchedQemu, tmp_path: Path) -> None:
    def help_text(*args: str) -> str:
        return subprocess.run(
            [str(patched.binary), *args], capture_output=True, text=True, check=True
        ).stdout

    assert "stream" in help_text("-netdev", "help").split()
    devices = help_text("-device", "help")
    for device in ("virtio-net-pci", "virtio-blk-pci", "isa-serial"):
        assert f'name "{device}"' in devices
    assert "memory-backend-file" in help_text("-object", "help")
    assert "nbd" in help_text("-drive", "format=help").split()
    assert "tcg" in help_text("-accel", "help").split()

    async def capabilities() -> dict[str, bool]:
        spec = MachineSpec(
            name="caps",
            accel="tcg",
            qmp_socket=tmp_path / "qmp.sock",
            memory_mib=32,
            start_paused=True,
            memory_file=MemoryFile(path=tmp_path / "ram", share=True),
        )
        async with QemuMachine(spec, patched.binary) as machine:
            await machine.execute(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": "x-colo", "state": True}]},
            )
            answer = await machine.execute("query-migrate-capabilities")
        return {entry["capability"]: entry["state"] for entry in answer}

    found = asyncio.run(asyncio.wait_for(capabilities(), 60))
    assert found["x-colo"] is True
    assert "x-ignore-shared" in found
