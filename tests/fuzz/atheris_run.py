"""Run a fuzz target under atheris, with only Kemari's modules instrumented.

``atheris.instrument_all()`` would instrument every loaded function (13 s at start for
the stdlib alone), so the Kemari modules the target's module already imported are
dropped and imported again inside ``instrument_imports``.
"""

import importlib
import sys
from typing import Any


def run(target: str, mutator: str) -> None:
    """Fuzz ``fuzz.<target>.TestOneInput`` with ``fuzz.mutate.<mutator>`` (sys.argv
    holds libFuzzer's flags and corpus directories, or input files to run once)."""
    import atheris  # type: ignore[import-not-found]  # noqa: PLC0415 - optional engine

    for name in [n for n in sys.modules if n == "kemari" or n.startswith("kemari.")]:
        del sys.modules[name]
    with atheris.instrument_imports(include=["kemari"]):
        module = importlib.import_module(f"fuzz.{target}")
    repair = getattr(importlib.import_module("fuzz.mutate"), mutator)

    def custom_mutator(data: bytes, max_size: int, seed: int) -> Any:
        return repair(data, max_size, seed, atheris.Mutate)

    atheris.Setup(sys.argv, module.TestOneInput, custom_mutator=custom_mutator)
    atheris.Fuzz()
