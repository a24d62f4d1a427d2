"""Event-tap: guest outputs are held until the checkpoint that produced them is committed.

Only the pure output log is exported here, so lower layers (the ft-transaction wire
format) can use it without importing the checkpoint machinery.
"""

from kemari.eventtap.outputs import HeldOutput, OutputLog
from kemari.outputs import Output, OutputKind

__all__ = ["HeldOutput", "Output", "OutputKind", "OutputLog"]
