"""The central claim, checked on a real pool: its state is the projection of the log on disk.

Imported as ``logcheck`` (pytest puts this folder on sys.path).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import ray

from events.columnar import replay_batches
from events.fold import replay
from events.state import PoolState, open_operations
from events.store import EventStore


def state_once_operations_end(pool: ray.actor.ActorHandle, timeout: float = 60.0) -> PoolState:
    """The pool's state once no operation is open. A request can be answered while a run of it is still
    going (the losing run of a hedged request, level high): that run ends in the log within its time
    budget, so the wait is bounded; an operation still open at ``timeout`` fails the test."""
    deadline = time.monotonic() + timeout
    while True:
        state = ray.get(pool.get_state.remote())
        if not open_operations(state) or time.monotonic() > deadline:
            assert open_operations(state) == [], "every started operation ends completed or failed"
            return state
        time.sleep(0.1)


def assert_state_is_replay_of_disk(state: PoolState, pool_name: str, location: Path) -> None:
    """Stop the pool's StateLog (so its lock is free), open the segment files anew, replay them from seq 1
    up to ``state.last_seq`` with no snapshot, and compare the result with ``state`` field by field."""
    ray.kill(ray.get_actor(f"{pool_name}-log"), no_restart=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            store = EventStore.open(location, lock_timeout_s=1.0)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    try:
        replayed = replay(store.read(1, state.last_seq))
        # The columnar fold (what the store itself uses to open) must give the same state on a real log.
        assert replay_batches(store.read_batches(1, state.last_seq)) == replayed
    finally:
        store.close()
    differing = []
    for field in dataclasses.fields(PoolState):
        mine, theirs = getattr(state, field.name), getattr(replayed, field.name)
        if mine != theirs:
            if isinstance(mine, dict) or hasattr(mine, "keys"):
                keys = sorted({*mine, *theirs}, key=repr)
                differing += [f"{field.name}[{k!r}]: pool {mine.get(k)!r} != replay {theirs.get(k)!r}"
                              for k in keys if mine.get(k) != theirs.get(k)]
            else:
                differing.append(f"{field.name}: pool {mine!r} != replay {theirs!r}")
    assert not differing, "the pool's state is not the replay of its log:\n" + "\n".join(differing[:20])
    assert state == replayed
