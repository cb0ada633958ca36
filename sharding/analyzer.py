"""ModelShardingAnalyzer: decode-speed trends and a shard-count recommendation from measured runs (pure).

The input is a list of ``ShardRunRecord``, one per sharded generation. Timings are per decoded token:
``shard_compute_ms[i]`` is the time shard ``i`` spent computing (in the page), ``hop_ms[j]`` the time
spent moving the hidden state across the boundary between shards ``j`` and ``j + 1`` (Ray call,
evaluate, base64), ``decode_ms_per_token`` the whole decode step as the coordinator saw it.

Shard-count model (``recommend_shard_count``), per decoded token:
    decode(n) = C + (n - 1) * h + o
  C  total compute: the median over successful runs of sum(shard_compute_ms) (the same layers are
     computed whatever the split);
  h  per-hop latency: the median of every measured hop;
  o  coordinator overhead: the median of decode_ms_per_token - sum(compute) - sum(hops) (sampling,
     the call to the first shard and back from the last, the TokensAppended event).
Memory of the largest shard for n shards: where n was run, the median of each run's largest shard, from
the runs whose memory was read (``memory_measured``; "memory_source": "measured") or, with none, from the
planner's estimates they carry ("planner"); otherwise ("model") b + W / n, an even split of W (model
memory) over n browsers that each pay b (the page). b and W are fitted by least squares on
sum(memory_bytes_per_shard) = n * b + W over runs with two or more distinct shard counts; with one count
(or a fit giving b or W below zero), b is the planner's idle-page bytes and W the median of
sum(memory) - n * b.
Recommendation: the fewest shards whose largest shard fits ``memory_limit_bytes``, unless a larger
shard count that fits was MEASURED at least ``min_advantage`` faster per token than that one.

Trends (``analyze_performance_trends``): per shard count, ``events.trends.linear_trend`` of decode ms
per token against time (the same significance and relevance guards as the performance history).

``from_events`` builds the history from the event log. A generation is an OperationCompleted whose
``metrics`` has "decode_ms_per_token"; these keys are expected in it:
  "shards"                 int, number of shards
  "prefill_ms"             float
  "decode_ms_per_token"    float (null: the run decoded no token after the first; it is skipped)
  "shard_compute_ms"       list of floats, one per shard, per decoded token
  "hop_ms"                 list of floats, one per boundary (shards - 1), per decoded token
  "tokens"                 int, tokens generated
  "memory_bytes_per_shard" list of ints (optional: else the session's plan below), as read
  "session_id"             str (optional): links to the SessionOpened whose ``plan["shards"][i]``
                           carries "memory_bytes" (as ``ShardPlan.as_dict()`` writes it: the
                           planner's estimate, so the run's ``memory_measured`` is False), or else
                           "browser_id" and "artifact" (as the pool writes it): the memory is then
                           the one measured for that browser by its health report
                           (BrowserHealthReported) that lists the artifact loaded, the last one
                           before the generation ended, else the first after. That figure is the
                           whole browser (page, runtime and every model it holds), measured, not
                           modelled: an upper bound on the shard's own.
The model comes from the operation's OperationStarted. A failed generation (OperationFailed of an
operation started with kind "generate") is counted when a SessionOpened plan names it in "op_id", which
gives its shard count; otherwise a failure cannot be tied to a shard count and is left out.
Generations with missing or malformed keys are skipped, counted in ``skipped`` and logged.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from events.schema import (
    BrowserHealthReported,
    OperationCompleted,
    OperationFailed,
    OperationStarted,
    Recorded,
    SessionOpened,
)
from events.trends import linear_trend
from sharding.plan import DEFAULT_MEMORY_MODEL

log = logging.getLogger(__name__)

METRIC_KEYS = ("shards", "prefill_ms", "decode_ms_per_token", "shard_compute_ms", "hop_ms", "tokens")


class AnalyzerError(ValueError):
    """Malformed history or query (bad record, unknown or ambiguous model, bad limit)."""


def _finite(name: str, v: Any, allow_none: bool = False) -> float | None:
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
        raise AnalyzerError(f"{name} must be a finite number >= 0, got {v!r}")
    return float(v)


def _count(name: str, v: Any, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise AnalyzerError(f"{name} must be an int >= {minimum}, got {v!r}")
    return v


@dataclasses.dataclass(frozen=True)
class ShardRunRecord:
    """One sharded generation. A failed run may leave its timings None and its tuples empty."""

    ts: float                                  # unix s, when it finished
    model: str
    num_shards: int
    shard_compute_ms: tuple[float, ...]        # per shard, per decoded token
    hop_ms: tuple[float, ...]                  # per boundary (num_shards - 1), per decoded token
    prefill_ms: float | None
    decode_ms_per_token: float | None
    tokens: int
    memory_bytes_per_shard: tuple[int, ...]
    success: bool
    memory_measured: bool = True               # False: memory_bytes_per_shard is the planner's estimate

    def __post_init__(self) -> None:
        if type(self.model) is not str or not self.model:
            raise AnalyzerError(f"ShardRunRecord.model must be a non-empty str, got {self.model!r}")
        for name in ("success", "memory_measured"):
            if type(getattr(self, name)) is not bool:
                raise AnalyzerError(f"ShardRunRecord.{name} must be a bool, got {getattr(self, name)!r}")
        _finite("ShardRunRecord.ts", self.ts)
        n = _count("ShardRunRecord.num_shards", self.num_shards, 1)
        _count("ShardRunRecord.tokens", self.tokens, 0)
        ok = self.success
        for name in ("prefill_ms", "decode_ms_per_token"):
            _finite(f"ShardRunRecord.{name}", getattr(self, name), allow_none=not ok)
        for name, want in (("shard_compute_ms", n), ("hop_ms", n - 1), ("memory_bytes_per_shard", n)):
            v = getattr(self, name)
            if not isinstance(v, (tuple, list)):
                raise AnalyzerError(f"ShardRunRecord.{name} must be a tuple, got {type(v).__name__}")
            if len(v) != want and (ok or v):
                raise AnalyzerError(f"ShardRunRecord.{name} has {len(v)} values for {n} shards, want {want}")
            for x in v:
                if name == "memory_bytes_per_shard":
                    _count(f"ShardRunRecord.{name} item", x, 0)
                else:
                    _finite(f"ShardRunRecord.{name} item", x)
            object.__setattr__(self, name, tuple(v))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShardRunRecord:
        fields = dataclasses.fields(cls)
        names = {f.name for f in fields}
        required = {f.name for f in fields if f.default is dataclasses.MISSING}   # older records lack the rest
        if not isinstance(d, Mapping) or not required <= set(d) <= names:
            got = sorted(d) if isinstance(d, Mapping) else type(d).__name__
            raise AnalyzerError(f"a run record needs the keys {sorted(required)} (and may have "
                                f"{sorted(names - required)}), got {got}")
        return cls(**d)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _reported_memory(reports: list[tuple[int, float, frozenset[str]]], artifact: str, seq: int) -> int | None:
    """Bytes of the browser's health report that lists ``artifact`` loaded: the last at or before ``seq``,
    else the first after it (a browser in a session is not probed until the session ends); None if none."""
    holding = [(s, mb) for s, mb, loaded in reports if artifact in loaded]
    before = [mb for s, mb in holding if s <= seq]
    after = [mb for s, mb in holding if s > seq]
    mb = before[-1] if before else (after[0] if after else None)
    return None if mb is None else int(mb * (1 << 20))


def _median(values: Iterable[float]) -> float | None:
    v = list(values)
    return float(np.median(v)) if v else None


class ModelShardingAnalyzer:
    """Trends and shard-count advice over a list of ShardRunRecord (or their dicts); see the module doc."""

    def __init__(self, history: Iterable[ShardRunRecord | Mapping[str, Any]], min_relative_change: float = 0.10,
                 logger: logging.Logger | None = None) -> None:
        if isinstance(history, (str, bytes, Mapping)) or not isinstance(history, Iterable):
            raise AnalyzerError(f"history must be a list of ShardRunRecord, got {type(history).__name__}")
        self.history: list[ShardRunRecord] = sorted(
            (r if isinstance(r, ShardRunRecord) else ShardRunRecord.from_dict(r) for r in history),
            key=lambda r: r.ts)
        self.min_relative_change = _finite("min_relative_change", min_relative_change)
        self.log = logger or log
        self.skipped: dict[str, int] = {}

    # ----- building from the event log ------------------------------------------------------------
    @classmethod
    def from_events(cls, records: Iterable[Recorded], min_relative_change: float = 0.10,
                    logger: logging.Logger | None = None) -> ModelShardingAnalyzer:
        """History from recorded events (module doc lists the expected metric keys)."""
        lg = logger or log
        started: dict[str, OperationStarted] = {}
        sessions: dict[str, SessionOpened] = {}
        op_session: dict[str, SessionOpened] = {}
        runs: list[ShardRunRecord] = []
        skipped: dict[str, int] = {}
        reports: dict[str, list[tuple[int, float, frozenset[str]]]] = {}   # browser -> (seq, MiB, loaded)
        waiting: list[tuple[Recorded, OperationStarted, dict[str, Any], list[dict[str, Any]]]] = []

        def skip(why: str, op_id: str) -> None:
            skipped[why] = skipped.get(why, 0) + 1
            lg.warning("sharding analyzer: skipped generation %s (%s)", op_id, why)

        def add_run(rec: Recorded, start: OperationStarted, m: dict[str, Any], memory: list[int],
                    measured: bool) -> None:
            try:
                runs.append(ShardRunRecord(
                    ts=rec.ts, model=start.model, num_shards=m["shards"],
                    shard_compute_ms=tuple(m["shard_compute_ms"]), hop_ms=tuple(m["hop_ms"]),
                    prefill_ms=m["prefill_ms"], decode_ms_per_token=m["decode_ms_per_token"],
                    tokens=m["tokens"], memory_bytes_per_shard=tuple(memory), success=True,
                    memory_measured=measured))
            except (AnalyzerError, TypeError) as exc:
                skip(f"malformed metrics: {exc}", rec.event.op_id)

        for rec in records:
            if not isinstance(rec, Recorded):
                raise AnalyzerError(f"expected Recorded events, got {type(rec).__name__}")
            e = rec.event
            if isinstance(e, BrowserHealthReported):
                reports.setdefault(e.browser_id, []).append((rec.seq, e.memory_mb, frozenset(e.loaded)))
            elif isinstance(e, OperationStarted):
                started[e.op_id] = e
            elif isinstance(e, SessionOpened):
                sessions[e.session_id] = e
                if isinstance(e.plan.get("op_id"), str):
                    op_session[e.plan["op_id"]] = e
            elif isinstance(e, OperationCompleted) and "decode_ms_per_token" in e.metrics:
                m = e.metrics
                start = started.get(e.op_id)
                if start is None:
                    skip("no OperationStarted", e.op_id)
                    continue
                if m["decode_ms_per_token"] is None:
                    skip("no decode step", e.op_id)
                    continue
                missing = [k for k in METRIC_KEYS if k not in m]
                if missing:
                    skip(f"metrics lack {', '.join(missing)}", e.op_id)
                    continue
                memory = m.get("memory_bytes_per_shard")
                measured = True                   # the generation's own figures, or its browsers' reports
                session = sessions.get(m.get("session_id"))
                shards = session.plan.get("shards") if session is not None else None
                if memory is None and isinstance(shards, list):
                    try:
                        memory, measured = [sh["memory_bytes"] for sh in shards], False     # the planner's
                    except (KeyError, TypeError):
                        if all(isinstance(sh, dict) and {"browser_id", "artifact"} <= sh.keys() for sh in shards):
                            waiting.append((rec, start, m, shards))      # from the health reports, at the end
                            continue
                if memory is None:
                    skip("no memory figures (metrics, session plan or health reports)", e.op_id)
                    continue
                add_run(rec, start, m, memory, measured)
            elif isinstance(e, OperationFailed):
                start = started.get(e.op_id)
                session = op_session.get(e.op_id)
                if start is None or start.kind != "generate" or session is None:
                    continue
                shards = session.plan.get("shards")
                if not isinstance(shards, list) or not shards:
                    skip("failed generation's plan has no shards", e.op_id)
                    continue
                runs.append(ShardRunRecord(ts=rec.ts, model=start.model, num_shards=len(shards),
                                           shard_compute_ms=(), hop_ms=(), prefill_ms=None,
                                           decode_ms_per_token=None, tokens=0, memory_bytes_per_shard=(),
                                           success=False))
        for rec, start, m, shards in waiting:
            memory = [_reported_memory(reports.get(sh["browser_id"], []), sh["artifact"], rec.seq) for sh in shards]
            if None in memory:
                skip("no health report of a shard's browser with its shard loaded", rec.event.op_id)
                continue
            add_run(rec, start, m, memory, True)
        analyzer = cls(runs, min_relative_change, logger)
        analyzer.skipped = skipped
        return analyzer

    # ----- selection --------------------------------------------------------------------------
    def models(self) -> list[str]:
        return sorted({r.model for r in self.history})

    def _runs(self, model: str | None) -> tuple[str | None, list[ShardRunRecord]]:
        names = self.models()
        if model is None:
            if len(names) > 1:
                raise AnalyzerError(f"history holds several models {names}: pass model=")
            return (names[0] if names else None), self.history
        if type(model) is not str or model not in names:
            raise AnalyzerError(f"model {model!r} is not in the history (models: {names})")
        return model, [r for r in self.history if r.model == model]

    # ----- trends -----------------------------------------------------------------------------
    def analyze_performance_trends(self, model: str | None = None) -> dict[str, Any]:
        """Per shard count: runs, success rate, decode ms/token statistics and their trend over time."""
        name, runs = self._runs(model)
        by_shards: dict[int, dict[str, Any]] = {}
        for n in sorted({r.num_shards for r in runs}):
            rows = [r for r in runs if r.num_shards == n]
            ok = [r for r in rows if r.success]
            entry: dict[str, Any] = {"runs": len(rows), "successful": len(ok), "success_rate": len(ok) / len(rows)}
            if ok:
                decode = np.array([r.decode_ms_per_token for r in ok])
                trend = linear_trend(np.array([r.ts for r in ok]), decode, self.min_relative_change)
                entry |= {
                    "avg_decode_ms_per_token": float(decode.mean()),
                    "median_decode_ms_per_token": float(np.median(decode)),
                    "min_decode_ms_per_token": float(decode.min()),
                    "max_decode_ms_per_token": float(decode.max()),
                    "avg_prefill_ms": float(np.mean([r.prefill_ms for r in ok])),
                    "avg_compute_ms_per_token": float(np.mean([sum(r.shard_compute_ms) for r in ok])),
                    "avg_hop_ms": _median(h for r in ok for h in r.hop_ms),
                    "trend_direction": trend.direction,
                    "trend_magnitude": abs(trend.relative_change),
                    "slope_ms_per_token_per_s": trend.slope_ms_per_s,
                    "t_stat": trend.t_stat,
                }
            by_shards[n] = entry
        return {"model": name, "runs": len(runs), "successful": sum(r.success for r in runs),
                "by_shards": by_shards}

    # ----- shard count ------------------------------------------------------------------------
    def recommend_shard_count(self, memory_limit_bytes: int | None = None, max_shards: int | None = None,
                              model: str | None = None, min_advantage: float = 0.05) -> dict[str, Any]:
        """{"recommended_shards", "reason", "estimates": {n: {"decode_ms_per_token", "fits_memory", ...}}}."""
        if memory_limit_bytes is not None:
            _count("memory_limit_bytes", memory_limit_bytes, 1)
        if max_shards is not None:
            _count("max_shards", max_shards, 1)
        adv = _finite("min_advantage", min_advantage)
        if adv >= 1:
            raise AnalyzerError(f"min_advantage must be below 1, got {min_advantage!r}")
        _, runs = self._runs(model)
        ok = [r for r in runs if r.success]
        if not ok:
            return {"recommended_shards": None, "reason": "no successful sharded runs recorded", "estimates": {}}
        measured = {n: [r for r in ok if r.num_shards == n] for n in sorted({r.num_shards for r in ok})}
        top = max_shards if max_shards is not None else max(measured)
        compute = _median(sum(r.shard_compute_ms) for r in ok)
        hop = _median(h for r in ok for h in r.hop_ms)
        overhead = _median(r.decode_ms_per_token - sum(r.shard_compute_ms) - sum(r.hop_ms) for r in ok)
        base, weights = self._memory_fit(ok)

        estimates: dict[int, dict[str, Any]] = {}
        for n in range(1, top + 1):
            model_ms = None if (n > 1 and hop is None) else compute + (n - 1) * (hop or 0.0) + overhead
            if n in measured:
                decode = _median(r.decode_ms_per_token for r in measured[n])
                read = [r for r in measured[n] if r.memory_measured]
                mem = int(_median(max(r.memory_bytes_per_shard) for r in read or measured[n]))
                source, memory_source = "measured", "measured" if read else "planner"
            else:
                decode, mem, source, memory_source = model_ms, math.ceil(base + weights / n), "model", "model"
            estimates[n] = {"decode_ms_per_token": decode, "fits_memory": memory_limit_bytes is None
                            or mem <= memory_limit_bytes, "max_shard_memory_bytes": mem,
                            "model_decode_ms_per_token": model_ms, "source": source,
                            "memory_source": memory_source, "runs": len(measured.get(n, []))}

        fitting = [n for n, e in estimates.items() if e["fits_memory"]]
        if not fitting:
            smallest = min(estimates.values(), key=lambda e: e["max_shard_memory_bytes"])["max_shard_memory_bytes"]
            return {"recommended_shards": None, "estimates": estimates,
                    "reason": f"no shard count up to {top} fits {memory_limit_bytes} bytes per browser "
                              f"(smallest largest shard: {smallest} bytes); raise max_shards or the memory limit"}
        fewest = fitting[0]
        base_ms = estimates[fewest]["decode_ms_per_token"]
        limit = "no memory limit" if memory_limit_bytes is None else f"{memory_limit_bytes} bytes per browser"
        faster = [n for n in fitting if n > fewest and n in measured and base_ms is not None
                  and estimates[n]["decode_ms_per_token"] < (1 - adv) * base_ms]
        if faster:
            best = min(faster, key=lambda n: (estimates[n]["decode_ms_per_token"], n))
            ms = estimates[best]["decode_ms_per_token"]
            reason = (f"{best} shards were measured at {ms:.1f} ms/token, faster than the "
                      f"{base_ms:.1f} ms/token of {fewest} shard(s), the fewest that fit ({limit})")
        else:
            best = fewest
            speed = "unknown" if base_ms is None else f"{base_ms:.1f} ms/token ({estimates[fewest]['source']})"
            reason = (f"{fewest} shard(s) is the fewest that fits ({limit}) at {speed}; no larger count was "
                      f"measured more than {adv:.0%} faster (each extra shard adds a hop of "
                      f"{'unknown' if hop is None else f'{hop:.1f}'} ms/token)")
        return {"recommended_shards": best, "reason": reason, "estimates": estimates,
                "model": {"compute_ms_per_token": compute, "hop_ms": hop, "overhead_ms": overhead,
                          "page_bytes": base, "model_memory_bytes": weights}}

    @staticmethod
    def _memory_fit(ok: list[ShardRunRecord]) -> tuple[float, float]:
        """(b, W) of sum(memory) = n * b + W; b from the planner's page when one shard count was measured."""
        n = np.array([r.num_shards for r in ok], dtype=float)
        total = np.array([sum(r.memory_bytes_per_shard) for r in ok], dtype=float)
        if len(set(n.tolist())) >= 2:
            b, w = np.polyfit(n, total, 1)
            if b >= 0 and w >= 0:
                return float(b), float(w)
        b = float(DEFAULT_MEMORY_MODEL.page_bytes)
        return b, max(float(np.median(total - n * b)), 0.0)


__all__ = ["METRIC_KEYS", "AnalyzerError", "ModelShardingAnalyzer", "ShardRunRecord"]
