"""Hypothesis strategies for events and logs, shared by the projection and columnar replay tests.

Imported as ``event_strategies`` (pytest puts this folder on sys.path).
"""

from __future__ import annotations

from hypothesis import strategies as st

from events.errors import FailureCategory
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

BROWSERS = st.sampled_from(["b1", "b2", "b3"])
OPS = st.sampled_from(["o1", "o2", "o3", "o4"])
RECOVERIES = st.sampled_from(["r1", "r2"])
SESSIONS = st.sampled_from(["s1", "s2"])
HEDGES = st.sampled_from(["h1", "h2"])
MODELS = st.sampled_from(["minilm", "smollm2"])
SHARDS = st.sampled_from([None, "0-9", "10-19"])
CATS = st.sampled_from(FailureCategory)
TEXT = st.text(max_size=6)
MS = st.floats(0, 1e5, allow_nan=False)
SMALL_JSON = st.dictionaries(st.text(max_size=4), st.integers(-5, 5) | st.floats(-1e3, 1e3) | st.text(max_size=3),
                             max_size=3)

# One strategy per event kind (tests check that every kind is here).
EVENTS_BY_KIND: dict[type, st.SearchStrategy] = {
    BrowserLaunched: st.builds(BrowserLaunched, BROWSERS, st.sampled_from(["chromium", "edge"]),
                               st.lists(TEXT, max_size=2).map(tuple), st.none() | st.integers(1, 99999), TEXT,
                               st.booleans(), st.sampled_from(["", "wasm", "webgpu"]), st.integers(0, 8)),
    BrowserConnected: st.builds(BrowserConnected, BROWSERS),
    BrowserDisconnected: st.builds(BrowserDisconnected, BROWSERS, TEXT),
    BrowserFailed: st.builds(BrowserFailed, BROWSERS, CATS, TEXT),
    BrowserRetired: st.builds(BrowserRetired, BROWSERS, TEXT),
    BrowserRoleChanged: st.builds(BrowserRoleChanged, BROWSERS, st.booleans()),
    BrowserQuarantined: st.builds(BrowserQuarantined, BROWSERS, TEXT),
    BrowserHealthReported: st.builds(BrowserHealthReported, BROWSERS, MS, st.lists(MODELS, max_size=2).map(tuple)),
    ModelLoaded: st.builds(ModelLoaded, BROWSERS, MODELS, SHARDS, TEXT, st.sampled_from(["wasm", "webgpu"]), MS),
    ModelUnloaded: st.builds(ModelUnloaded, BROWSERS, MODELS, SHARDS),
    ModelWarmedUp: st.builds(ModelWarmedUp, BROWSERS, MODELS, SHARDS, st.integers(0, 50), MS, MS),
    OperationStarted: st.builds(OperationStarted, OPS, MODELS, BROWSERS, st.sampled_from(["infer", "generate"]), TEXT),
    OperationCompleted: st.builds(OperationCompleted, OPS, MS, SMALL_JSON),
    OperationFailed: st.builds(OperationFailed, OPS, CATS, TEXT),
    HedgeSent: st.builds(HedgeSent, HEDGES, BROWSERS, MODELS, st.integers(1, 64), MS),
    HedgeWon: st.builds(HedgeWon, HEDGES, BROWSERS, MODELS),
    RecoveryStarted: st.builds(RecoveryStarted, RECOVERIES, BROWSERS,
                               st.sampled_from(["reconnect", "restart", "failover"]), st.integers(1, 3), CATS),
    RecoveryStepFinished: st.builds(RecoveryStepFinished, RECOVERIES, TEXT, st.booleans(), MS, st.none() | TEXT),
    RecoveryCompleted: st.builds(RecoveryCompleted, RECOVERIES, BROWSERS, st.booleans(), st.none() | BROWSERS, MS),
    SessionOpened: st.builds(SessionOpened, SESSIONS, MODELS, SMALL_JSON),
    TokensAppended: st.builds(TokensAppended, SESSIONS, st.lists(st.integers(0, 49151), max_size=4).map(tuple)),
    SessionResumed: st.builds(SessionResumed, SESSIONS, st.integers(0, 4), st.integers(2, 4)),
    ShardPromoted: st.builds(ShardPromoted, SESSIONS, st.integers(0, 2), BROWSERS, BROWSERS),
    SessionClosed: st.builds(SessionClosed, SESSIONS, TEXT),
    SnapshotWritten: st.builds(SnapshotWritten, st.integers(0, 100), TEXT),
    BrowserDraining: st.builds(BrowserDraining, BROWSERS, TEXT),
    PageRequestsBlocked: st.builds(PageRequestsBlocked, BROWSERS, st.integers(1, 5),
                                   st.lists(TEXT, max_size=2).map(tuple)),
    BrowserRecoveryDeferred: st.builds(BrowserRecoveryDeferred, BROWSERS, SESSIONS),
    PoolScaled: st.builds(PoolScaled, st.sampled_from(["up", "down"]), st.integers(0, 9), TEXT),
    PoolConfigured: st.builds(PoolConfigured, st.sampled_from(["none", "high"]),
                              st.sampled_from(["restart", "failover"]), SMALL_JSON),
    RequestRejected: st.builds(RequestRejected, MODELS, st.sampled_from(["busy", "too_large"]), st.integers(0, 9),
                               st.integers(1, 9)),
}
pool_events = st.one_of(*EVENTS_BY_KIND.values())

# The kinds a busy log is made of, with what real completions carry: the page's own time.
PAGE_METRICS = st.fixed_dictionaries({}, optional={
    "page_ms": st.floats(0, 1e4, allow_nan=False) | st.integers(0, 10_000) | st.none(),
    "backend": st.sampled_from(["wasm", "webgpu"]),
    "batch": st.integers(1, 8),
    # A request answered by a shared page run (actors/batching.py): not a service-time sample.
    "batch_requests": st.integers(2, 16) | st.none(),
    "batch_rows": st.integers(2, 64),
    "rows": st.integers(-1, 64) | st.none(),
})
# A page time of another type, which the projection ignores (the columnar fold leaves such a log to it).
odd_completions = st.builds(OperationCompleted, OPS, MS, st.fixed_dictionaries({"page_ms": st.booleans() | TEXT})
                            | st.fixed_dictionaries({"batch_requests": TEXT}) | st.fixed_dictionaries({"rows": TEXT}))
hot_events = st.one_of(
    st.builds(OperationStarted, OPS, MODELS, BROWSERS, st.sampled_from(["infer", "generate", "replay"]), TEXT),
    st.builds(OperationCompleted, OPS, MS, PAGE_METRICS),
    st.builds(OperationFailed, OPS, CATS, TEXT),
    st.builds(TokensAppended, SESSIONS, st.lists(st.integers(0, 49151), max_size=4).map(tuple)),
    st.builds(BrowserHealthReported, BROWSERS, MS, st.lists(MODELS, max_size=2).map(tuple)),
)


@st.composite
def logs(draw, events_of: st.SearchStrategy = pool_events, max_size: int = 80) -> list[Recorded]:
    events = draw(st.lists(events_of, max_size=max_size))
    gaps = draw(st.lists(st.floats(0, 10, allow_nan=False), min_size=len(events), max_size=len(events)))
    ts, out = 1.7e9, []
    for i, (e, gap) in enumerate(zip(events, gaps, strict=True)):
        ts += gap
        out.append(Recorded(i + 1, ts, e))
    return out




# Mostly hot events, with every other kind in between: long runs for the columnar fold to work on.
busy_events = st.one_of(hot_events, hot_events, hot_events, pool_events)
