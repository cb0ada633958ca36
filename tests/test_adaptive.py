"""Decisions from performance history (actors/decisions/adaptive.py, placement by cost): pure, over folded events."""

from __future__ import annotations

from actors.decisions import adaptive
from actors.decisions.placement import BrowserView, Placement, place
from events import schema as ev
from events.fold import apply
from events.state import PoolState


def fold(*events: ev.Event, t0: float = 1000.0) -> PoolState:
    s = PoolState()
    for i, e in enumerate(events):
        s = apply(s, ev.Recorded(s.last_seq + 1, t0 + i, e))
    return s


def launched(b: str, standby: bool = False) -> ev.Event:
    return ev.BrowserLaunched(browser_id=b, browser_type="chromium", backend_caps=("wasm",), pid=1, node_id="n",
                              standby=standby)


def ops(b: str, ms: list[float], model: str = "m", failed: int = 0) -> list[ev.Event]:
    out: list[ev.Event] = []
    for i, d in enumerate(ms):
        out += [ev.OperationStarted(f"{b}-{i}", model, b, "infer", "d"), ev.OperationCompleted(f"{b}-{i}", d, {})]
    for i in range(failed):
        out += [ev.OperationStarted(f"{b}-f{i}", model, b, "infer", "d"),
                ev.OperationFailed(f"{b}-f{i}", ev.FailureCategory.TIMEOUT, "slow")]
    return out


N = adaptive.MIN_SAMPLES


def test_cost_is_unknown_until_enough_samples_then_median_over_success():
    s = fold(launched("b1"), *ops("b1", [10] * (N - 1)))
    assert adaptive.expected_cost(s.perf[("b1", "m")]) is None
    s = fold(launched("b1"), *ops("b1", [10, 12, 11, 100, 10, 12, 11, 11], failed=2))
    assert adaptive.expected_cost(s.perf[("b1", "m")]) == 11.0 / (8 / 10)


