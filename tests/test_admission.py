"""The pool's door on real Ray and Chromium: a flood beyond the queue bound gets clear "busy" errors
while every admitted request is answered correctly and the log loses and duplicates nothing; a page
that tries to send data out is blocked, and the attempt shows up in the log and the metrics."""

from __future__ import annotations

import collections
import time

import numpy as np
import pytest
import ray

from actors.pool import PoolCore
from events.errors import InputError
from events.state import browsers_alive
from sharding.models import minilm
from webpool import PoolBusyError, ResourcePool

MODEL = "all-minilm-l6-v2"
QUEUE_BOUND = 6
ROWS_BOUND = 40


@pytest.fixture(scope="module")
def pool(ray_local, tmp_path_factory):
    handle = ResourcePool.remote(max_connections=1, max_queued_requests=QUEUE_BOUND, max_queued_rows=ROWS_BOUND,
                                 event_log=str(tmp_path_factory.mktemp("admission-events")),
                                 fault_tolerance={"level": "medium"},
                                 spare_process=False)          # the door is under test; nothing is restarted
    ray.get(handle.infer.remote(MODEL, {"text": "warm up"}))
    yield handle
    ray.get(handle.shutdown.remote())
    ray.kill(handle)


def _all_events(pool) -> list[dict]:
    state = ray.get(pool.get_state.remote())
    events = ray.get(pool.recent_events.remote(state.last_seq + 100))
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))     # from seq 1, no gap, no repeat
    return events


def test_a_flood_beyond_the_queue_bound_gets_busy_errors_and_loses_nothing(pool):
    texts = [f"flood request {i}: a sentence to embed" for i in range(60)]
    reference = minilm.reference_embed(texts)
    seq0 = ray.get(pool.get_state.remote()).last_seq
    refs = [pool.infer.remote(MODEL, {"text": t}) for t in texts]
    answered, busy = [], []
    for i, ref in enumerate(refs):
        try:
            out = ray.get(ref)
        except PoolBusyError as exc:
            assert "max_queued_requests=6" in str(exc)
            assert 0.05 <= exc.retry_after_s <= 30.0 and f"retry in {exc.retry_after_s:.2f} s" in str(exc)
            busy.append(i)
            continue
        assert np.abs(out["embedding"] - reference[i]).max() <= 1e-4, i
        answered.append(i)
    assert busy, "60 requests at once on a bound of 6 were all admitted"
    assert len(answered) >= QUEUE_BOUND
    assert len(answered) + len(busy) == len(texts)

    events = [e for e in _all_events(pool) if e["seq"] > seq0]
    kinds = collections.Counter(e["action"] for e in events)
    assert kinds["RequestRejected"] == len(busy)
    assert all(e["data"]["admitted"] == QUEUE_BOUND == e["data"]["limit"]
               for e in events if e["action"] == "RequestRejected")
    started = [e["data"]["op_id"] for e in events if e["action"] == "OperationStarted"]
    completed = [e["data"]["op_id"] for e in events if e["action"] == "OperationCompleted"]
    assert len(started) == len(set(started)) == len(answered)        # one operation per admitted request
    assert sorted(completed) == sorted(started)                       # each ended, once
    state = ray.get(pool.get_state.remote())
    assert state.operations == {} and state.metrics["requests_rejected.busy"] >= len(busy)
    # Nothing was harmed: the same browser serves on.
    assert len(browsers_alive(state)) == 1
    out = ray.get(pool.infer.remote(MODEL, {"text": texts[0]}))
    assert np.abs(out["embedding"] - reference[0]).max() <= 1e-4


