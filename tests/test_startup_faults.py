"""A browser that dies while it starts is a failure like any other: typed, recorded, recovered, bounded.

The faults are real: every browser main process that appears below this test process is SIGKILLed as
soon as it is seen (tests/procs.py: picked by PID from /proc), before or while it opens its DevTools
port. Answers are checked against the numpy reference.
"""

from __future__ import annotations

import asyncio
import os
import signal

import numpy as np
import pytest
import ray
from procs import BrowserStartKiller, is_browser_main_process

from actors import chromium
from actors.browser import BrowserCore
from actors.chromium import descendants
from events.errors import BrowserFailure, FailureCategory, NoBrowserAvailableError
from events.state import browsers_alive, open_operations
from sharding.models import minilm
from webpool import ResourcePool

pytestmark = [pytest.mark.ray, pytest.mark.browser]

MODEL = "all-minilm-l6-v2"
SENTENCES = ["A browser that dies while it starts.", "It is replaced, and the request is answered."]


def _browser_processes() -> set[int]:
    return {p for p in descendants(os.getpid()) if is_browser_main_process(p)}


def test_a_browser_killed_while_starting_is_recovered_and_one_killed_every_time_ends_typed(ray_local, tmp_path):
    reference = minilm.reference_embed(SENTENCES)
    before = _browser_processes()
    pool = ResourcePool.remote(max_connections=1, event_log=str(tmp_path / "events"), request_timeout=30.0,
                               fault_tolerance={"level": "medium", "recovery_strategy": "progressive",
                                                "max_recovery_attempts": 2})
    try:
        # 1. The first browser dies while starting: the request is answered, through a recovery.
        with BrowserStartKiller(os.getpid(), limit=1) as killer:
            out = ray.get(pool.infer.remote(MODEL, {"texts": SENTENCES}), timeout=300)
        assert len(killer.killed) == 1
        assert np.abs(out["embedding"] - reference).max() <= 1e-4
        assert out["recovered"] and "during start-up" in out["original_error"], out.get("original_error")
        assert "crash" in out["original_error"], "a process that exited is a CRASH"

        # 2. Every browser dies while starting (the serving one is killed to make the pool start others):
        #    every request, the one in flight at the kill and those sent while the pool tries, ends with the
        #    documented error, and nothing is left running.
        seq0 = ray.get(pool.get_state.remote()).last_seq
        with BrowserStartKiller(os.getpid()) as killer:
            refs = [pool.infer.remote(MODEL, {"texts": SENTENCES * 8})]      # in flight when its browser dies
            ray.get(pool.inject_fault.remote(out["browser_id"], "kill_browser"))
            refs += [pool.infer.remote(MODEL, {"text": s}) for s in SENTENCES * 2]
            errors = []
            for ref in refs:
                with pytest.raises(NoBrowserAvailableError) as raised:
                    ray.get(ref, timeout=300)
                errors.append(str(raised.value))
            assert any("recovery exhausted" in e and "during start-up" in e for e in errors), errors
            state = ray.get(pool.get_state.remote())
            assert killer.killed, "the pool tried to start browsers"
            assert browsers_alive(state) == [] and open_operations(state) == [] and not state.recoveries
            assert ray.get(pool.health.remote()) == {}
            assert _browser_processes() - before == set(), "a browser process outlived its failed start"
        events = ray.get(pool.recent_events.remote(state.last_seq + 10))
        steps = [e["data"] for e in events if e["action"] == "RecoveryStepFinished"]
        errors = [s["error"] for s in steps if not s["success"]]
        assert any("BrowserFailure: " in e and "during start-up" in e for e in errors), errors
        # Bounded, not a retry loop: the failed browser's recoveries stay within max_recovery_attempts (2), and
        # each request tries at most max_recovery_attempts + 1 times, each try at most one launch of its own.
        later = [e for e in events if e["seq"] > seq0]
        recoveries = [e for e in later if e["action"] == "RecoveryStarted"]
        launches = [e for e in later if e["action"] == "PoolScaled" and e["data"]["direction"] == "up"]
        assert 1 <= len(recoveries) <= 2 and len(launches) <= len(refs) * 3, (recoveries, launches)
        assert all("request failed" not in e or "failed 3 times" in e for e in errors), errors

        # 3. The faults stop: the same pool serves again.
        again = ray.get(pool.infer.remote(MODEL, {"texts": SENTENCES}), timeout=300)
        assert np.abs(again["embedding"] - reference).max() <= 1e-4
    finally:
        ray.get(pool.shutdown.remote())
        ray.kill(pool)


def test_a_browser_that_never_opens_its_devtools_port_is_a_start_up_timeout(monkeypatch):
    """A start-up that runs out of time is a TIMEOUT BrowserFailure, from the budget that ran out, and leaves no
    process behind. Real: the browser's main process is frozen (SIGSTOP) as soon as it appears, before it writes
    its DevTools port. In-process BrowserCore, so the port's wait can be cut to 1 s (15 s in a pool)."""
    monkeypatch.setattr(chromium, "DEVTOOLS_PORT_WAIT", 1.0)
    before = _browser_processes()
    core = BrowserCore("frozen-at-start")

    async def start_then_close() -> None:
        try:
            await core.start()
        finally:
            await core.close()

    with BrowserStartKiller(os.getpid(), limit=1, sig=signal.SIGSTOP) as stopper:
        with pytest.raises(BrowserFailure) as failure:
            asyncio.run(start_then_close())
    assert len(stopper.killed) == 1, "the browser was frozen as it started"
    assert failure.value.category is FailureCategory.TIMEOUT, failure.value
    assert "start-up ran out of time" in str(failure.value) and "DevTools port" in str(failure.value), failure.value
    assert _browser_processes() - before == set(), "the frozen browser was ended"
