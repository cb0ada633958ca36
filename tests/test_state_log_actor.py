"""The StateLog actor on a real local Ray: serving, long-poll subscribe, idempotent retries, kill -9."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import ray

from actors.state_log import get_or_create_state_log, new_batch_id
from events.errors import StoreConfigError
from events.fold import replay
from events.schema import (
    BrowserConnected,
    BrowserLaunched,
    ModelLoaded,
    OperationCompleted,
    OperationStarted,
)
from events.state import models_on, open_operations
from events.store import EventStore
from webpool.localray import start_local_ray

NAMESPACE = "webpool-tests-statelog"


@pytest.fixture(scope="module")
def ray_up():
    """A real local Ray; reuses one a session fixture already started (one Ray per process)."""
    if ray.is_initialized():
        yield
        return
    temp = tempfile.mkdtemp(prefix="wpray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    start_local_ray(Path(temp), num_cpus=2)     # after tests/conftest.py's configure_auth_env (at its import)
    yield
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def state_log(ray_up, tmp_path):
    made = []

    def make(**options):
        name = f"statelog-{uuid.uuid4().hex[:8]}"
        handle = get_or_create_state_log(name, tmp_path / "log", namespace=NAMESPACE, **options)
        made.append(handle)
        return handle

    yield make
    for h in made:
        ray.kill(h, no_restart=True)


def wait_until_released(path: Path, timeout: float = 20.0) -> EventStore:
    """Open the store once the killed actor's process has let go of its lock."""
    return EventStore.open(path, fsync="never", lock_timeout_s=timeout)


def test_append_read_state_snapshot_and_recent(state_log, tmp_path):
    log = state_log(fsync="always", snapshot_every=None)
    rec = ray.get(log.append.remote(BrowserLaunched("b1", "chromium", ("wasm",), 1, "n", False)))
    assert rec.seq == 1
    recs = ray.get(log.append_batch.remote([BrowserConnected("b1"),
                                            ModelLoaded("b1", "minilm", None, "ab", "wasm", 10.0)]))
    assert [r.seq for r in recs] == [2, 3] and ray.get(log.last_seq.remote()) == 3
    assert ray.get(log.read.remote()) == [rec, *recs]
    assert ray.get(log.read.remote(2, 3, ["ModelLoaded"])) == recs[1:]
    assert ray.get(log.read.remote(1, None, None, "b1", 2)) == [rec, recs[0]]
    state = ray.get(log.state.remote())
    assert state == replay([rec, *recs]) and [m.model for m in models_on(state, "b1")] == ["minilm"]
    assert ray.get(log.snapshot.remote()) == 3
    entries = ray.get(log.recent.remote(2))
    assert [e["action"] for e in entries] == ["ModelLoaded", "SnapshotWritten"]
    assert entries[0]["data"]["model"] == "minilm" and entries[0]["timestamp"] == recs[1].ts


def test_subscribe_is_a_long_poll_from_a_seq(state_log):
    log = state_log()
    ray.get(log.append.remote(BrowserLaunched("b1", "chromium", ("wasm",), 1, "n", False)))
    t0 = time.monotonic()
    assert ray.get(log.subscribe.remote(2, 0.3), timeout=60) == []  # nothing new: returns at the timeout...
    assert time.monotonic() - t0 > 0.25                              # ...having waited for it
    pending = log.subscribe.remote(2, 30.0)
    time.sleep(0.3)
    ready, _ = ray.wait([pending], timeout=0)
    assert not ready  # still waiting
    ray.get(log.append_batch.remote([BrowserConnected("b1"), BrowserConnected("b1")]))
    # The append wakes the poll: it answers long before its own 30 s (a poll left waiting fails the get here).
    got = ray.get(pending, timeout=10)
    assert [r.seq for r in got] == [2, 3]
    assert ray.get(log.wait_for.remote(3, 0.1)) == 3


def test_a_retried_append_with_its_batch_id_is_recorded_once(state_log):
    log = state_log()
    batch = [OperationStarted("op1", "m", "b1", "infer", "d"), OperationCompleted("op1", 3.0, {})]
    bid = new_batch_id()
    first = ray.get(log.append_batch.remote(batch, bid))
    again = ray.get(log.append_batch.remote(batch, bid))
    assert again == first and ray.get(log.last_seq.remote()) == 2


def test_get_or_create_finds_the_named_actor_and_checks_its_location(ray_up, tmp_path):
    name = f"statelog-{uuid.uuid4().hex[:8]}"
    a = get_or_create_state_log(name, tmp_path / "log", namespace=NAMESPACE)
    try:
        b = get_or_create_state_log(name, tmp_path / "log", namespace=NAMESPACE)
        assert ray.get(a.info.remote())["pid"] == ray.get(b.info.remote())["pid"]
        with pytest.raises(StoreConfigError, match="already serves"):
            get_or_create_state_log(name, tmp_path / "elsewhere", namespace=NAMESPACE)
    finally:
        ray.kill(a, no_restart=True)


