"""The pool is its log: a pool process SIGKILLed mid-workload is restarted by Ray, rebuilds from its log,
and answers every request that was in flight, correctly, once each; its state is then the log's replay."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import ray
from logcheck import assert_state_is_replay_of_disk
from procs import alive

from events.state import ALIVE_STATUSES, open_operations
from sharding.models import minilm
from webpool import ResourcePool

MODEL = "all-minilm-l6-v2"
NAME = "restart-pool"
# Each request is ~0.5 s of page work, so the kill lands while operations are open, not in the few ms
# between an operation's completion reaching the log and its reply reaching the caller (then the log
# holds no open operation to end, and the caller's retry simply runs again).
TEXTS = [f"request {i} was in flight when the pool died, and it must be answered once by the next pool" * 2
         for i in range(8)]
ROWS = 16


@pytest.mark.ray
@pytest.mark.browser
def test_a_killed_pool_is_restarted_rebuilds_from_its_log_and_answers_every_request_in_flight(ray_local, tmp_path):
    reference = minilm.reference_embed(TEXTS)
    location = tmp_path / "events"
    pool = ResourcePool.options(name=NAME).remote(max_connections=2, event_log=str(location), name=NAME,
                                                  fault_tolerance={"level": "medium"})
    ray.get(pool.infer.remote(MODEL, {"text": "warm up"}))
    first_pid = ray.get(pool.pid.remote())
    refs = [pool.infer.remote(MODEL, {"texts": [t] * ROWS}) for t in TEXTS]
    deadline = time.monotonic() + 60
    while not open_operations(ray.get(pool.get_state.remote())):     # kill it while work is under way
        assert time.monotonic() < deadline, "no request reached a browser"
    before = ray.get(pool.get_state.remote())
    alive_before = {b.browser_id: b.pid for b in before.browsers.values() if b.status in ALIVE_STATUSES}
    os.kill(first_pid, signal.SIGKILL)

    outs = ray.get(refs, timeout=300)
    for text, ref_row, out in zip(TEXTS, reference, outs, strict=True):
        assert out["embedding"].shape == (ROWS, 384), text
        assert np.abs(out["embedding"] - ref_row).max() <= 1e-4, text
    assert ray.get(pool.pid.remote()) != first_pid, "Ray restarted the pool in a new process"

    state = ray.get(pool.get_state.remote())
    assert open_operations(state) == []
    events = ray.get(pool.recent_events.remote(state.last_seq + 1000))
    rebuilt = [e for e in events if e["action"] == "OperationFailed"
               and e["data"]["error"] == "the pool restarted while it ran"]
    assert rebuilt, "the operations the dead incarnation had started end failed in the log"
    restart_seq = rebuilt[0]["seq"]
    # The dead incarnation's browsers outlived it (detached actors): the new one adopted them, pages, models and
    # processes as they were, and they served the retried requests.
    retired = {e["subject"] for e in events
               if e["action"] == "BrowserRetired" and e["data"]["reason"] == "pool restarted"}
    assert alive_before and not retired & set(alive_before), (alive_before, retired)
    assert {b: state.browsers[b].pid for b in alive_before} == alive_before, "same browser processes"
    # Models as they were: a browser that held the model before the kill serves it on without loading it again.
    held_before = {m.browser_id for m in before.models.values() if m.model == MODEL} & set(alive_before)
    loaded_again = {e["subject"] for e in events if e["action"] == "ModelLoaded" and e["seq"] > restart_seq}
    assert held_before and not held_before & loaded_again, (held_before, loaded_again)
    served_after = {e["data"]["browser_id"] for e in events if e["action"] == "OperationStarted"
                    and e["seq"] > restart_seq}
    assert served_after & set(alive_before), (served_after, alive_before)
    # Every request still in flight at the kill was answered from the new incarnation: each completed there.
    # (Requests the dead incarnation had already completed may have been answered before the kill; the warm-up
    # request is one of those.)
    done_before = [e for e in events if e["action"] == "OperationCompleted" and e["seq"] < restart_seq]
    completed = [e for e in events if e["action"] == "OperationCompleted" and e["seq"] > restart_seq]
    assert len(completed) >= len(TEXTS) - (len(done_before) - 1) and len(completed) >= len(rebuilt), (
        len(completed), len(done_before), len(rebuilt))
    # The configuration is recorded once, first: the restarted incarnation, configured alike, adds none.
    configured = [e for e in events if e["action"] == "PoolConfigured"]
    assert [e["seq"] for e in configured] == [1] and configured[0]["data"]["level"] == state.config["level"]

    ray.get(pool.shutdown.remote())
    assert_state_is_replay_of_disk(ray.get(pool.get_state.remote()), NAME, location)
    ray.kill(pool)


@pytest.mark.ray
@pytest.mark.browser
def test_a_pool_killed_for_good_takes_its_browsers_with_it(ray_local, tmp_path):
    """Browser actors outlive a restart of their pool, not the pool: killed with no restart (as when its
    driver goes), its browsers close and their processes exit on their own."""
    pool = ResourcePool.remote(max_connections=1, event_log=str(tmp_path / "events"))
    ray.get(pool.infer.remote(MODEL, {"text": "one request, then the pool is killed"}))
    [browser] = [b for b in ray.get(pool.get_state.remote()).browsers.values() if b.status in ALIVE_STATUSES]
    os.kill(browser.pid, 0)       # alive now
    ray.kill(pool, no_restart=True)
    deadline = time.monotonic() + 60
    while alive(browser.pid):
        assert time.monotonic() < deadline, f"browser process {browser.pid} outlived its pool"
        time.sleep(0.05)



@pytest.mark.ray
def test_a_pool_started_on_a_log_with_other_options_records_them_again(ray_local, tmp_path):
    """The log says how the pool ran: a pool started on an existing log adds a PoolConfigured event when its
    configuration differs from the last one recorded, and none when it is the same."""
    log_dir = str(tmp_path / "events")

    def configured_after(**options) -> list[dict]:
        pool = ResourcePool.remote(event_log=log_dir, **options)
        try:
            state = ray.get(pool.get_state.remote())          # opens the log: no browser is needed for this
            events = ray.get(pool.recent_events.remote(state.last_seq + 10))
            ray.get(pool.shutdown.remote())
        finally:
            ray.kill(pool, no_restart=True)
        return [e["data"] for e in events if e["action"] == "PoolConfigured"]

    assert [c["level"] for c in configured_after(fault_tolerance={"level": "none"})] == ["none"]
    assert [c["level"] for c in configured_after(fault_tolerance={"level": "low"})] == ["none", "low"]
    again = configured_after(fault_tolerance={"level": "low"})
    assert [c["level"] for c in again] == ["none", "low"], "the same configuration is not recorded twice"
    assert [c["options"]["max_connections"] for c in configured_after(fault_tolerance={"level": "low"},
                                                                      max_connections=2)][-1] == 2
