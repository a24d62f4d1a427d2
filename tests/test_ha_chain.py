"""Issue 9, scenario 7: a chain of automatic failovers back and forth, in both storage
modes, ending with a clean ``e2fsck``.

The session's lab (``ha_lab``, tests/support/ha_pair.py), one VM per storage mode
(``hachain-replicated``, ``hachain-shared``).  Both agents run the same ``--ha``
command; the client stores records on ONE connection throughout.  Each round: the pair
is protected (no command typed), the active's QEMU and agent are SIGKILLed, the standby
takes over by itself, every record acknowledged so far must be stored in order, and the
killed host's agent is started again with the same command (it rejoins as the
standby).  After the last takeover the pair is protected once more, the client stops
(its connection survived every takeover), the agents stop (standby first) and every
image the pair wrote passes a journal replay and ``e2fsck -fn``.
"""

from __future__ import annotations

import pytest
from support.ha_pair import HaLab, HaPair, kill_and_take_over, protected_pair

from kemari.config import StorageMode
from kemari.testbed.wait import wait_for

pytestmark = [
    pytest.mark.guest,
    pytest.mark.root,
    pytest.mark.usefixtures("image_and_patched_qemu"),
]

TAKEOVERS = 3


@pytest.mark.parametrize("storage", list(StorageMode), ids=lambda mode: mode.value)
def test_chain_of_takeovers_back_and_forth(
    ha_lab: HaLab, tmp_path_factory: pytest.TempPathFactory, storage: StorageMode
) -> None:
    workdir = tmp_path_factory.mktemp(f"ha-chain-{storage.value}")
    pair = HaPair(ha_lab, workdir, storage, f"hachain-{storage.value}")
    try:
        pair.boot()
        active_host, standby_host = "a", "b"
        for number in range(1, TAKEOVERS + 1):
            took = kill_and_take_over(pair, active_host, standby_host)
            assert took.term == number + 1
            checked = pair.check_acked_stored()
            print(
                f"[{storage.value}] takeover {number}: {active_host} → {standby_host}, "
                f"kill → active {took.active_ms:.0f} ms, → client's ack {took.ack_s:.2f} s; "
                f"{checked} records acknowledged and stored"
            )
            pair.start_agent(active_host).wait_monitor()  # the same command again
            active_host, standby_host = standby_host, active_host
        active, standby = pair.agents[active_host], pair.agents[standby_host]
        wait_for(lambda: protected_pair(active, standby), "protected after the chain", 240)
        print(f"[{storage.value}] {pair.finish_client()} records acknowledged, stored in order")
        assert standby.stop() == 0
        assert active.stop() == 0
    finally:
        pair.close()
    pair.check_images()
