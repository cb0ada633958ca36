"""Is a series of durations getting slower, faster, or neither: a trend test that noise and one burst of
stalls do not fool (pure; used by the performance history and the sharding analyzer).

Trend test (``linear_trend``): least-squares slope of duration (ms) against finish time (s). The trend is
"degrading" (slope > 0) or "improving" (slope < 0) only when BOTH hold:
  1. significance: |t| = |slope / SE(slope)| >= the two-sided 99% Student-t critical value at n-2
     degrees of freedom (so random noise reads "stable" about 99% of the time even before guard 2);
  2. relevance: the fitted change over the analysed span, relative to the mean duration,
     |slope * span / mean| >= ``min_relative_change`` (default 0.10). With many samples any tiny drift
     is significant; this guard keeps a 2 % drift over an hour from being called a degradation.
  3. agreement of a rank test (up to ``RANK_TEST_MAX_N`` samples): the Mann-Kendall statistic of the
     durations in time order is significant at the same 99 % level, in the same direction. A least-
     squares line over a few samples can be tilted by one burst of stalls at either end (a shared
     machine's background load); ranks count each such stall once, however long it was.
Otherwise "stable". ``trend_magnitude`` is that relative change |slope * span / mean| (0.25 = the fitted
line rises or falls by 25 % of the mean over the analysed span), reported even when "stable".
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# Two-sided 99 % critical values of Student's t for df = 1..30 (standard tables).
_T99 = (63.657, 9.925, 5.841, 4.604, 4.032, 3.707, 3.499, 3.355, 3.250, 3.169, 3.106, 3.055, 3.012, 2.977,
        2.947, 2.921, 2.898, 2.878, 2.861, 2.845, 2.831, 2.819, 2.807, 2.797, 2.787, 2.779, 2.771, 2.763,
        2.756, 2.750)
_Z995 = 2.5758293035489


def t_critical_99(df: int) -> float:
    """Two-sided 99 % critical value of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T99):
        return _T99[df - 1]
    # Cornish-Fisher expansion of the t quantile around the normal one; < 1e-3 off beyond df 30.
    z = _Z995
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df * df)


@dataclasses.dataclass(frozen=True, slots=True)
class Trend:
    direction: str            # improving | degrading | stable
    slope_ms_per_s: float
    relative_change: float    # slope * span / mean duration (signed)
    t_stat: float


# Beyond this many samples the rank test is skipped: it is O(n^2), and with that many samples a burst of
# stalls no longer tilts the least-squares line beyond its significance bound.
RANK_TEST_MAX_N = 500


def mann_kendall_z(durations: np.ndarray) -> float:
    """Mann-Kendall trend statistic of ``durations`` (in time order), as a standard normal deviate:
    S = sum over pairs i < j of sign(d_j - d_i), continuity-corrected, over its null standard deviation."""
    n = len(durations)
    if n < 3:
        return 0.0
    d = np.asarray(durations, dtype=float)
    s = float(np.sign(np.triu(d[None, :] - d[:, None], 1)).sum())
    sd = math.sqrt(n * (n - 1) * (2 * n + 5) / 18)
    return (s - math.copysign(1.0, s)) / sd if s else 0.0


def linear_trend(ts: np.ndarray, durations: np.ndarray, min_relative_change: float = 0.10) -> Trend:
    """Least-squares trend of ``durations`` against ``ts`` with the two guards described in the module doc."""
    n = len(durations)
    if n < 3:
        return Trend("stable", 0.0, 0.0, 0.0)
    x = ts - ts.mean()        # centring keeps unix-second magnitudes out of the sums
    mean = float(durations.mean())
    y = durations - mean
    sxx = float(x @ x)
    if sxx == 0.0:
        return Trend("stable", 0.0, 0.0, 0.0)
    sxy = float(x @ y)
    slope = sxy / sxx
    # Residual sum of squares without forming the residuals: Syy - slope * Sxy (x and y are centred).
    s2 = max(float(y @ y) - slope * sxy, 0.0) / (n - 2)
    se = math.sqrt(s2 / sxx)
    if se > 0.0:
        t_stat = slope / se
    else:                     # a perfect line: significant whenever it is not flat
        t_stat = math.copysign(math.inf, slope) if slope else 0.0
    span = float(ts.max() - ts.min())
    rel = slope * span / mean if mean > 0 else 0.0
    significant = abs(t_stat) >= t_critical_99(n - 2) and abs(rel) >= min_relative_change
    if significant and n <= RANK_TEST_MAX_N:
        z = mann_kendall_z(durations[np.argsort(ts, kind="stable")])
        significant = abs(z) >= _Z995 and (z > 0) == (slope > 0)
    direction = ("degrading" if slope > 0 else "improving") if significant else "stable"
    return Trend(direction, slope, rel, t_stat)