def test_the_door_counts_rows_and_says_when_to_come_back(pool):
    """Requests of 16 texts: the third at once would bring the admitted rows past ROWS_BOUND (40) while
    fewer than QUEUE_BOUND requests are in; it is refused with a retry hint from the pool's rates, and
    a client that waits that long is served."""
    texts = [f"row {i} of a large request" for i in range(16)]
    seq0 = ray.get(pool.get_state.remote()).last_seq
    refs = [pool.infer.remote(MODEL, {"texts": texts}) for _ in range(5)]
    answered, busy = 0, []
    for ref in refs:
        try:
            ray.get(ref)
            answered += 1
        except PoolBusyError as exc:
            busy.append(exc)
    assert answered >= 2 and busy, (answered, busy)
    assert all("max_queued_rows=40" in str(e) and e.retry_after_s > 0 for e in busy)
    rejected = [e for e in _all_events(pool) if e["seq"] > seq0 and e["action"] == "RequestRejected"]
    assert [e["data"]["reason"] for e in rejected] == ["busy_rows"] * len(busy)
    assert all(e["data"]["admitted"] + 16 > ROWS_BOUND == e["data"]["limit"] for e in rejected)
    time.sleep(busy[0].retry_after_s)
    out = ray.get(pool.infer.remote(MODEL, {"texts": texts}))
    assert np.abs(out["embedding"] - minilm.reference_embed(texts)).max() <= 1e-4


def test_a_page_trying_to_send_data_out_is_blocked_and_recorded(pool):
    [browser] = [b.browser_id for b in browsers_alive(ray.get(pool.get_state.remote()))]
    url = "http://127.0.0.1:9/steal?data=secret"
    fault = ray.get(pool.inject_fault.remote(browser, "exfiltrate", url=url))
    assert fault["attempts"]["fetch"] == "blocked" and fault["attempts"]["websocket"] != "open"
    assert fault["blocked"] >= 3                    # counted before the fault returned
    report = ray.get(pool.health.remote())[browser]
    assert report["blocked_requests"] >= 3          # the fetch, the WebSocket, the navigation
    events = [e for e in _all_events(pool) if e["action"] == "PageRequestsBlocked"]
    assert sum(e["data"]["count"] for e in events) == report["blocked_requests"]
    assert any(u.startswith("http://127.0.0.1:9/steal") for e in events for u in e["data"]["urls"])
    state = ray.get(pool.get_state.remote())
    assert state.browsers[browser].blocked_requests == report["blocked_requests"]
    assert state.metrics["requests_blocked"] == report["blocked_requests"]
    # Reported once: the next health check adds no event.
    ray.get(pool.health.remote())
    assert len([e for e in _all_events(pool) if e["action"] == "PageRequestsBlocked"]) == len(events)
    # The page is still ours and still serves.
    out = ray.get(pool.infer.remote(MODEL, {"text": "still serving"}))
    assert out["browser_id"] == browser
    assert np.abs(out["embedding"] - minilm.reference_embed(["still serving"])[0]).max() <= 1e-4


def test_a_bad_queue_bound_is_a_typed_error():
    for bad in (0, -1, 2.5, True, None):
        with pytest.raises(InputError) as info:
            PoolCore(max_queued_requests=bad)
        assert info.value.field == "max_queued_requests"


def test_a_bad_spare_process_option_is_a_typed_error():
    for bad in (1, "yes", 0.0):
        with pytest.raises(InputError) as info:
            PoolCore(spare_process=bad)
        assert info.value.field == "spare_process"


def test_the_retry_hint_is_the_rows_ahead_at_the_faster_known_rate():
    """README: ``retry_after_s`` is the rows ahead at the faster of the recent answer rate and the pages' own,
    within [0.05 s, 30 s]; a second before any rate is known. (The pool passes exactly these two rates.)"""
    from actors.decisions.batching import retry_after_s

    assert retry_after_s(100, (50.0, None)) == 2.0 and retry_after_s(100, (None, 50.0)) == 2.0
    assert retry_after_s(100, (20.0, 50.0)) == 2.0 and retry_after_s(100, (50.0, 20.0)) == 2.0
    assert retry_after_s(1, (1000.0,)) == 0.05 and retry_after_s(10**6, (1.0, 0.5)) == 30.0
    assert retry_after_s(100, (None, None)) == 1.0 and retry_after_s(100, (0.0, None)) == 1.0


