"""Waiting for a condition with a deadline: the one way tests and the demo synchronise.

A fixed sleep guesses how long something takes; these poll the condition itself and
fail, naming what was awaited, once the deadline passes.  :func:`wait_for` blocks the
thread; :func:`async_wait_for` is its twin for coroutines (its condition may itself be
a coroutine, for example a QMP query).  Both return the condition's first true value,
so a condition can hand back what it found.  A condition may raise to give up early
(for example when the process it waits on has exited).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, overload

from kemari.errors import KemariError

T = TypeVar("T")


def _timed_out(what: str, timeout: float, detail: Callable[[], str] | None) -> KemariError:
    message = f"timed out after {timeout:g} s waiting for {what}"
    if detail is not None:
        message += f"; {detail()}"
    return KemariError(message)


def wait_for(
    predicate: Callable[[], T | None],
    what: str,
    timeout: float = 60.0,
    interval: float = 0.05,
    detail: Callable[[], str] | None = None,
) -> T:
    """Poll ``predicate`` every ``interval`` s until it returns a true value, and return it.

    KemariError naming ``what`` (and ``detail()``, if given) after ``timeout`` s.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise _timed_out(what, timeout, detail)
        time.sleep(interval)  # the poll interval, not a guess at how long ``what`` takes


@overload
async def async_wait_for(
    predicate: Callable[[], Awaitable[T | None]],
    what: str,
    timeout: float = ...,
    interval: float = ...,
    detail: Callable[[], str] | None = ...,
) -> T: ...


@overload
async def async_wait_for(
    predicate: Callable[[], T | None],
    what: str,
    timeout: float = ...,
    interval: float = ...,
    detail: Callable[[], str] | None = ...,
) -> T: ...


async def async_wait_for(
    predicate: Callable[[], object],
    what: str,
    timeout: float = 60.0,
    interval: float = 0.05,
    detail: Callable[[], str] | None = None,
) -> object:
    """:func:`wait_for` for coroutines: the event loop runs on between polls, and
    ``predicate`` may return an awaitable (it is awaited, inside the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                    value = await value
            except TimeoutError:
                raise _timed_out(what, timeout, detail) from None
        if value:
            return value
        if time.monotonic() > deadline:
            raise _timed_out(what, timeout, detail)
        await asyncio.sleep(interval)  # the poll interval
