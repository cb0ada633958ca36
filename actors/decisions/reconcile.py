"""What the pool's reconcile loop does next: a pure function of the projected state and what the loop
observed since its last pass (nodes alive, browsers leased by requests, the time).

The loop (actors/reconcile.py) observes, calls ``decide``, executes the actions in the order given, and
every execution is recorded as events. No Ray, no I/O, no clock here: each rule below is a table test
in tests/test_reconcile_decisions.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from actors.constants import HEALTH_RECORD_CHANGE
from events import schema as ev
from events.errors import FailureCategory
from events.state import CLOSED_STATUSES, PoolState, ResourceState, browsers_alive, models_on
from sharding.models.registry import artifact_key

SERVING_STATUSES = frozenset({"launched", "connected"})     # a browser whose page the pool reaches


# ----- actions ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recover:
    """Recover a browser (through the recovery executor, once however many ask)."""

    browser_id: str
    category: FailureCategory
    detail: str
    unreachable: bool = False     # its actor did not answer at all: no reconnect to a process that is gone


@dataclass(frozen=True)
class CutOff:
    """A browser of an open session answers no probe: end the calls waiting on it (the pool's, and its
    session's coordinator's). The session replaces the shard (or promotes its shadow) as for any failure."""

    browser_id: str
    detail: str


@dataclass(frozen=True)
class CheckHealth:
    """Ask an idle browser for its health report (a failure is reported like any other)."""

    browser_id: str


@dataclass(frozen=True)
class KeepStandby:
    """Bring the warm spares up to their number and their models up to the hot set (one task at a time)."""


@dataclass(frozen=True)
class ScaleDown:
    """Retire serving browsers idle for the configured time (adaptive scaling; one always stays). Which
    ones is decided by decisions.adaptive.idle_to_retire under the placement lock, so nothing is placed
    on a browser while it is judged idle."""


@dataclass(frozen=True)
class Checkpoint:
    """Snapshot the projection into the log, so a restart replays only what came after."""


Action = Recover | CutOff | CheckHealth | KeepStandby | ScaleDown | Checkpoint


@dataclass(frozen=True)
class Observations:
    """What the loop saw just before deciding; the state comes from the log."""

    alive_nodes: frozenset[str] | None      # None: the node list could not be read this pass
    leases: Mapping[str, int] = field(default_factory=dict)   # browser -> requests using it now
    recovering: frozenset[str] = frozenset()                  # browsers whose recovery is under way
    health_due: bool = False
    checkpoint_due: bool = False
    standby_busy: bool = False                                # a KeepStandby task is still running
    standby_launching: int = 0                                # browsers being launched as standbys now
    checking: frozenset[str] = frozenset()                    # browsers whose health check is under way
    scale_down_due: bool = False
    silent: frozenset[str] = frozenset()                      # browsers whose actor answers no probe (see ``silent``)


@dataclass(frozen=True)
class Policy:
    """The parts of the pool's configuration the loop's rules read."""

    recovers: bool                 # level >= low
    standby_browsers: int          # wanted warm spares (0 below level high)


# ----- rules -----------------------------------------------------------------------------------------
def ended_by_restart(state: PoolState, adopted: frozenset[str] = frozenset()) -> list[ev.Event]:
    """What a restarted pool records before it serves: the log's account of the incarnation that died.

    Its in-flight work died with it (the requests are retried by Ray and run again), so each started
    operation ends failed (CRASH), and each open recovery and session closes. Its browser actors outlive it
    (actors/fleet.py): those the new incarnation found alive are ``adopted``, connected to it, and serve on as
    they were; every other browser not already closed is retired. After these events the projection has no operation,
    recovery or session left open, and no live browser but the adopted ones.
    """
    detail = "the pool restarted while it ran"
    events: list[ev.Event] = [ev.OperationFailed(op_id=o, category=FailureCategory.CRASH, error=detail)
                              for o in sorted(state.operations)]
    events += [ev.RecoveryCompleted(recovery_id=r, browser_id=state.recoveries[r].browser_id, success=False,
                                    replacement=None, duration_ms=0.0) for r in sorted(state.recoveries)]
    events += [ev.SessionClosed(session_id=s, reason="pool restarted") for s in sorted(state.sessions)]
    events += [ev.BrowserRetired(browser_id=b.browser_id, reason="pool restarted")
               for b in sorted(state.browsers.values(), key=lambda b: b.browser_id)
               if b.status not in CLOSED_STATUSES and b.browser_id not in adopted]
    events += [ev.BrowserConnected(browser_id=b) for b in sorted(adopted)]      # to the new incarnation
    return events


def health_worth_recording(last: ResourceState | None, memory_mb: float, loaded: tuple[str, ...],
                           change: float = HEALTH_RECORD_CHANGE) -> bool:
    """Whether a browser's health report goes into the log (BrowserHealthReported): the first one, one whose
    models differ from the last recorded, or one whose memory moved by ``change`` (relative) or more. The log
    then says what each browser held and how much memory it took (the sharding analyzer reads it), without a
    record per health pass."""
    if last is None or tuple(sorted(last.reported_models)) != tuple(sorted(loaded)):
        return True
    return abs(memory_mb - last.memory_mb) >= change * max(last.memory_mb, 1.0)


def adoptable(state: PoolState) -> frozenset[str]:
    """The browsers a restarted pool may adopt: serving in the log (launched or connected, not failed or cut off
    from its browser) with no recovery open (one under way when the pool died is ended, and its browser retired:
    the next incarnation knows nothing of its step)."""
    recovering = {r.browser_id for r in state.recoveries.values()}
    return frozenset(b.browser_id for b in state.browsers.values()
                     if b.status in SERVING_STATUSES and b.browser_id not in recovering)


SILENT = "its actor answered no probe in time (its node may be gone)"


def silent(outstanding: Mapping[str, float], now: float, deadline: float,
           newest_answer_sent: float | None = None) -> frozenset[str]:
    """Browsers whose unanswered probe (``outstanding``: browser -> when it was sent) is older than
    ``deadline`` and, where other browsers are probed too, older than the newest probe any browser has
    answered (``newest_answer_sent``; None: no other browser to compare with).

    A probe is a call to the browser's actor that touches no page, so a busy page does not delay it. When
    every probe is late together, the pool or the whole machine was stalled (two cores busy loading models
    delay a ping by up to ~0.9 s here), and nobody is blamed; when a probe sent later was answered, the
    pool and Ray are making progress and this one actor, its process or its node is gone or cut off."""
    return frozenset(b for b, sent in outstanding.items()
                     if now - sent > deadline and (newest_answer_sent is None or newest_answer_sent > sent))


def probe_deadline(recent_rtts: Sequence[float], floor: float, factor: float, cap: float) -> float:
    """How long a probe may go unanswered: ``factor`` x the slowest recent answer, within [floor, cap]. A
    loaded machine answers slower for every browser, and the deadline follows."""
    return min(cap, max(floor, factor * max(recent_rtts, default=0.0)))


def lost_to_nodes(state: PoolState, alive_nodes: frozenset[str]) -> list[str]:
    """Live browsers placed on a node Ray no longer lists as alive (busy or not: they failed with it)."""
    return [b.browser_id for b in browsers_alive(state) if b.node_id and b.node_id not in alive_nodes]


def deferred_due(state: PoolState, recovering: frozenset[str] = frozenset()) -> list[str]:
    """Failed browsers whose recovery waited for a session that has closed since (BrowserRecoveryDeferred)."""
    return [b.browser_id for b in state.browsers.values()
            if b.recover_after is not None and b.recover_after not in state.sessions
            and b.status == "failed" and b.browser_id not in recovering]


def in_open_session(state: PoolState, browser_id: str) -> bool:
    """``browser_id`` runs a shard (or a shard's shadow) of an open generation session: a failure there is the
    session's to handle (replace the shard, promote its shadow, or defer the recovery until it closes)."""
    for session in state.sessions.values():
        plan = session.plan
        if browser_id in plan.get("shadows", ()) or any(s.get("browser_id") == browser_id
                                                        for s in plan.get("shards", ())):
            return True
    return False


def keys_on(state: PoolState, browser_id: str) -> frozenset[str]:
    """Artifact keys of the models the log says ``browser_id`` holds."""
    return frozenset(artifact_key(m.model, m.shard, m.sha256) for m in models_on(state, browser_id))


def warm_keys_on(state: PoolState, browser_id: str) -> frozenset[str]:
    """Artifact keys of the models on ``browser_id`` that have run their warm-up (ModelWarmedUp)."""
    return frozenset(artifact_key(m.model, m.shard, m.sha256) for m in models_on(state, browser_id) if m.warmed_up)


def hot_keys(state: PoolState) -> frozenset[str]:
    """Artifact keys held by browsers that serve traffic: what a warm spare must hold too."""
    return frozenset().union(*(keys_on(state, b.browser_id) for b in browsers_alive(state)
                               if not b.standby and not b.draining))


def standby_short(state: PoolState, wanted: int, launching: int = 0) -> bool:
    """Fewer warm spares than ``wanted`` (counting ``launching``: standbys being launched now, such as the
    fresh browser of a parallel recovery), or a spare missing a hot model or not yet warmed up on one.
    Nothing is short before a model serves: a spare keeps warm what serves traffic, and an idle pool has
    nothing to keep warm."""
    hot = hot_keys(state)
    if wanted <= 0 or not hot:
        return False
    spares = [b for b in browsers_alive(state) if b.standby]
    if len(spares) + launching < wanted:
        return True
    return any(hot - warm_keys_on(state, b.browser_id) for b in spares)


def to_health_check(state: PoolState, leases: Mapping[str, int]) -> list[str]:
    """Live browsers no request is using: a busy page cannot answer until its work is done, and a hang
    there is caught by that request's own time budget."""
    return [b.browser_id for b in browsers_alive(state) if not leases.get(b.browser_id)]


def decide(state: PoolState, seen: Observations, policy: Policy) -> list[Action]:
    """The loop's actions for one pass, in the order to run them:

    1. browsers on vanished nodes, and browsers whose actor answers no probe, are recovered (reported
       unreachable: their actors cannot answer, so no step may wait on them); a silent browser of an open
       session is cut off instead, for its session to replace;
    2. deferred recoveries whose session has closed are started;
    3. idle browsers are health-checked (when a health pass is due);
    4. warm spares are topped up (level high and up), unless a top-up is still running;
    5. idle serving browsers are scaled down (when due);
    6. the projection is checkpointed (when due).
    Nothing is recovered at level none; a browser already being recovered is not recovered twice.
    """
    actions: list[Action] = []
    busy = set(seen.recovering)
    if policy.recovers and seen.alive_nodes is not None:
        for browser_id in lost_to_nodes(state, seen.alive_nodes):
            node = state.browsers[browser_id].node_id
            actions.append(Recover(browser_id, FailureCategory.CONNECTION,
                                   f"its node {node[:12]} left the cluster", unreachable=True))
            busy.add(browser_id)
    if policy.recovers:
        alive = {b.browser_id for b in browsers_alive(state)}
        # A shard of an open session is the session's to replace: it is cut off, and its coordinator's call
        # then fails at once (rather than when Ray declares the node dead) and the session replaces it.
        for browser_id in sorted(seen.silent & (alive - busy)):
            if in_open_session(state, browser_id):
                actions.append(CutOff(browser_id, SILENT))
            else:
                actions.append(Recover(browser_id, FailureCategory.CONNECTION, SILENT, unreachable=True))
            busy.add(browser_id)
    if policy.recovers:
        for browser_id in deferred_due(state, frozenset(busy)):
            b = state.browsers[browser_id]
            actions.append(Recover(browser_id, b.last_failure or FailureCategory.UNKNOWN,
                                   f"deferred until session {b.recover_after} closed: {b.last_error or ''}"[:500]))
            busy.add(browser_id)
    if seen.health_due:
        actions.extend(CheckHealth(b) for b in to_health_check(state, seen.leases)
                       if b not in busy and b not in seen.checking)
    if not seen.standby_busy and standby_short(state, policy.standby_browsers, seen.standby_launching):
        actions.append(KeepStandby())
    if seen.scale_down_due:
        actions.append(ScaleDown())
    if seen.checkpoint_due:
        actions.append(Checkpoint())
    return actions
