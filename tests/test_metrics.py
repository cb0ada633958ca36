"""Every Prometheus metric of the pool (actors/metrics.py), read back from the node's export after a real
run that moves it: answers and their latency, an operation failed under a killed browser, a busy refusal,
outside requests a page attempted, a killed browser and its recovery, the live browsers (also while the
pool sits idle) and their pages' WebAssembly threads. (Hedges are read back where a real hedge is sent:
tests/test_hedging.py.) Each value is checked against what the run did or what the log says."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import ray
from prometheus import export_port, report_interval_s, scrape, total, wait_until

from actors.decisions.threads import wasm_threads
from events.errors import PoolBusyError
from sharding.models import minilm
from webpool import ResourcePool

pytestmark = [pytest.mark.ray, pytest.mark.browser]

MODEL = "all-minilm-l6-v2"
POOL = "metrics-pool"
TEXTS = [f"request {i}: the pool's numbers must tell the log's story" for i in range(16)]


def test_every_pool_metric_reaches_prometheus(ray_local, tmp_path):
    reference = minilm.reference_embed(TEXTS)
    pool = ResourcePool.remote(max_connections=1, event_log=str(tmp_path / "events"), name=POOL,
                               max_queued_requests=1,
                               spare_process=False,   # the kill comes before a spare would be ready
                               fault_tolerance={"level": "medium", "recovery_strategy": "restart"})
    try:
        answered = 0
        for _ in range(3):
            out = ray.get(pool.infer.remote(MODEL, {"texts": TEXTS}))
            assert np.abs(out["embedding"] - reference).max() <= 1e-4
            answered += 1
        browser = out["browser_id"]
        ray.get(pool.inject_fault.remote(browser, "exfiltrate"))
        ray.get(pool.health.remote())                  # the check that finds the page's attempts
        # The browser is killed under a request: its operation fails (outcome "failed"), and the request is
        # answered by its rerun after the recovery.
        ref = pool.infer.remote(MODEL, {"texts": TEXTS * 4})
        while not ray.get(pool.get_state.remote()).operations:
            time.sleep(0.01)
        ray.get(pool.inject_fault.remote(browser, "kill_browser"))
        out = ray.get(ref)
        assert np.abs(out["embedding"] - np.concatenate([reference] * 4)).max() <= 1e-4 and out["recovered"]
        answered += 1
        # One request admitted at a time: the others sent with it are refused at the door.
        busy = 0
        for ref in [pool.infer.remote(MODEL, {"texts": TEXTS}) for _ in range(4)]:
            try:
                assert np.abs(ray.get(ref)["embedding"] - reference).max() <= 1e-4
                answered += 1
            except PoolBusyError:
                busy += 1
        assert busy >= 1, "four requests at once, one admitted at a time: some must be refused"

        events = ray.get(pool.recent_events.remote(ray.get(pool.get_state.remote()).last_seq + 10))
        blocked = sum(e["data"]["count"] for e in events if e["action"] == "PageRequestsBlocked")
        crashes = len([e for e in events if e["action"] == "BrowserFailed" and e["data"]["category"] == "crash"])
        recovered = len([e for e in events if e["action"] == "RecoveryCompleted" and e["data"]["success"]])
        failed = len([e for e in events if e["action"] == "OperationFailed"])
        assert blocked >= 1 and crashes >= 1 and recovered >= 1 and failed >= 1, (blocked, crashes, recovered, failed)

        expected = [      # (metric, its labels besides the pool's, the value the run must have given it)
            ("ray_webpool_requests_total", {"model": MODEL, "outcome": "completed"}, answered),
            ("ray_webpool_requests_total", {"model": MODEL, "outcome": "failed"}, failed),
            ("ray_webpool_requests_total", {"model": MODEL, "outcome": "busy"}, busy),
            ("ray_webpool_request_latency_ms_count", {"model": MODEL}, answered),
            ("ray_webpool_browser_failures_total", {"category": "crash"}, crashes),
            ("ray_webpool_recoveries_total", {"strategy": "restart", "outcome": "success"}, recovered),
            ("ray_webpool_page_requests_blocked_total", {}, blocked),
            ("ray_webpool_active_browsers", {}, 1),
            # Chosen for this machine's cores, the pool's one browser on them (actors/decisions/threads.py).
            ("ray_webpool_wasm_threads", {"browser": browser}, wasm_threads(len(os.sched_getaffinity(0)), 1)),
        ]

        def missing(samples) -> list[str]:
            return [f"{name}{labels} = {got}, expected {want}" for name, labels, want in expected
                    if (got := total(samples, name, pool=POOL, **labels)) != want]

        samples = wait_until(missing)
        assert (total(samples, "ray_webpool_request_latency_ms_sum", pool=POOL, model=MODEL) or 0) > 0

        # The live browsers stay in the export while the pool sits idle: Ray's agent drops a gauge that has
        # not been set for two report intervals, so the pool sets it again every interval. Every scrape over
        # two retention spans of an idle pool shows it (before the refresh it was gone after the first).
        interval = report_interval_s()
        idle_until = time.monotonic() + 2 * 2 * interval
        port = export_port()
        while time.monotonic() < idle_until:
            assert total(scrape(port), "ray_webpool_active_browsers", pool=POOL) == 1
            time.sleep(interval / 4)
    finally:
        ray.get(pool.shutdown.remote())
        ray.kill(pool)
