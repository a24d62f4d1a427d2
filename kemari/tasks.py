"""asyncio task helpers shared by the agent's components."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and return once it has finished (its CancelledError is expected;
    any other exception it ends with propagates)."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