def test_the_pages_own_rate_sums_each_serving_browsers_median_per_row_time():
    """The retry hint's second rate (``batching.page_rows_per_s``): rows per second from each serving browser's
    median per-row page time, summed; a standby, a draining browser and another model's history do not count.
    Pure, over folded events."""
    from actors.decisions.batching import page_rows_per_s
    from events import schema as ev
    from events.fold import apply
    from events.state import PoolState

    def fold(*events: ev.Event) -> PoolState:
        state = PoolState()
        for i, e in enumerate(events):
            state = apply(state, ev.Recorded(state.last_seq + 1, 1000.0 + i, e))
        return state

    def browser(b: str, standby: bool = False) -> ev.Event:
        return ev.BrowserLaunched(browser_id=b, browser_type="chromium", backend_caps=("wasm",), pid=1, node_id="n",
                                  standby=standby)

    def runs(b: str, page_ms: list[float], rows: int = 1, model: str = "m") -> list[ev.Event]:
        return [e for i, ms in enumerate(page_ms) for e in (
            ev.OperationStarted(f"{b}-{model}-{i}", model, b, "infer", "d"),
            ev.OperationCompleted(f"{b}-{model}-{i}", ms + 5, {"page_ms": ms, "rows": rows}))]

    assert page_rows_per_s(fold(browser("b1")), "m") is None
    # b1: 10 ms a row (16-row runs of 160 ms); b2: 20 ms a row, median of a noisy window; b3 another model only.
    state = fold(browser("b1"), browser("b2"), browser("b3"), browser("s", standby=True),
                 *runs("b1", [160] * 3, rows=16), *runs("b2", [18, 20, 90, 22, 20]), *runs("b3", [1], model="other"),
                 *runs("s", [1]))
    assert page_rows_per_s(state, "m") == 100.0 + 50.0
    assert page_rows_per_s(state, "other") == 1000.0
    state = apply(state, ev.Recorded(state.last_seq + 1, 2000.0, ev.BrowserDraining(browser_id="b1", reason="slow")))
    assert page_rows_per_s(state, "m") == 50.0


def test_the_retry_hints_answer_rate_counts_the_busy_time_of_the_last_window_only(monkeypatch):
    """README: a refused client's hint is the rows ahead at the rate the pool answered rows while it had work,
    over the last 5 s (``ANSWER_RATE_WINDOW_S``): time with no request admitted does not count. Pure logic on a
    stepped clock."""
    from actors import batching as batching_module
    from actors.constants import ANSWER_RATE_WINDOW_S

    now = [1000.0]
    monkeypatch.setattr(batching_module.time, "monotonic", lambda: now[0])
    rate = batching_module.AnswerRate()
    assert rate.rows_per_s() is None                        # nothing answered yet: no rate to promise
    rate.work_began()
    now[0] += 0.5
    rate.add(100)                                           # 100 rows in 0.5 s of work
    rate.work_ended()
    now[0] += 2.0                                           # idle: not counted
    rate.work_began()
    now[0] += 0.25
    rate.add(20)
    assert rate.rows_per_s() == pytest.approx(120 / 0.75)  # both inside the window, still busy
    rate.work_ended()
    now[0] += 1.0
    assert rate.rows_per_s() == pytest.approx(120 / 0.75)  # an idle second changes nothing
    now[0] = 1000.5 + ANSWER_RATE_WINDOW_S + 0.1             # the first answer and its work are now older
    assert rate.rows_per_s() == pytest.approx(20 / 0.25)
    rate.work_began()
    now[0] += 0.05
    assert rate.rows_per_s() == pytest.approx(20 / 0.3)    # the stretch under way counts as it goes
    rate.work_ended()
    now[0] += ANSWER_RATE_WINDOW_S
    assert rate.rows_per_s() is None                        # a quiet pool's old rate is not promised