WRITERS = 6


def test_concurrent_appends_share_group_commits(state_log):
    """README: appends that arrive together are written with one write and one sync. 64 appends sent at
    once (fsync on every commit) are recorded in fewer commits than calls, each once, in distinct seqs."""
    log = state_log(fsync="always")
    recs = ray.get([log.append.remote(BrowserConnected(f"b{i}")) for i in range(64)])
    assert sorted(r.seq for r in recs) == list(range(1, 65))
    assert sorted(r.event.browser_id for r in recs) == sorted(f"b{i}" for i in range(64))
    info = ray.get(log.info.remote())
    assert info["appends"] == 64 and 1 <= info["group_commits"] < 64, info


def test_kill_9_while_writers_append_loses_no_acknowledged_event(state_log, tmp_path):
    """Six writers append concurrently (so appends are group-committed together) while the StateLog is
    SIGKILLed twice: every acknowledged batch is in the log once, at its seq, each writer's in its order."""
    log = state_log(fsync="always", snapshot_every=25)
    acked: list = []  # (writer, events, records) in acknowledgement order
    errors: list = []
    stop = threading.Event()

    def writer(w: int) -> None:
        i = 0
        try:
            while not stop.is_set():
                events = [OperationStarted(f"op{w}-{i}", "minilm", "b1", "infer", f"d{i}"),
                          OperationCompleted(f"op{w}-{i}", 1.0, {"i": i})]
                recs = ray.get(log.append_batch.remote(events, f"writer-{w}-{i}"), timeout=60)
                acked.append((w, events, recs))
                i += 1
        except Exception as exc:  # surfaced by the assertions below
            errors.append(exc)

    def wait_acked(n: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while len(acked) < n and not errors:
            assert time.monotonic() < deadline, f"only {len(acked)} of {n} appends acknowledged"
            time.sleep(0.01)

    threads = [threading.Thread(target=writer, args=(w,), daemon=True) for w in range(WRITERS)]
    for thread in threads:
        thread.start()
    pids, restarts = [], []
    try:
        for target in (40 * WRITERS, 120 * WRITERS):
            wait_acked(target)
            info = ray.get(log.info.remote())
            pids.append(info["pid"])
            seq_at_kill = info["last_seq"]
            t_kill = time.monotonic()
            os.kill(info["pid"], signal.SIGKILL)
            wait_acked(len(acked) + 1)
            restarts.append(time.monotonic() - t_kill)
            after = ray.get(log.info.remote())
            assert after["pid"] != info["pid"] and after["restarted"]
            assert after["last_seq"] >= seq_at_kill  # the sequence continues, it does not restart
        wait_acked(len(acked) + 40)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert not errors, errors
    print(f"\nkill -9 x2: restarts served again after {[round(r, 2) for r in restarts]} s; "
          f"{len(acked)} batches acknowledged")

    def check(records: list) -> None:
        assert [r.seq for r in records] == list(range(1, len(records) + 1))  # no gap, no duplicate
        by_seq = {r.seq: r for r in records}
        for _w, _events, recs in acked:  # every acknowledged record is there, at the seq it was given
            for r in recs:
                assert by_seq[r.seq] == r
        ops = [r.event for r in records if r.kind in ("OperationStarted", "OperationCompleted")]
        for w in range(WRITERS):   # each writer's events in its order, each exactly once (writers end acked)
            assert [e for e in ops if e.op_id.startswith(f"op{w}-")] == [e for a in acked if a[0] == w
                                                                          for e in a[1]]
        state = replay(records)
        assert open_operations(state) == [] and not any(k.startswith("anomaly.") for k in state.metrics)
        assert state.metrics["operations_completed"] == len(acked)

    served = ray.get(log.read.remote())
    check(served)
    assert ray.get(log.state.remote()) == replay(served)
    ray.kill(log, no_restart=True)
    with wait_until_released(tmp_path / "log") as store:  # and it is all on disk
        on_disk = list(store.read())
    assert on_disk == served
    check(on_disk)


def test_an_automatic_snapshots_marker_comes_back_with_the_append_that_caused_it(state_log):
    """The store snapshots every ``snapshot_every`` events inside an append and records a SnapshotWritten of
    its own: the append's reply carries it after the batch's records, so a reader applying replies in seq
    order meets no gap (the pool's log waited RECORD_GAP_WAIT, 5 s, for it: every request stalled)."""
    log = state_log(snapshot_every=5)
    seen: list[int] = []
    for i in range(12):
        reply = ray.get(log.append_batch.remote([BrowserConnected(f"b{i}")], new_batch_id()))
        assert reply[0].kind == "BrowserConnected"
        seen += [rec.seq for rec in reply]
        assert seen == list(range(1, len(seen) + 1)), seen          # contiguous: nothing left to read back
    markers = [rec for rec in ray.get(log.read.remote(1)) if rec.kind == "SnapshotWritten"]
    assert len(markers) == 2 and {m.seq for m in markers} <= set(seen)
