"""The pool's state: what the event log says about browsers, models, operations, recoveries and sessions,
as frozen values, with the queries the pool asks of it and its snapshot form (JSON).

How each event changes it is in events/fold.py (``apply``, ``replay``); the state itself never changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import orjson

from events.errors import FailureCategory, SnapshotError

# Bump when what a projection keeps changes: snapshots of another version are ignored (full replay).
# 2: perf windows, draining, last_active_ts; 3: sessions count resumes; 4: promoted shards;
# 5: a browser's chosen backend and its recovery deferred to a session's end; 6: the pool's configuration
STATE_VERSION = 6

_frozen = dataclasses.dataclass(frozen=True, slots=True)

ALIVE_STATUSES = frozenset({"launched", "connected", "disconnected"})   # may serve (or be revived to)
CLOSED_STATUSES = frozenset({"retired", "quarantined"})                 # will never serve again


@_frozen
class BrowserState:
    browser_id: str
    browser_type: str
    backend_caps: tuple[str, ...]
    pid: int | None
    node_id: str
    standby: bool
    status: str  # launched | connected | disconnected | failed | retired | quarantined
    launched_seq: int
    status_reason: str | None = None
    failures: int = 0           # consecutive: reset when the browser completes an operation
    blocked_requests: int = 0   # outside requests its page attempted (this browser process)
    draining: bool = False      # takes no new requests; retired once idle
    last_active_ts: float = 0.0  # when an operation last started or ended on it (0: never)
    last_failure: FailureCategory | None = None
    last_error: str | None = None
    backend: str = ""           # the backend models run on there ("" when the log predates it)
    wasm_threads: int = 0       # WebAssembly threads its page computes with (0 when the log predates it)
    recover_after: str | None = None   # failed, and recovered once this session closes (BrowserRecoveryDeferred)
    replaced_by: str | None = None     # failed, and its work taken over by this browser (a recovery completed)


ModelKey = tuple[str, str, "str | None"]  # (browser_id, model, shard)


@_frozen
class ModelState:
    browser_id: str
    model: str
    shard: str | None
    sha256: str
    backend: str
    load_ms: float
    loaded_seq: int
    warmed_up: bool = False     # has run its warm-up (ModelWarmedUp): a first request runs at full speed


@_frozen
class OperationState:
    op_id: str
    model: str
    browser_id: str
    kind: str
    input_digest: str
    started_seq: int
    started_ts: float


PERF_WINDOW = 20     # operations per (browser, model) that placement and degradation look at


@_frozen
class PerfWindow:
    """The latest operations of one model on one browser process: what placement and draining judge by."""

    browser_id: str
    model: str
    recent_ms: tuple[float, ...] = ()         # service times of the latest completed operations (see _measure)
    recent_ok: tuple[bool, ...] = ()          # outcomes of the latest operations, completed or failed


@_frozen
class ResourceState:
    """What a browser last reported about itself (health)."""

    browser_id: str
    memory_mb: float
    reported_models: tuple[str, ...]
    reported_seq: int
    reported_ts: float


@_frozen
class RecoveryStep:
    step: str
    success: bool
    duration_ms: float
    error: str | None


@_frozen
class RecoveryState:
    recovery_id: str
    browser_id: str
    strategy: str
    attempt: int
    category: FailureCategory
    started_seq: int
    started_ts: float
    steps: tuple[RecoveryStep, ...] = ()


@_frozen
class SessionState:
    session_id: str
    model: str
    plan: dict
    tokens: tuple[int, ...]
    opened_seq: int
    resumes: int = 0        # coordinators that took the session over after the one running it died
    promoted: tuple[int, ...] = ()   # shards whose shadow took over from the primary, in order


MAPS = ("browsers", "models", "operations", "resources", "recoveries", "sessions", "perf", "metrics",
         "config")
# Operations that measure a browser serving requests (a "replay" is recovery work: not judged).
MEASURED_KINDS = frozenset({"infer", "generate"})


@_frozen
class PoolState:
    """Everything the pool knows, as of ``last_seq``. Maps are never mutated once in a PoolState."""

    last_seq: int = 0
    last_ts: float = 0.0
    browsers: Mapping[str, BrowserState] = dataclasses.field(default_factory=dict)
    models: Mapping[ModelKey, ModelState] = dataclasses.field(default_factory=dict)
    operations: Mapping[str, OperationState] = dataclasses.field(default_factory=dict)
    resources: Mapping[str, ResourceState] = dataclasses.field(default_factory=dict)
    recoveries: Mapping[str, RecoveryState] = dataclasses.field(default_factory=dict)
    sessions: Mapping[str, SessionState] = dataclasses.field(default_factory=dict)
    perf: Mapping[tuple[str, str], PerfWindow] = dataclasses.field(default_factory=dict)
    metrics: Mapping[str, int | float] = dataclasses.field(default_factory=dict)
    # The last PoolConfigured: {"level", "recovery_strategy", "options"}; empty before the first one.
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)


# --- queries the pool uses ---


def browsers_alive(state: PoolState) -> list[BrowserState]:
    """Browsers neither failed nor retired (launched, connected, or disconnected but reconnectable), by id."""
    return sorted((b for b in state.browsers.values() if b.status in ALIVE_STATUSES), key=lambda b: b.browser_id)


def models_on(state: PoolState, browser_id: str) -> list[ModelState]:
    """Models the log says ``browser_id`` holds (also after it failed, until it is retired or relaunched)."""
    found = [m for k, m in state.models.items() if k[0] == browser_id]
    return sorted(found, key=lambda m: (m.model, m.shard or ""))


class SessionTokens:
    """Open generation sessions' plans and logged token counts, folded from log entries in ``recent_events``'
    shape: what a client following a pool with ``events_since`` (from ``last_seq``) needs to act on a session
    mid-way, without fetching the pool's whole state each time."""

    def __init__(self, last_seq: int = 0) -> None:
        self.last_seq = last_seq                          # follow on from here (events_since(last_seq))
        self.plans: dict[str, dict[str, Any]] = {}      # open sessions, in the order they opened
        self.tokens: dict[str, int] = {}

    def add(self, entries: list[dict[str, Any]]) -> None:
        for e in entries:
            self.last_seq = max(self.last_seq, e["seq"])
            data = e["data"]
            if e["action"] == "SessionOpened":
                self.plans[data["session_id"]] = data["plan"]
                self.tokens[data["session_id"]] = 0
            elif e["action"] == "TokensAppended" and data["session_id"] in self.tokens:
                self.tokens[data["session_id"]] += len(data["token_ids"])
            elif e["action"] == "SessionClosed":
                self.plans.pop(data["session_id"], None)
                self.tokens.pop(data["session_id"], None)

    def reached(self, n: int) -> str | None:
        """The first-opened open session that has logged at least ``n`` tokens."""
        return next((s for s in self.plans if self.tokens[s] >= n), None)


