"""Event kinds of the pool: one frozen dataclass per kind, validated when built.

Every event has a class-level ``KIND`` (its name in the log) and a ``subject`` (the browser id, op id,
recovery id or session id it is about; "" for pool-wide events), which the store keeps as a column so
reads can filter by it without decoding payloads.

Field rules (events/fields.py), checked in ``__post_init__`` so a bad event never reaches the log: strings,
finite numbers >= 0 that fit int64, tuples, JSON dicts with str keys, failure categories.

Bump ``SCHEMA_VERSION`` when a kind's fields change; the store writes it into every segment and
refuses to open data written by a newer version.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from typing import Any, ClassVar

from events.errors import FailureCategory, InvalidEventError
from events.fields import checker_for, coercer_for

# 2: PageRequestsBlocked, RequestRejected, BrowserDraining, PoolScaled; 3: SessionResumed, ShardPromoted;
# 4: BrowserLaunched.backend, BrowserRecoveryDeferred; 5: PoolConfigured; 6: ModelWarmedUp; 7: HedgeSent, HedgeWon;
# 8: BrowserLaunched.wasm_threads.
# A payload of an older version lacks the newer fields: it is decoded through the constructor, which fills them
# with their defaults.
SCHEMA_VERSION = 8

class Event:
    """Base of all event kinds. Subclasses are made with ``@event_kind`` and are frozen dataclasses."""

    __slots__ = ()
    KIND: ClassVar[str]
    # Name of the field that ``subject`` returns; None for pool-wide events.
    SUBJECT_FIELD: ClassVar[str | None]
    _CHECKS: ClassVar[tuple[tuple[str, Callable[[Any], Any]], ...]]
    _FIELDS: ClassVar[frozenset[str]]
    _NAMES: ClassVar[tuple[str, ...]]
    # Conversions JSON needs undone (list -> tuple, str -> enum), for building from trusted payloads.
    _COERCE: ClassVar[tuple[tuple[str, Callable[[Any], Any]], ...]]

    def __post_init__(self) -> None:
        for name, check in self._CHECKS:
            value = getattr(self, name)
            try:
                fixed = check(value)
            except InvalidEventError as exc:
                raise InvalidEventError(f"{self.KIND}.{name}: {exc}") from None
            if fixed is not value:
                object.__setattr__(self, name, fixed)
        if self.SUBJECT_FIELD is not None and not getattr(self, self.SUBJECT_FIELD):
            raise InvalidEventError(f"{self.KIND}.{self.SUBJECT_FIELD}: must be a non-empty string")

    @property
    def subject(self) -> str:
        return "" if self.SUBJECT_FIELD is None else getattr(self, self.SUBJECT_FIELD)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Events cross Ray by pickle; field values in a tuple pickle about twice as fast as the
        # dataclass default, and need no re-validation (they were validated when built).
        return _rebuild, (type(self), tuple(getattr(self, n) for n in self._NAMES))


def _rebuild(cls: type[Event], values: tuple[Any, ...]) -> Event:
    event = object.__new__(cls)
    for name, value in zip(cls._NAMES, values, strict=True):
        object.__setattr__(event, name, value)
    return event


EVENT_TYPES: dict[str, type[Event]] = {}


def event_kind(subject: str | None) -> Callable[[type], type[Event]]:
    """Class decorator: frozen slotted dataclass, field checkers, registration under its class name."""

    def wrap(cls: type) -> type[Event]:
        dc = dataclasses.dataclass(frozen=True, slots=True)(cls)
        hints = typing.get_type_hints(dc)
        names = [f.name for f in dataclasses.fields(dc)]
        if subject is not None and subject not in names:
            raise TypeError(f"{cls.__name__}: subject field {subject!r} is not a field")
        dc.KIND = cls.__name__
        dc.SUBJECT_FIELD = subject
        dc._CHECKS = tuple((n, checker_for(hints[n])) for n in names)
        dc._FIELDS = frozenset(names)
        dc._NAMES = tuple(names)
        dc._COERCE = tuple(c for c in ((n, coercer_for(hints[n])) for n in names) if c[1] is not None)
        if dc.KIND in EVENT_TYPES:
            raise TypeError(f"event kind {dc.KIND} defined twice")
        EVENT_TYPES[dc.KIND] = dc
        return dc

    return wrap


# --- browsers ---


@event_kind("browser_id")
class BrowserLaunched(Event):
    browser_id: str
    browser_type: str
    backend_caps: tuple[str, ...]
    pid: int | None
    node_id: str
    standby: bool
    backend: str = ""           # the backend the pool runs models on there ("" in logs before schema 4)
    wasm_threads: int = 0       # WebAssembly threads its page computes with (0 in logs before schema 8)


@event_kind("browser_id")
class BrowserConnected(Event):
    browser_id: str


@event_kind("browser_id")
class BrowserDisconnected(Event):
    browser_id: str
    reason: str


@event_kind("browser_id")
class BrowserFailed(Event):
    browser_id: str
    category: FailureCategory
    error: str


@event_kind("browser_id")
class BrowserRetired(Event):
    browser_id: str
    reason: str


@event_kind("browser_id")
class BrowserRoleChanged(Event):
    """A standby browser promoted to serve traffic (standby=False), or a live one kept as a spare."""

    browser_id: str
    standby: bool


@event_kind("browser_id")
class BrowserQuarantined(Event):
    """A browser taken out of service because its answers disagreed with the others' (voting)."""

    browser_id: str
    reason: str


