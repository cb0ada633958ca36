"""When a standby's warm-up may stop.

V8 runs a page's WebAssembly first as baseline code and optimises a function once it has done enough
work there (dynamic tiering). A freshly loaded model's first run is ~20x slower than its steady state and
the next few runs ~2x (docs/facts.md), so a standby that has only loaded a model would answer its first
requests at that speed. Warm-up runs representative inputs (``registry.warmup_feeds``) in rounds until
this says enough. A stable round time alone is not enough: small runs settle at baseline speed long before
tier-up, so a minimum of page time spent comes first.
"""

from __future__ import annotations

from collections.abc import Sequence

from actors.constants import WARMUP_MAX_ROUNDS, WARMUP_MIN_WORK_MS, WARMUP_SETTLE_RATIO


def warmed_up(round_ms: Sequence[float], min_work_ms: float = WARMUP_MIN_WORK_MS,
              settle_ratio: float = WARMUP_SETTLE_RATIO, max_rounds: int = WARMUP_MAX_ROUNDS) -> bool:
    """Whether rounds taking ``round_ms`` (page time each, in order) have warmed the model up: at least
    ``min_work_ms`` spent and the last two rounds within ``settle_ratio`` of the fastest, or ``max_rounds``
    run (a model too small to spend the work in that many rounds is cheap to run cold anyway)."""
    if len(round_ms) >= max_rounds:
        return True
    if len(round_ms) < 3 or sum(round_ms) < min_work_ms:
        return False
    best = min(round_ms)
    return all(ms <= best * settle_ratio for ms in round_ms[-2:])
