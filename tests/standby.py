"""Waiting for a pool's warm standby, shared by the tests (imported as ``standby``: pytest puts this folder on
sys.path)."""

from __future__ import annotations

import time

import ray


def warm_standby(pool, timeout: float = 120.0) -> str:
    """The pool's standby, once it is up with the model loaded and warmed up (it comes up in the background)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = ray.get(pool.get_state.remote())
        spares = [b for b in state.browsers.values() if b.standby and b.status == "launched"]
        if spares and any(m.warmed_up for k, m in state.models.items() if k[0] == spares[0].browser_id):
            return spares[0].browser_id
        time.sleep(0.2)
    raise AssertionError("no warm standby")
