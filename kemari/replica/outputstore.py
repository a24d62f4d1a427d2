"""The standby's copy of the guest outputs of its last committed epoch.

A failover must release the outputs of the epoch it resumes from again: the dead primary
may have died before releasing them (duplicates are harmless, losses are not).  So the
standby keeps them next to the replica, one file per epoch, ``<dir>/epoch-<N>.out`` in
the OUTPUT payload layout (:func:`kemari.transaction.wire.encode_outputs`).

Consistency with the replica's committed epoch, without a shared commit point:

* :meth:`OutputStore.stage` writes epoch *N*'s file (temporary name, then rename)
  *before* the replica commits *N*; :meth:`OutputStore.committed` removes every other
  file only *after* it did.  Whatever the replica's committed epoch is after a crash,
  its file is there (a missing file means: that epoch carried no output).
* Epochs grow strictly within a session; a new session restarts at epoch 0, whose
  commit removes all files of the old one.  Epoch 0 never carries outputs (outputs
  read before the initial sync ends are not held), so a new session cannot overwrite
  the old session's file of the replica's epoch before the new replica replaces it.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

from kemari.errors import EventTapError, TransactionError
from kemari.outputs import Output
from kemari.transaction.wire import decode_outputs, encode_outputs

_FILE_RE = re.compile(r"^epoch-(\d+)\.out$")
_TEMPORARY_SUFFIX = ".tmp"


class OutputStore:
    """Files of held outputs per epoch under ``directory`` (created on first use)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path_of(self, epoch: int) -> Path:
        """Where epoch ``epoch``'s outputs are kept."""
        return self.directory / f"epoch-{epoch}.out"

    def stage(self, epoch: int, outputs: Sequence[Output]) -> None:
        """Keep ``outputs`` as epoch ``epoch``'s, before the replica commits that epoch."""
        path = self.path_of(epoch)
        try:
            if not outputs:
                path.unlink(missing_ok=True)
                return
            self.directory.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(path.name + _TEMPORARY_SUFFIX)
            with temporary.open("wb") as handle:
                handle.writelines(encode_outputs(outputs))
            os.replace(temporary, path)
        except OSError as exc:
            raise EventTapError(f"cannot keep the outputs of epoch {epoch}: {exc}") from exc

    def committed(self, epoch: int) -> None:
        """The replica committed ``epoch``: forget every other epoch's outputs."""
        keep = self.path_of(epoch).name
        with contextlib.suppress(FileNotFoundError):
            for entry in self.directory.iterdir():
                if entry.name != keep and (
                    _FILE_RE.match(entry.name) or entry.name.endswith(_TEMPORARY_SUFFIX)
                ):
                    entry.unlink(missing_ok=True)

    def load(self, epoch: int) -> tuple[Output, ...]:
        """The outputs kept for ``epoch`` (none if it carried none); EventTapError if damaged."""
        path = self.path_of(epoch)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return ()
        except OSError as exc:
            raise EventTapError(f"cannot read {path}: {exc}") from exc
        try:
            return decode_outputs(memoryview(data), str(path))
        except TransactionError as exc:
            raise EventTapError(f"{path} is damaged: {exc}") from exc
