"""The standby's copy of the guest outputs of its last committed epoch.

A failover must release the outputs of the epoch it resumes from again: the dead primary
may have died before releasing them (duplicates are harmless, losses are not).  So the
standby keeps them next to the replica, one file per epoch, ``<dir>/epoch-<N>.out``: a
kemari.persist frame whose payload is the OUTPUT payload layout
(:func:`kemari.transaction.wire.encode_outputs`), replaced atomically and, unless the
directory is on a memory filesystem, fsynced with its directory.

Consistency with the replica's committed epoch, without a shared commit point:

* :meth:`OutputStore.stage` writes epoch *N*'s file (kemari.persist.write_file)
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
import re
from collections.abc import Sequence
from pathlib import Path

from kemari import persist
from kemari.errors import EventTapError, PersistError, TransactionError
from kemari.outputs import Output
from kemari.transaction.wire import decode_outputs, encode_outputs

_FILE_RE = re.compile(r"^epoch-(\d+)\.out$")
# An epoch's outputs are bounded by what the primary holds (held_frames_max for frames,
# max_held_bytes plus one checkpoint's worth for disk writes); the standby holds them in
# memory too.  The bound only keeps a damaged header from asking for more.
MAX_OUTPUTS_FILE = 16 << 30
OUTPUTS_FORMAT = persist.Format("held outputs", b"KMR:OUTS", 1, MAX_OUTPUTS_FILE)


class OutputStore:
    """Files of held outputs per epoch under ``directory`` (created on first use)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._durable: bool | None = None  # known once the directory exists

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
            if self._durable is None:
                self.directory.mkdir(parents=True, exist_ok=True)
                self._durable = not persist.is_volatile(self.directory)
            persist.write_file(path, OUTPUTS_FORMAT, encode_outputs(outputs), durable=self._durable)
        except (OSError, PersistError) as exc:
            raise EventTapError(f"cannot keep the outputs of epoch {epoch}: {exc}") from exc

    def committed(self, epoch: int) -> None:
        """The replica committed ``epoch``: forget every other epoch's outputs."""
        keep = self.path_of(epoch).name
        with contextlib.suppress(FileNotFoundError):
            for entry in self.directory.iterdir():
                if entry.name != keep and (
                    _FILE_RE.match(entry.name) or entry.name.endswith(persist.TEMPORARY_SUFFIX)
                ):
                    entry.unlink(missing_ok=True)

    def load(self, epoch: int) -> tuple[Output, ...]:
        """The outputs kept for ``epoch`` (none if it carried none); EventTapError if damaged."""
        path = self.path_of(epoch)
        try:
            data = persist.read_file(path, OUTPUTS_FORMAT)
        except persist.MissingFileError:
            return ()
        except PersistError as exc:
            raise EventTapError(f"the outputs of epoch {epoch} cannot be loaded: {exc}") from exc
        try:
            return decode_outputs(memoryview(data), str(path))
        except TransactionError as exc:
            raise EventTapError(f"{path} is damaged: {exc}") from exc
