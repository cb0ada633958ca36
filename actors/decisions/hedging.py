"""Hedged requests: when to send a second copy of a slow request, to which browser, and how many.

A request whose page run has taken longer than nearly all runs of its size take (the p95 of the model's
per-row page time, times the run's rows, plus the transport) is also sent to another browser that holds
the model and is idle; the first answer wins (Dean & Barroso, "The Tail at Scale"). A hang, or a browser that
died without a signal yet, then costs the caller about one more request time instead of a time budget
and a recovery. A token bucket bounds the extra load.

Pure: the router (actors/router.py) supplies the history, the candidates and the clock.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from actors.constants import (
    HEDGE_BUDGET_BURST,
    HEDGE_BUDGET_PER_S,
    HEDGE_BUDGET_RATIO,
    HEDGE_MAX_MS,
    HEDGE_MIN_MS,
    HEDGE_MIN_SAMPLES,
    HEDGE_TRANSPORT_MS,
)


def p95(samples: Sequence[float]) -> float:
    """The nearest-rank 95th percentile (samples need not be sorted; at least one)."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def delay_ms(row_ms: Sequence[float], rows: int) -> float:
    """How long a request of ``rows`` rows runs before it is hedged, from recent per-row page times of
    its model (``row_ms``, every browser's). Too little history: the cap. Always within [floor, cap]."""
    if len(row_ms) < HEDGE_MIN_SAMPLES:
        return HEDGE_MAX_MS
    return min(HEDGE_MAX_MS, max(HEDGE_MIN_MS, p95(row_ms) * max(rows, 1) + HEDGE_TRANSPORT_MS))


@dataclass(eq=False)
class PageRun:
    """A page run in flight on ``browser_id`` with ``rows`` rows. ``started`` (monotonic seconds) is when the
    page took it up: None while it waits in the page behind another run (a page runs one at a time)."""

    browser_id: str
    rows: int
    started: float | None


def hedge_at(submitted: float, rows: int, own: PageRun | None, in_flight: Sequence[PageRun],
             row_ms: Sequence[float]) -> float:
    """When a request is hedged (monotonic seconds): once the page run it waits for is slow, that is, has run
    longer than ``delay_ms`` for that run's rows. That is its own run once its page has taken it up; before
    that, the run its page is busy with (or, still queued in the pool, the oldest run of its model): a hung
    run ahead holds it up as its own would, and runs that end in time never hedge it, however many wait (a
    copy would only compete with them for the same cores). With no run at all (its browser being placed or
    launched), its own delay from when it was submitted. ``in_flight``: the model's runs in flight."""
    if own is not None and own.started is not None:
        return own.started + delay_ms(row_ms, own.rows) / 1000
    busy = [(r.started, r.rows) for r in in_flight
            if r.started is not None and (own is None or r.browser_id == own.browser_id)]
    if busy:
        started, run_rows = min(busy)
        return started + delay_ms(row_ms, run_rows) / 1000
    return submitted + delay_ms(row_ms, rows) / 1000


class PageRuns:
    """The embedding runs in flight, by model: each begins taken up by its page unless another run is ahead
    of it in that page (a page runs one at a time, in the order they were sent), and its page takes up the
    next waiting run when it ends. In memory, the router's view of its own calls (not pool state)."""

    def __init__(self) -> None:
        self._by_model: dict[str, list[PageRun]] = {}

    def of(self, model: str) -> Sequence[PageRun]:
        return self._by_model.get(model, ())

    def begin(self, model: str, browser_id: str, rows: int, now: float) -> PageRun:
        running = self._by_model.setdefault(model, [])
        ahead = any(r.browser_id == browser_id for r in running)
        run = PageRun(browser_id, rows, None if ahead else now)
        running.append(run)
        return run

    def end(self, model: str, run: PageRun, now: float) -> None:
        running = self._by_model[model]
        running.remove(run)
        same_page = [r for r in running if r.browser_id == run.browser_id]
        if same_page and all(r.started is None for r in same_page):
            same_page[0].started = now


@dataclass(frozen=True)
class Candidate:
    """A live browser that could take a hedge."""

    browser_id: str
    holds_model: bool           # loaded (and, on a standby, warmed up): a hedge never waits for a load
    in_flight: int              # requests using it now
    standby: bool
    cost: float | None = None   # expected ms per request of this model there (None: unknown)


def pick_target(candidates: Sequence[Candidate]) -> str | None:
    """The idle browser holding the model that is expected fastest (serving before standby on a tie);
    None when none is idle. A busy browser is no hedge: the copy would queue behind its work (and the
    request's own run is on a busy one)."""
    idle = [c for c in candidates if c.holds_model and c.in_flight == 0]
    if not idle:
        return None
    best = min(idle, key=lambda c: (c.cost if c.cost is not None else math.inf, c.standby, c.browser_id))
    return best.browser_id


class Budget:
    """A token bucket: each request adds ``ratio`` of a token and each second ``per_s``, up to ``burst``; a
    hedge spends one. Under load the ratio bounds the extra work (a slow pool must not double its own
    load); on a quiet pool the time refill lets a rare slow request be hedged all the same.

    A rate limiter of the request path, not pool state: a restarted pool starts with a full bucket. The
    caller passes the clock (``now``, seconds, monotonic).
    """

    def __init__(self, ratio: float = HEDGE_BUDGET_RATIO, burst: float = HEDGE_BUDGET_BURST,
                 per_s: float = HEDGE_BUDGET_PER_S, now: float = 0.0) -> None:
        self.ratio = ratio
        self.burst = burst
        self.per_s = per_s
        self.tokens = burst
        self._at = now

    def _refill(self, add: float, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + add + self.per_s * max(0.0, now - self._at))
        self._at = max(self._at, now)

    def on_request(self, now: float) -> None:
        self._refill(self.ratio, now)

    def try_spend(self, now: float) -> bool:
        self._refill(0.0, now)
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True
