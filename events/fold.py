"""How each event changes the pool's state: one pure handler per event kind, folded by ``apply`` and ``replay``.

``apply(state, rec)`` returns a new ``PoolState`` and never mutates its input. ``replay(records)``
folds many records with the same handlers but copies each map at most once for the whole run (a
copy-on-write draft), which is what makes replaying a long log fast while keeping one definition of
what each event means (events/columnar.py folds the hot kinds with numpy and the rest through ``step``).

Semantics worth knowing (the pool relies on them):
- Records must come in seq order with no gap: ``SequenceGapError`` otherwise.
- An event about something the state does not know (a ModelLoaded for an unknown browser, an
  OperationCompleted for an op that is not open, a second OperationStarted for an open op, ...) changes
  nothing but the counter ``metrics["anomaly.<Kind>"]``; events are facts, so the fold never raises
  on them, and the anomaly counters make such drift visible.
- BrowserFailed keeps the browser's models in the projection: that is what recovery replays onto a
  replacement. BrowserLaunched (a fresh process, possibly reusing an id) and BrowserRetired drop them.
- Operations, recoveries and sessions are kept while open; closed ones only count in ``metrics``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from events.errors import SequenceGapError
from events.schema import (
    BrowserConnected,
    BrowserDisconnected,
    BrowserDraining,
    BrowserFailed,
    BrowserHealthReported,
    BrowserLaunched,
    BrowserQuarantined,
    BrowserRecoveryDeferred,
    BrowserRetired,
    BrowserRoleChanged,
    HedgeSent,
    HedgeWon,
    ModelLoaded,
    ModelUnloaded,
    ModelWarmedUp,
    OperationCompleted,
    OperationFailed,
    OperationStarted,
    PageRequestsBlocked,
    PoolConfigured,
    PoolScaled,
    Recorded,
    RecoveryCompleted,
    RecoveryStarted,
    RecoveryStepFinished,
    RequestRejected,
    SessionClosed,
    SessionOpened,
    SessionResumed,
    ShardPromoted,
    SnapshotWritten,
    TokensAppended,
)
from events.state import (
    MAPS,
    MEASURED_KINDS,
    PERF_WINDOW,
    BrowserState,
    ModelState,
    OperationState,
    PerfWindow,
    PoolState,
    RecoveryState,
    RecoveryStep,
    ResourceState,
    SessionState,
)


class Draft:
    """A PoolState being built: each map is copied on its first write, then written in place."""

    __slots__ = ("last_seq", "last_ts", "maps", "owned")

    def __init__(self, state: PoolState) -> None:
        self.last_seq = state.last_seq
        self.last_ts = state.last_ts
        self.maps: dict[str, Mapping[Any, Any]] = {n: getattr(state, n) for n in MAPS}
        self.owned: set[str] = set()

    def w(self, name: str) -> dict:
        m = self.maps[name]
        if name not in self.owned:
            m = dict(m)
            self.maps[name] = m
            self.owned.add(name)
        return m  # type: ignore[return-value]

    def r(self, name: str) -> Mapping[Any, Any]:
        return self.maps[name]

    def count(self, key: str, by: int | float = 1) -> None:
        m = self.w("metrics")
        m[key] = m.get(key, 0) + by

    def anomaly(self, rec: Recorded) -> None:
        self.count("anomaly." + rec.event.KIND)

    def freeze(self) -> PoolState:
        # The draft hands its copies to the new state; callers drop the draft afterwards.
        self.owned = set()
        return PoolState(last_seq=self.last_seq, last_ts=self.last_ts, **self.maps)


# --- handlers: (draft, record, event) -> None ---


def _drop_browser_perf(d: Draft, browser_id: str) -> None:
    if any(k[0] == browser_id for k in d.r("perf")):
        perf = d.w("perf")
        for k in [k for k in perf if k[0] == browser_id]:
            del perf[k]


def _touch(d: Draft, browser_id: str, ts: float) -> None:
    b = d.r("browsers").get(browser_id)
    if b is not None:
        d.w("browsers")[browser_id] = dataclasses.replace(b, last_active_ts=ts)


def _service_ms(e: OperationCompleted) -> float | None:
    """A completed operation's service time per row (what browsers are compared by): the page's own time
    (``metrics.page_ms``; else the whole duration) over the request's ``metrics.rows`` (texts; 1 when
    absent or not a positive int), so a browser that served larger requests does not look slower.
    None for a request answered by a page run it shared (``metrics.batch_requests``): its share depends
    on its batch's size, so it is no service time to judge a browser by."""
    m = e.metrics
    if m.get("batch_requests") is not None:
        return None
    page_ms = m.get("page_ms")
    ms = float(page_ms) if isinstance(page_ms, int | float) else e.duration_ms
    rows = m.get("rows")
    return ms / rows if isinstance(rows, int) and not isinstance(rows, bool) and rows > 1 else ms