def open_operations(state: PoolState) -> list[OperationState]:
    """Operations started and neither completed nor failed, oldest first."""
    return sorted(state.operations.values(), key=lambda o: o.started_seq)


def recovery_statistics(state: PoolState) -> dict[str, int | float]:
    """The seed's ``get_recovery_statistics()`` keys. success_rate = successes / attempts (0.0 if none)."""
    m = state.metrics
    attempts = int(m.get("recovery_attempts", 0))
    successes = int(m.get("recovery_successes", 0))
    return {
        "recovery_attempts": attempts,
        "recovery_successes": successes,
        "recovery_failures": int(m.get("recovery_failures", 0)),
        "success_rate": successes / attempts if attempts else 0.0,
        "hedges_sent": int(m.get("hedges_sent", 0)),       # level high: slow requests also sent elsewhere
        "hedges_won": int(m.get("hedges_won", 0)),         # ...and answered there first
        "active_browsers": sum(1 for b in state.browsers.values() if b.status in ALIVE_STATUSES),
        "total_browsers": len(state.browsers),
    }


# --- snapshot serialisation (orjson) ---


def state_to_json(state: PoolState) -> bytes:
    """The state as JSON bytes; maps become lists of their values (keys are fields of the values)."""
    doc = {
        "state_version": STATE_VERSION,
        "last_seq": state.last_seq,
        "last_ts": state.last_ts,
        "metrics": dict(state.metrics),
        "config": dict(state.config),
        **{n: list(getattr(state, n).values()) for n in MAPS if n not in ("metrics", "config")},
    }
    return orjson.dumps(doc)


def _opt_category(v: str | None) -> FailureCategory | None:
    return None if v is None else FailureCategory(v)


def state_from_json(data: bytes) -> PoolState:
    """Inverse of ``state_to_json``. Raises SnapshotError for another state version or a bad document."""
    try:
        doc = orjson.loads(data)
        if doc.get("state_version") != STATE_VERSION:
            raise SnapshotError(f"snapshot state version {doc.get('state_version')!r}, expected {STATE_VERSION}")
        browsers = {}
        for b in doc["browsers"]:
            b["backend_caps"] = tuple(b["backend_caps"])
            b["last_failure"] = _opt_category(b["last_failure"])
            browsers[b["browser_id"]] = BrowserState(**b)
        models = {}
        for m in doc["models"]:
            models[(m["browser_id"], m["model"], m["shard"])] = ModelState(**m)
        operations = {o["op_id"]: OperationState(**o) for o in doc["operations"]}
        resources = {}
        for r in doc["resources"]:
            r["reported_models"] = tuple(r["reported_models"])
            resources[r["browser_id"]] = ResourceState(**r)
        recoveries = {}
        for r in doc["recoveries"]:
            r["category"] = FailureCategory(r["category"])
            r["steps"] = tuple(RecoveryStep(**s) for s in r["steps"])
            recoveries[r["recovery_id"]] = RecoveryState(**r)
        sessions = {}
        for s in doc["sessions"]:
            s["tokens"], s["promoted"] = tuple(s["tokens"]), tuple(s["promoted"])
            sessions[s["session_id"]] = SessionState(**s)
        perf = {}
        for w in doc["perf"]:
            w["recent_ms"], w["recent_ok"] = tuple(w["recent_ms"]), tuple(w["recent_ok"])
            perf[(w["browser_id"], w["model"])] = PerfWindow(**w)
        return PoolState(
            last_seq=doc["last_seq"], last_ts=doc["last_ts"], browsers=browsers, models=models,
            operations=operations, resources=resources, recoveries=recoveries, sessions=sessions, perf=perf,
            metrics=doc["metrics"], config=doc["config"],
        )
    except SnapshotError:
        raise
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SnapshotError(f"snapshot document is malformed: {exc!r}") from None


__all__ = [
    "ALIVE_STATUSES",
    "CLOSED_STATUSES",
    "STATE_VERSION",
    "BrowserState",
    "ModelState",
    "OperationState",
    "PoolState",
    "RecoveryState",
    "RecoveryStep",
    "ResourceState",
    "SessionState",
    "browsers_alive",
    "models_on",
    "open_operations",
    "recovery_statistics",
    "state_from_json",
    "state_to_json",
]
