"""The records soak in the test command: chained kill/failover rounds, both storage modes.

A client stores records back to back on one TCP connection while, round after round,
the active host's QEMU and/or agent are SIGKILLed at a random moment and a fresh
standby in the other host namespace takes over (tests/support/soak.py).  Afterwards
every acknowledged record is stored in the guest, in order, and the data disk passes
``e2fsck -fn`` after its journal is replayed.

``KEMARI_SOAK_ROUNDS`` (default 5) sets the rounds, ``KEMARI_TEST_SEED`` replays a run
(the seed is printed; it is also in every failure message).  Hundreds of rounds:
``benchmarks/records_soak.py``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from support.soak import run_soak

from kemari.config import StorageMode

pytestmark = [
    pytest.mark.guest,
    pytest.mark.root,
    pytest.mark.usefixtures("image_and_patched_qemu"),
]


@pytest.mark.parametrize("storage", list(StorageMode), ids=lambda mode: mode.value)
def test_acknowledged_records_survive_chained_kill_rounds(
    tmp_path: Path, storage: StorageMode
) -> None:
    rounds = int(os.environ.get("KEMARI_SOAK_ROUNDS", "5"))
    seed = int(os.environ.get("KEMARI_TEST_SEED", time.time_ns()))
    print(f"records soak [{storage.value}]: {rounds} rounds, seed {seed}")
    result = run_soak(
        storage, rounds, seed, tmp_path, on_round=lambda r: print(r.line(rounds, storage))
    )
    print(result.summary())
    assert len(result.rounds) == rounds
    assert result.acked > 0