def _measure(d: Draft, op: OperationState, ok: bool, duration_ms: float | None) -> None:
    """Add an operation to its (browser, model) window. ``duration_ms`` is its service time: the time the
    page itself reported running it (``metrics.page_ms``: no queueing, no transport) where it did."""
    if op.kind not in MEASURED_KINDS:
        return
    key = (op.browser_id, op.model)
    w = d.r("perf").get(key) or PerfWindow(op.browser_id, op.model)
    recent_ms = (*w.recent_ms, duration_ms)[-PERF_WINDOW:] if duration_ms is not None else w.recent_ms
    d.w("perf")[key] = dataclasses.replace(w, recent_ms=recent_ms, recent_ok=(*w.recent_ok, ok)[-PERF_WINDOW:])


def _update_browser(d: Draft, rec: Recorded, browser_id: str, **changes: Any) -> BrowserState | None:
    """Replace fields of a known browser; an event about an unknown one only counts as an anomaly."""
    b = d.r("browsers").get(browser_id)
    if b is None:
        d.anomaly(rec)
        return None
    b = dataclasses.replace(b, **changes)
    d.w("browsers")[browser_id] = b
    return b


def _browser_launched(d: Draft, rec: Recorded, e: BrowserLaunched) -> None:
    _drop_browser_perf(d, e.browser_id)     # a new process: its predecessor's speed says nothing
    old = d.r("browsers").get(e.browser_id)
    d.w("browsers")[e.browser_id] = BrowserState(
        browser_id=e.browser_id,
        browser_type=e.browser_type,
        backend_caps=e.backend_caps,
        pid=e.pid,
        node_id=e.node_id,
        standby=e.standby,
        backend=e.backend,
        wasm_threads=e.wasm_threads,
        status="launched",
        launched_seq=rec.seq,
        last_active_ts=rec.ts,
        failures=old.failures if old else 0,
        last_failure=old.last_failure if old else None,
        last_error=old.last_error if old else None,
    )
    if old is not None:
        _drop_browser_models(d, e.browser_id)
        if e.browser_id in d.r("resources"):
            del d.w("resources")[e.browser_id]
    d.count("browsers_launched")


def _drop_browser_models(d: Draft, browser_id: str) -> None:
    keys = [k for k in d.r("models") if k[0] == browser_id]
    if keys:
        models = d.w("models")
        for k in keys:
            del models[k]


def _set_status(d: Draft, rec: Recorded, browser_id: str, status: str, reason: str | None) -> BrowserState | None:
    b = d.r("browsers").get(browser_id)
    if b is None:
        d.anomaly(rec)
        return None
    nb = dataclasses.replace(b, status=status, status_reason=reason, replaced_by=None)
    d.w("browsers")[browser_id] = nb
    return nb


def _browser_connected(d: Draft, rec: Recorded, e: BrowserConnected) -> None:
    _set_status(d, rec, e.browser_id, "connected", None)


def _browser_disconnected(d: Draft, rec: Recorded, e: BrowserDisconnected) -> None:
    _set_status(d, rec, e.browser_id, "disconnected", e.reason)


