"""Pure decisions from the pool's performance history (the ``perf`` windows of ``events.state``):
the expected cost of a browser for a model, which browsers have degraded, which idle browsers an
adaptively scaled pool retires. No Ray, no I/O: the pool records what these decide as events.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from actors.constants import DEGRADED_FACTOR, MIN_SAMPLES
from events.state import PerfWindow, PoolState, browsers_alive


def recent_median(window: PerfWindow) -> float:
    """Upper median service time of the latest ``MIN_SAMPLES`` operations: what the browser is like now
    (a whole-window median would hide a slowdown until half the window is slow).

    The upper median, because placement stops sending a browser traffic once its cost is a few times
    its peers': from then on its window does not change. When half the window has gone slow, the
    upper median is the slow value (the browser is judged by what it has become) where the plain one
    is the mean of a fast and a slow sample, which could leave it starved yet never judged degraded.
    """
    return statistics.median_high(window.recent_ms[-MIN_SAMPLES:])


def expected_cost(window: PerfWindow | None) -> float | None:
    """Expected ms per request: recent median service time over success rate; None when unknown."""
    if window is None or len(window.recent_ms) < MIN_SAMPLES:
        return None
    ok = sum(window.recent_ok) / len(window.recent_ok)
    return recent_median(window) / max(ok, 0.05)


@dataclass(frozen=True)
class Degraded:
    browser_id: str
    median_ms: float
    peers_median_ms: float

    @property
    def reason(self) -> str:
        return (f"{self.median_ms / self.peers_median_ms:.1f}x slower than its peers for this model "
                f"(median {self.median_ms:.0f} ms vs {self.peers_median_ms:.0f} ms)")


def degraded_browsers(state: PoolState, model: str) -> list[Degraded]:
    """Serving browsers whose recent median service time for ``model`` is ``DEGRADED_FACTOR`` times the
    median of the other serving browsers' (each judged on its latest ``MIN_SAMPLES`` operations).

    Needs a peer: one browser alone is compared with nothing (it may just be a slow machine).
    """
    medians = {
        b.browser_id: recent_median(w)
        for b in browsers_alive(state)
        if not b.standby and not b.draining
        and (w := state.perf.get((b.browser_id, model))) is not None and len(w.recent_ms) >= MIN_SAMPLES
    }
    out = []
    for browser_id, median in sorted(medians.items()):
        peers = [m for b, m in medians.items() if b != browser_id]
        if peers:
            peer = statistics.median(peers)
            if median >= DEGRADED_FACTOR * peer:
                out.append(Degraded(browser_id, median, peer))
    return out


def idle_to_retire(state: PoolState, in_flight: dict[str, int], now: float, idle_s: float,
                   min_serving: int = 1) -> list[str]:
    """Serving browsers idle for ``idle_s`` seconds (no operation started or ended, nothing in flight),
    longest idle first, keeping at least ``min_serving`` serving browsers."""
    serving = [b for b in browsers_alive(state) if not b.standby and not b.draining]
    idle = sorted((b for b in serving if not in_flight.get(b.browser_id) and now - b.last_active_ts >= idle_s),
                  key=lambda b: (b.last_active_ts, b.browser_id))
    spare = max(0, len(serving) - min_serving)
    return [b.browser_id for b in idle[:spare]]
