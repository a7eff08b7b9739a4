"""Waiting on a condition instead of sleeping and hoping.

A test that needs something to have happened (a note generated, a message delivered, a row freed)
polls for it with a generous timeout: on a quiet machine it goes on at once, on a busy one it waits
longer, and only a condition that never comes true fails, naming what it waited for.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, TypeVar

T = TypeVar("T")
What = str | Callable[[], str]

POLL_SECONDS = 0.02


def wait_for(predicate: Callable[[], T], timeout: float, what: What, interval: float = POLL_SECONDS) -> T:
    """Polls ``predicate`` until it returns something true and returns that; fails the test after
    ``timeout`` seconds with "timed out after ... waiting for <what>" (``what`` may be a function,
    called then, to describe what was there instead)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(_timed_out(timeout, what))
        time.sleep(interval)


async def wait_until(predicate: Callable[[], T], timeout: float, what: What, interval: float = POLL_SECONDS) -> T:
    """:func:`wait_for` inside a running event loop: it sleeps with ``asyncio.sleep`` between polls, so
    the tasks it waits on keep running."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(_timed_out(timeout, what))
        await asyncio.sleep(interval)


def _timed_out(timeout: float, what: What) -> str:
    return f"timed out after {timeout:g} s waiting for {what() if callable(what) else what}"
