"""Fuzz target for the ft-transaction decoder and the standby's transaction rules.

Run with atheris:  python tests/fuzz/fuzz_transaction.py [corpus_dir]
In the test suite it is driven by hypothesis (tests/test_transaction_wire.py).
The only acceptable outcomes for any input are validated frames or a TransactionError.
"""

import sys

from kemari.errors import TransactionError
from kemari.transaction.session import TransactionTracker
from kemari.transaction.wire import FrameDecoder


def TestOneInput(data: bytes) -> None:
    """Entry point under the name atheris expects.

    The first byte picks a chunk size; the rest is fed in chunks of that size, and every
    decoded frame goes through the standby's transaction state machine.
    """
    if not data:
        return
    step = data[0] % 64 + 1
    decoder = FrameDecoder(max_payload=1 << 16)
    transactions = TransactionTracker()
    body = data[1:]
    try:
        for start in range(0, len(body), step):
            for frame in decoder.feed(body[start : start + step]):
                transactions.apply(frame.payload)
    except TransactionError:
        return


def main() -> None:
    import atheris  # type: ignore[import-not-found]  # noqa: PLC0415 - optional fuzz engine

    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