@event_kind("browser_id")
class BrowserDraining(Event):
    """The browser takes no new requests (it answers slower than its peers); once idle it is retired
    and replaced."""

    browser_id: str
    reason: str


@event_kind(None)
class PoolScaled(Event):
    """The pool decided to grow or shrink (``direction`` up | down) to ``browsers`` serving browsers."""

    direction: str
    browsers: int
    reason: str


@event_kind(None)
class PoolConfigured(Event):
    """How the pool runs from here on: its fault-tolerance level, recovery strategy and every option it was
    started with (JSON data). Recorded when a pool opens its log with a configuration other than the last
    one the log holds, so the log says how each stretch of it ran."""

    level: str
    recovery_strategy: str
    options: dict


@event_kind("browser_id")
class PageRequestsBlocked(Event):
    """The page tried to reach something other than its own origin (fetch, WebSocket, navigation):
    ``count`` new attempts since the last report, ``urls`` the latest of them (truncated)."""

    browser_id: str
    count: int
    urls: tuple[str, ...]


@event_kind("model")
class RequestRejected(Event):
    """A request turned away at the pool's door because ``admitted`` requests were already in (``limit``)."""

    model: str
    reason: str
    admitted: int
    limit: int


@event_kind("browser_id")
class BrowserHealthReported(Event):
    browser_id: str
    memory_mb: float
    loaded: tuple[str, ...]


# --- models ---


@event_kind("browser_id")
class ModelLoaded(Event):
    browser_id: str
    model: str
    shard: str | None
    sha256: str
    backend: str
    load_ms: float


@event_kind("browser_id")
class ModelWarmedUp(Event):
    """A loaded model ran ``rounds`` warm-up rounds on representative inputs until its page time settled
    (``first_ms`` -> ``last_ms`` per round): V8 has compiled its hot WebAssembly with the optimising
    tier, so the first real request there runs at full speed."""

    browser_id: str
    model: str
    shard: str | None
    rounds: int
    first_ms: float
    last_ms: float


@event_kind("browser_id")
class ModelUnloaded(Event):
    browser_id: str
    model: str
    shard: str | None


# --- operations ---


@event_kind("op_id")
class OperationStarted(Event):
    op_id: str
    model: str
    browser_id: str
    kind: str
    input_digest: str


@event_kind("op_id")
class OperationCompleted(Event):
    op_id: str
    duration_ms: float
    metrics: dict