def _browser_failed(d: Draft, rec: Recorded, e: BrowserFailed) -> None:
    b = d.r("browsers").get(e.browser_id)
    if b is None:
        d.anomaly(rec)
        return
    d.w("browsers")[e.browser_id] = dataclasses.replace(
        b, status="failed", status_reason=e.category.value, failures=b.failures + 1,
        last_failure=e.category, last_error=e.error,
    )
    d.count("browser_failures")
    d.count("browser_failures." + e.category.value)


def _browser_retired(d: Draft, rec: Recorded, e: BrowserRetired) -> None:
    if _set_status(d, rec, e.browser_id, "retired", e.reason) is None:
        return
    _drop_browser_models(d, e.browser_id)
    _drop_browser_perf(d, e.browser_id)
    if e.browser_id in d.r("resources"):
        del d.w("resources")[e.browser_id]
    d.count("browsers_retired")


def _browser_role_changed(d: Draft, rec: Recorded, e: BrowserRoleChanged) -> None:
    if _update_browser(d, rec, e.browser_id, standby=e.standby) is None:
        return
    d.count("browsers_promoted" if not e.standby else "browsers_demoted")


def _browser_draining(d: Draft, rec: Recorded, e: BrowserDraining) -> None:
    if _update_browser(d, rec, e.browser_id, draining=True) is None:
        return
    d.count("browsers_drained")


def _pool_scaled(d: Draft, rec: Recorded, e: PoolScaled) -> None:
    d.count("pool_scaled_" + e.direction)


def _pool_configured(d: Draft, rec: Recorded, e: PoolConfigured) -> None:
    d.maps["config"] = {"level": e.level, "recovery_strategy": e.recovery_strategy, "options": e.options}
    d.owned.add("config")
    d.count("pool_configured")


def _browser_quarantined(d: Draft, rec: Recorded, e: BrowserQuarantined) -> None:
    if _set_status(d, rec, e.browser_id, "quarantined", e.reason) is None:
        return
    _drop_browser_models(d, e.browser_id)
    _drop_browser_perf(d, e.browser_id)
    if e.browser_id in d.r("resources"):
        del d.w("resources")[e.browser_id]
    d.count("browsers_quarantined")


def _browser_health(d: Draft, rec: Recorded, e: BrowserHealthReported) -> None:
    if e.browser_id not in d.r("browsers"):
        d.anomaly(rec)
        return
    d.w("resources")[e.browser_id] = ResourceState(
        browser_id=e.browser_id, memory_mb=e.memory_mb, reported_models=e.loaded,
        reported_seq=rec.seq, reported_ts=rec.ts,
    )


def _page_requests_blocked(d: Draft, rec: Recorded, e: PageRequestsBlocked) -> None:
    b = d.r("browsers").get(e.browser_id)
    if _update_browser(d, rec, e.browser_id, blocked_requests=(b.blocked_requests if b else 0) + e.count) is None:
        return
    d.count("requests_blocked", e.count)


def _request_rejected(d: Draft, rec: Recorded, e: RequestRejected) -> None:
    d.count("requests_rejected")
    d.count("requests_rejected." + e.reason)


def _model_loaded(d: Draft, rec: Recorded, e: ModelLoaded) -> None:
    if e.browser_id not in d.r("browsers"):
        d.anomaly(rec)
        return
    d.w("models")[(e.browser_id, e.model, e.shard)] = ModelState(
        browser_id=e.browser_id, model=e.model, shard=e.shard, sha256=e.sha256,
        backend=e.backend, load_ms=e.load_ms, loaded_seq=rec.seq,
    )
    d.count("models_loaded")


def _model_warmed_up(d: Draft, rec: Recorded, e: ModelWarmedUp) -> None:
    key = (e.browser_id, e.model, e.shard)
    model = d.r("models").get(key)
    if model is None:
        d.anomaly(rec)
        return
    d.w("models")[key] = dataclasses.replace(model, warmed_up=True)
    d.count("models_warmed_up")


def _hedge_sent(d: Draft, rec: Recorded, e: HedgeSent) -> None:
    d.count("hedges_sent")


def _hedge_won(d: Draft, rec: Recorded, e: HedgeWon) -> None:
    d.count("hedges_won")