def test_a_browser_whose_latest_half_went_slow_is_judged_by_the_slow_half():
    """Placement starves a browser once it costs a few times its peers (half its window slow), so its
    window stops there: it must be judged degraded from that window, not kept idle forever."""
    slow = 40 * (adaptive.DEGRADED_FACTOR + 1)
    s = fold(launched("a"), launched("b"), *ops("a", [40] * (N // 2) + [slow] * (N // 2)), *ops("b", [40] * N))
    [degraded] = adaptive.degraded_browsers(s, "m")
    assert degraded.browser_id == "a" and degraded.median_ms == slow


def test_the_page_reported_time_is_the_service_time():
    """Queueing in front of the page is not the browser's slowness: page_ms is measured where it runs."""
    s = fold(launched("b1"), ev.OperationStarted("o", "m", "b1", "infer", "d"),
             ev.OperationCompleted("o", 900.0, {"page_ms": 60.0}))
    assert s.perf[("b1", "m")].recent_ms == (60.0,)


def test_a_browser_far_slower_than_its_peers_is_degraded():
    factor = adaptive.DEGRADED_FACTOR
    s = fold(launched("a"), launched("b"), launched("c"), *ops("a", [40] * N), *ops("b", [50] * N),
             *ops("c", [45 * factor + 1] * N))
    [slow] = adaptive.degraded_browsers(s, "m")
    assert slow.browser_id == "c" and slow.peers_median_ms == 45.0 and "slower than its peers" in slow.reason
    # Below the factor is noise on a shared machine: not degraded; another model's numbers do not count.
    assert adaptive.degraded_browsers(fold(launched("a"), launched("b"), *ops("a", [40] * N),
                                           *ops("b", [40 * factor - 1] * N)), "m") == []
    assert adaptive.degraded_browsers(s, "other") == []


def test_no_peer_no_verdict_and_few_samples_no_verdict():
    assert adaptive.degraded_browsers(fold(launched("a"), *ops("a", [900] * 20)), "m") == []
    few = fold(launched("a"), launched("b"), *ops("a", [40] * N), *ops("b", [4000] * (N - 1)))
    assert adaptive.degraded_browsers(few, "m") == []


def test_standby_and_draining_browsers_are_not_judged_or_peers():
    s = fold(launched("a"), launched("b"), launched("s", standby=True), *ops("a", [40] * N),
             *ops("b", [4000] * N), ev.BrowserDraining("b", "slow"))
    assert adaptive.degraded_browsers(s, "m") == []


def test_idle_browsers_retire_longest_idle_first_keeping_a_minimum():
    s = fold(launched("a"), launched("b"), launched("c"), launched("s", standby=True),
             *ops("a", [5]), *ops("b", [5]), t0=1000.0)     # c last active at launch (t=1002), a and b later
    now = s.last_ts + 60
    assert adaptive.idle_to_retire(s, {}, now, idle_s=30) == ["c", "a"]     # b stays: min_serving=1
    assert adaptive.idle_to_retire(s, {"c": 1}, now, idle_s=30) == ["a", "b"]     # c is busy: it stays
    assert adaptive.idle_to_retire(s, {}, s.last_ts + 10, idle_s=30) == []
    assert adaptive.idle_to_retire(s, {}, now, idle_s=30, min_serving=3) == []


def view(b: str, in_flight: int = 0, cost: float | None = None) -> BrowserView:
    return BrowserView(b, "chromium", frozenset({"k"}), in_flight, cost)


def test_placement_prefers_the_browser_expected_to_answer_first():
    assert place("k", [view("fast", cost=40), view("slow", cost=160)], 2, "chromium").browser_id == "fast"
    # Busy with one, the fast browser still answers first (2 x 40 < 160).
    assert place("k", [view("fast", 1, 40), view("slow", 0, 160)], 2, "chromium").browser_id == "fast"
    assert place("k", [view("fast", 1, 100), view("slow", 0, 160)], 2, "chromium").browser_id == "slow"
    # A browser whose cost is unknown wins a tie, so that its cost gets known (least busy first when no cost
    # is known at all) ...
    assert place("k", [view("known", 0, 40), view("new", 0, None)], 2, "chromium").browser_id == "new"
    assert place("k", [view("new1", 1, None), view("new2", 0, None)], 2, "chromium").browser_id == "new2"
    # ... but is expected to cost what its peers do (their median), not nothing: a standby promoted under load
    # is not sent every request while the others idle.
    assert place("k", [view("known", 0, 40), view("new", 1, None)], 2, "chromium").browser_id == "known"
    peers = [view("a", 3, 30), view("b", 0, 100), view("c", 0, 500)]     # expected waits 120, 100, 500
    assert place("k", [*peers, view("new", 0, None)], 4, "chromium").browser_id == "new"     # 100 (median), tie
    assert place("k", [*peers, view("new", 1, None)], 4, "chromium").browser_id == "b"       # 200
    both_busy = [view("known", 1, 40), view("new", 1, None)]           # step 3: the least expected wait, a tie
    assert place("k", both_busy, 2, "chromium", busy_at=1) == Placement("use", "new")
    assert place("k", [view("known", 1, 40), view("new", 2, None)], 2, "chromium", busy_at=1).browser_id == "known"


def test_a_free_holder_is_used_before_a_busy_one_whatever_its_old_estimate():
    """A cost is known only from work: a browser an old estimate makes look slow is still given work while
    the others are busy (a batch uses busy_at=1), so its estimate is brought up to date. It was not: with a
    cost over twice its peer's, a 2-browser pool queued every batch behind the busy page while the other idled."""
    stale = [view("fast", 1, 10), view("stale", 0, 30)]
    assert place("k", stale, 2, "chromium", busy_at=1) == Placement("use", "stale")
    assert place("k", stale, 2, "chromium").browser_id == "fast"        # both free (busy_at 2): 2 x 10 < 30
    assert place("k", [view("fast", 2, 10), view("stale", 0, 50)], 2, "chromium").browser_id == "stale"
    # Below max_connections too: a free holder serves before the pool grows.
    assert place("k", stale, 4, "chromium", busy_at=1) == Placement("use", "stale")
    assert place("k", [view("fast", 1, 10), view("stale", 1, 30)], 4, "chromium", busy_at=1) == \
        Placement("launch", None)


def test_the_verdict_follows_the_latest_operations():
    """Eight slow operations after twelve fast ones: the browser is slow now, whatever its past."""
    s = fold(launched("a"), launched("b"), *ops("a", [50] * 20), *ops("b", [50] * 12 + [600] * N))
    assert [d.browser_id for d in adaptive.degraded_browsers(s, "m")] == ["b"]
    assert adaptive.expected_cost(s.perf[("b", "m")]) == 600