@event_kind("op_id")
class OperationFailed(Event):
    op_id: str
    category: FailureCategory
    error: str


@event_kind("hedge_id")
class HedgeSent(Event):
    """A request of ``rows`` rows still unanswered after ``after_ms`` was also sent to ``browser_id`` (an
    idle browser holding ``model``); the first answer is the request's. The copy runs as its own operation."""

    hedge_id: str
    browser_id: str
    model: str
    rows: int
    after_ms: float


@event_kind("hedge_id")
class HedgeWon(Event):
    """The copy ``hedge_id`` on ``browser_id`` answered the request (for ``model``) before its first run did."""

    hedge_id: str
    browser_id: str
    model: str


# --- recovery ---


@event_kind("recovery_id")
class RecoveryStarted(Event):
    recovery_id: str
    browser_id: str
    strategy: str
    attempt: int
    category: FailureCategory


@event_kind("browser_id")
class BrowserRecoveryDeferred(Event):
    """A failed browser is recovered only once ``session_id`` closes: the session went on without it (a
    shadow took over), and recovering it meanwhile would take CPU from the session."""

    browser_id: str
    session_id: str


@event_kind("recovery_id")
class RecoveryStepFinished(Event):
    recovery_id: str
    step: str
    success: bool
    duration_ms: float
    error: str | None


@event_kind("recovery_id")
class RecoveryCompleted(Event):
    recovery_id: str
    browser_id: str
    success: bool
    replacement: str | None
    duration_ms: float


# --- sessions (sharded generation) ---


@event_kind("session_id")
class SessionOpened(Event):
    session_id: str
    model: str
    plan: dict


@event_kind("session_id")
class TokensAppended(Event):
    session_id: str
    token_ids: tuple[int, ...]


@event_kind("session_id")
class SessionResumed(Event):
    """A new coordinator took the session over (the last one died): it goes on from ``tokens`` logged tokens."""

    session_id: str
    tokens: int
    attempt: int


@event_kind("session_id")
class ShardPromoted(Event):
    """Shard ``shard``'s primary browser failed; its shadow, holding the same cache, took over (no replay)."""

    session_id: str
    shard: int
    failed_browser: str
    shadow_browser: str


@event_kind("session_id")
class SessionClosed(Event):
    session_id: str
    reason: str


# --- the log itself ---


@event_kind(None)
class SnapshotWritten(Event):
    snapshot_seq: int
    path: str


@dataclasses.dataclass(frozen=True, slots=True)
class Recorded:
    """An event as the log holds it: ``seq`` (contiguous from 1, set by the store) and ``ts`` (unix s)."""

    seq: int
    ts: float
    event: Event

    @property
    def kind(self) -> str:
        return self.event.KIND

    @property
    def subject(self) -> str:
        return self.event.subject

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return Recorded, (self.seq, self.ts, self.event)


__all__ = [
    "EVENT_TYPES",
    "SCHEMA_VERSION",
    "BrowserConnected",
    "BrowserDisconnected",
    "BrowserDraining",
    "BrowserFailed",
    "BrowserHealthReported",
    "BrowserLaunched",
    "BrowserQuarantined",
    "BrowserRecoveryDeferred",
    "BrowserRetired",
    "BrowserRoleChanged",
    "Event",
    "HedgeSent",
    "HedgeWon",
    "ModelLoaded",
    "ModelUnloaded",
    "ModelWarmedUp",
    "OperationCompleted",
    "OperationFailed",
    "OperationStarted",
    "PageRequestsBlocked",
    "PoolConfigured",
    "PoolScaled",
    "Recorded",
    "RecoveryCompleted",
    "RecoveryStarted",
    "RecoveryStepFinished",
    "RequestRejected",
    "SessionClosed",
    "SessionOpened",
    "SessionResumed",
    "ShardPromoted",
    "SnapshotWritten",
    "TokensAppended",
    "event_kind",
]
