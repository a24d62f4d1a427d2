"""Fuzz target for the ft-transaction decoder and the standby's transaction rules.

Run with atheris:  python tests/fuzz/fuzz_transaction.py [libFuzzer flags] [corpus_dir]
(coverage-guided, with a mutator that repairs lengths, checksums and sequence numbers,
see tests/fuzz/structured.py).  Without atheris, the same command replays the input
files it is given.  In the test suite it is driven by hypothesis (tests/test_fuzz.py).
The only acceptable outcomes for any input are validated frames or a TransactionError.
"""

import sys
from pathlib import Path

from kemari.errors import TransactionError
from kemari.transaction.session import TransactionTracker
from kemari.transaction.wire import FrameDecoder


def TestOneInput(data: bytes) -> None:
    """Entry point under the name atheris expects.

    The first byte picks a chunk size (low 6 bits), whether compressed page frames were
    negotiated (bit 6) and whether payload checksums were dropped (bit 7, a TLS session
    with NO_PAYLOAD_CRC); the rest is fed in chunks of that size, and every decoded
    frame goes through the standby's transaction state machine.
    """
    if not data:
        return
    step = data[0] % 64 + 1
    decoder = FrameDecoder(max_payload=1 << 16)
    decoder.zstd_pages = bool(data[0] & 0x40)
    decoder.payload_crc = not data[0] & 0x80
    transactions = TransactionTracker()
    body = data[1:]
    try:
        for start in range(0, len(body), step):
            for frame in decoder.feed(body[start : start + step]):
                transactions.apply(frame.payload)
    except TransactionError:
        return


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the fuzz package
    try:
        import atheris  # type: ignore[import-not-found]  # noqa: PLC0415, F401 - optional engine
    except ImportError:
        for name in sys.argv[1:]:
            if not name.startswith("-"):
                TestOneInput(Path(name).read_bytes())  # a failure shows its traceback
        return
    from fuzz.atheris_run import run  # noqa: PLC0415

    run("fuzz_transaction", "atheris_wire_mutator")


if __name__ == "__main__":
    main()