def _model_unloaded(d: Draft, rec: Recorded, e: ModelUnloaded) -> None:
    key = (e.browser_id, e.model, e.shard)
    if key not in d.r("models"):
        d.anomaly(rec)
        return
    del d.w("models")[key]
    d.count("models_unloaded")


def _op_started(d: Draft, rec: Recorded, e: OperationStarted) -> None:
    if e.op_id in d.r("operations"):
        d.anomaly(rec)
        return
    d.w("operations")[e.op_id] = OperationState(
        op_id=e.op_id, model=e.model, browser_id=e.browser_id, kind=e.kind,
        input_digest=e.input_digest, started_seq=rec.seq, started_ts=rec.ts,
    )
    _touch(d, e.browser_id, rec.ts)
    d.count("operations_started")


def _op_completed(d: Draft, rec: Recorded, e: OperationCompleted) -> None:
    if e.op_id not in d.r("operations"):
        d.anomaly(rec)
        return
    op = d.w("operations").pop(e.op_id)
    # The circuit breaker counts consecutive failures: a browser that answers again starts afresh.
    b = d.r("browsers").get(op.browser_id)
    if b is not None:
        d.w("browsers")[op.browser_id] = dataclasses.replace(b, failures=0, last_active_ts=rec.ts)
    _measure(d, op, True, _service_ms(e))
    d.count("operations_completed")
    d.count("operation_ms_total", e.duration_ms)


def _op_failed(d: Draft, rec: Recorded, e: OperationFailed) -> None:
    if e.op_id not in d.r("operations"):
        d.anomaly(rec)
        return
    op = d.w("operations").pop(e.op_id)
    _touch(d, op.browser_id, rec.ts)
    _measure(d, op, False, None)
    d.count("operations_failed")
    d.count("operations_failed." + e.category.value)


def _browser_recovery_deferred(d: Draft, rec: Recorded, e: BrowserRecoveryDeferred) -> None:
    _update_browser(d, rec, e.browser_id, recover_after=e.session_id)


def _recovery_started(d: Draft, rec: Recorded, e: RecoveryStarted) -> None:
    if e.recovery_id in d.r("recoveries"):
        d.anomaly(rec)
        return
    b = d.r("browsers").get(e.browser_id)
    if b is not None and b.recover_after is not None:      # the deferred recovery has begun
        d.w("browsers")[e.browser_id] = dataclasses.replace(b, recover_after=None)
    d.w("recoveries")[e.recovery_id] = RecoveryState(
        recovery_id=e.recovery_id, browser_id=e.browser_id, strategy=e.strategy, attempt=e.attempt,
        category=e.category, started_seq=rec.seq, started_ts=rec.ts,
    )
    d.count("recovery_attempts")


def _recovery_step(d: Draft, rec: Recorded, e: RecoveryStepFinished) -> None:
    r = d.r("recoveries").get(e.recovery_id)
    if r is None:
        d.anomaly(rec)
        return
    step = RecoveryStep(step=e.step, success=e.success, duration_ms=e.duration_ms, error=e.error)
    d.w("recoveries")[e.recovery_id] = dataclasses.replace(r, steps=(*r.steps, step))


def _recovery_completed(d: Draft, rec: Recorded, e: RecoveryCompleted) -> None:
    if e.recovery_id not in d.r("recoveries"):
        d.anomaly(rec)
        return
    del d.w("recoveries")[e.recovery_id]
    b = d.r("browsers").get(e.browser_id)
    if e.success and e.replacement not in (None, e.browser_id) and b is not None and b.status == "failed":
        # Its failure is handled: a later report of it (a request that met it a moment late) recovers nothing.
        d.w("browsers")[e.browser_id] = dataclasses.replace(b, replaced_by=e.replacement)
    d.count("recovery_successes" if e.success else "recovery_failures")
    d.count("recovery_ms_total", e.duration_ms)


def _session_opened(d: Draft, rec: Recorded, e: SessionOpened) -> None:
    if e.session_id in d.r("sessions"):
        d.anomaly(rec)
        return
    d.w("sessions")[e.session_id] = SessionState(
        session_id=e.session_id, model=e.model, plan=e.plan, tokens=(), opened_seq=rec.seq
    )
    d.count("sessions_opened")


