"""Queueing decisions: when the next batch of a model's queued requests starts and which requests it
takes (actors/batching.py acts on them), and when a refused client should come back. Pure functions
over row counts, rates, clocks and the pool's state.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence

from events.state import PoolState, browsers_alive


def take(rows: Sequence[int], max_rows: int, free_slots: int = 1) -> int:
    """How many queued requests (their row counts, oldest first) the next batch takes.

    The queue is shared evenly between the ``free_slots`` batches that can start now (each browser gets
    its part, rather than one browser all of it while another idles), at most ``max_rows`` rows a batch.
    Requests are taken in arrival order while their rows fit; the oldest is always taken, so a request
    larger than the share runs alone and none waits behind a later one.
    """
    if not rows:
        return 0
    share = min(max_rows, -(-sum(rows) // max(1, free_slots)))
    taken, total = 1, rows[0]
    for n in rows[1:]:
        if total + n > share:
            break
        taken, total = taken + 1, total + n
    return taken


def batches_per_browser(pages_here: int, cores_here: int) -> int:
    """How many batches of a model may be in flight per browser: two while this machine has more cores than
    serving pages, so that the next batch travels to a page (results back, the log's appends, the call
    through the browser actor and CDP: work of the pool's processes) while one runs on a core of its own;
    one once the pages have every core, where that work competes with the pages for the same cores and a
    second batch only halves each batch (docs/facts.md, "Batches in flight per browser")."""
    return 2 if cores_here > pages_here else 1


def delay(queued_rows: int, oldest_waited_s: float, max_rows: int, wait_s: float) -> float:
    """Seconds to hold a free slot before starting the next batch: none once the queue fills a batch
    or its oldest request has waited ``wait_s``; else the rest of that wait (more requests may join)."""
    if queued_rows <= 0:
        raise ValueError("nothing is queued")
    if queued_rows >= max_rows:
        return 0.0
    return max(0.0, wait_s - oldest_waited_s)


def page_rows_per_s(state: PoolState, model: str) -> float | None:
    """The rows per second the pool's serving browsers run ``model`` at once rows reach their pages: each
    browser's median per-row page time (its ``perf`` window) as a rate, summed over the browsers. Queueing,
    model loads and browser starts are left out, and the windows hold runs a request had alone, whose
    per-row time carries the whole run's fixed cost: a lower bound when rows run batched. None with no
    history of ``model`` on a serving browser."""
    medians = [statistics.median(w.recent_ms) for b in browsers_alive(state) if not b.standby and not b.draining
               and (w := state.perf.get((b.browser_id, model))) is not None and w.recent_ms]
    rates = [1000.0 / ms for ms in medians if ms > 0]
    return sum(rates) if rates else None


def retry_after_s(queued_rows: int, rates: Iterable[float | None], floor_s: float = 0.05,
                  ceiling_s: float = 30.0) -> float:
    """When a client refused at the door should retry: the time the pool needs to answer the rows ahead of it,
    within [floor, ceiling], at the fastest of ``rates`` (rows per second; None where unknown): each is a lower
    bound of what the pool can do (the rate it answered at while busy is low after a model load or with one
    client at a time; its pages' own rate is low when rows run batched). A second when no rate is known."""
    known = [r for r in rates if r is not None and r > 0]
    if not known:
        return 1.0
    return min(ceiling_s, max(floor_s, queued_rows / max(known)))
