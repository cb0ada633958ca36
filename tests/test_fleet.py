"""The fleet's handles (pure: no Ray, no browser; the paths that use them run in test_chaos.py)."""

from __future__ import annotations

import asyncio
import re

import pytest

from actors.fleet import Fleet, KeyedLocks
from actors.pool_log import PoolLog
from events.errors import BrowserFailure, WebpoolError
from events.fold import replay
from events.schema import BrowserLaunched, BrowserRetired, Recorded


def _fleet(*events) -> Fleet:
    log = PoolLog("t", "/nonexistent")
    log.state = replay([Recorded(i + 1, 1000.0 + i, e) for i, e in enumerate(events)])
    return Fleet(log, KeyedLocks(), asyncio.ensure_future, num_threads=1, memory_limit_mb=None, backend="auto")


def test_a_browser_the_pool_stopped_is_a_browser_failure_not_a_key_error():
    """A request on its way to a browser that a recovery retired meanwhile (its actor stopped) meets a
    BrowserFailure, which its recovery answers by placing it again: the chaos test once saw a bare KeyError
    reach the caller from there."""
    fleet = _fleet(BrowserLaunched("b1", "chromium", ("wasm",), 1, "n", False, "wasm"),
                   BrowserRetired("b1", "failed over to b2"))
    with pytest.raises(BrowserFailure, match=re.escape("no longer in the pool (retired: failed over to b2)")) as err:
        fleet.handle("b1")
    assert isinstance(err.value, WebpoolError) and err.value.browser_id == "b1"
    with pytest.raises(BrowserFailure, match="never launched"):
        fleet.handle("b9")