def _tokens_appended(d: Draft, rec: Recorded, e: TokensAppended) -> None:
    s = d.r("sessions").get(e.session_id)
    if s is None:
        d.anomaly(rec)
        return
    d.w("sessions")[e.session_id] = dataclasses.replace(s, tokens=s.tokens + e.token_ids)
    d.count("tokens_appended", len(e.token_ids))


def _session_resumed(d: Draft, rec: Recorded, e: SessionResumed) -> None:
    s = d.r("sessions").get(e.session_id)
    if s is None or e.tokens != len(s.tokens):
        d.anomaly(rec)
        return
    d.w("sessions")[e.session_id] = dataclasses.replace(s, resumes=s.resumes + 1)
    d.count("sessions_resumed")


def _shard_promoted(d: Draft, rec: Recorded, e: ShardPromoted) -> None:
    s = d.r("sessions").get(e.session_id)
    if s is None or e.shard in s.promoted:      # a shard has one shadow: it is promoted once
        d.anomaly(rec)
        return
    d.w("sessions")[e.session_id] = dataclasses.replace(s, promoted=(*s.promoted, e.shard))
    d.count("shard_promotions")


def _session_closed(d: Draft, rec: Recorded, e: SessionClosed) -> None:
    if e.session_id not in d.r("sessions"):
        d.anomaly(rec)
        return
    del d.w("sessions")[e.session_id]
    d.count("sessions_closed")


def _snapshot_written(d: Draft, rec: Recorded, e: SnapshotWritten) -> None:
    m = d.w("metrics")
    m["snapshots"] = m.get("snapshots", 0) + 1
    m["last_snapshot_seq"] = e.snapshot_seq


_HANDLERS: dict[type, Any] = {
    BrowserLaunched: _browser_launched,
    BrowserConnected: _browser_connected,
    BrowserDisconnected: _browser_disconnected,
    BrowserFailed: _browser_failed,
    BrowserRetired: _browser_retired,
    BrowserRoleChanged: _browser_role_changed,
    BrowserQuarantined: _browser_quarantined,
    BrowserHealthReported: _browser_health,
    PageRequestsBlocked: _page_requests_blocked,
    BrowserDraining: _browser_draining,
    PoolScaled: _pool_scaled,
    PoolConfigured: _pool_configured,
    RequestRejected: _request_rejected,
    ModelLoaded: _model_loaded,
    ModelUnloaded: _model_unloaded,
    ModelWarmedUp: _model_warmed_up,
    OperationStarted: _op_started,
    OperationCompleted: _op_completed,
    OperationFailed: _op_failed,
    HedgeSent: _hedge_sent,
    HedgeWon: _hedge_won,
    RecoveryStarted: _recovery_started,
    RecoveryStepFinished: _recovery_step,
    RecoveryCompleted: _recovery_completed,
    SessionOpened: _session_opened,
    TokensAppended: _tokens_appended,
    SessionResumed: _session_resumed,
    ShardPromoted: _shard_promoted,
    SessionClosed: _session_closed,
    BrowserRecoveryDeferred: _browser_recovery_deferred,
    SnapshotWritten: _snapshot_written,
}


def step(d: Draft, rec: Recorded) -> None:
    """Fold one record into the draft (the one place the seq order is checked)."""
    if rec.seq != d.last_seq + 1:
        raise SequenceGapError(f"record seq {rec.seq} does not follow state seq {d.last_seq}")
    _HANDLERS[type(rec.event)](d, rec, rec.event)
    d.last_seq = rec.seq
    d.last_ts = rec.ts


def apply(state: PoolState, rec: Recorded) -> PoolState:
    """The state after ``rec``. ``rec.seq`` must be ``state.last_seq + 1``."""
    d = Draft(state)
    step(d, rec)
    return d.freeze()


def replay(records: Iterable[Recorded], state: PoolState | None = None) -> PoolState:
    """Fold ``records`` (in seq order, starting at ``state.last_seq + 1``) onto ``state`` (default: empty)."""
    d = Draft(state if state is not None else PoolState())
    for rec in records:
        step(d, rec)
    return d.freeze()
