"""Every typed error of webpool, and the failure categories, in one leaf module.

This module imports nothing from the project, so every layer (the event log, the pure decisions,
the actors, the public API) can raise and catch the same classes. Each error names what was wrong
so a caller can act on it, and keeps its fields in ``args`` (or ``__reduce__``) so it pickles through
Ray unchanged: ``ray.get`` raises a ``RayTaskError`` that is also an instance of the original class.

Two families: ``EventError`` (the event log: schema, store, projections) and ``WebpoolError`` (the
pool at run time); ``InputError`` (bad caller input) derives from ``ValueError`` instead.
"""

from __future__ import annotations

import reprlib
from enum import Enum
from typing import Any

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60
_short.maxlevel = 3


def describe(exc: BaseException, limit: int = 500) -> str:
    """``Type: message`` of an error for a log or a message: the error a remote call raised (Ray's
    wrapper carries it as ``cause``, with the remote traceback in its own text), its message's first line."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip()
    return f"{type(cause).__name__}: {text.splitlines()[0] if text else ''}"[:limit]


def show(value: Any) -> str:
    """The caller's value for an error message: bounded in size, never failing (huge ints, deep nesting)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return f"<int of {len(hex(value)) * 4} bits>"
    try:
        return _short.repr(value)
    except Exception:
        return f"<{type(value).__name__}>"


class FailureCategory(str, Enum):
    """Why a browser or operation failed; each comes from a real signal, never from a message's wording
    (see docs/architecture.md, "Failures")."""

    CONNECTION = "connection"
    CRASH = "crash"
    TIMEOUT = "timeout"
    MEMORY = "memory"
    DEVICE_LOST = "device_lost"
    UNKNOWN = "unknown"


# ----- bad input -----------------------------------------------------------------------------------


class InputError(ValueError):
    """Bad caller input. ``field`` names what was wrong (e.g. ``"texts[2]"``), so callers and
    logs can point at the exact argument without parsing the message."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self) -> tuple:
        # Ray pickles exceptions across processes; the default reduce would call __init__ with
        # the formatted string only and fail.
        return (type(self), (self.field, self.message))


class ModelNotFoundError(InputError):
    """A model name the registry does not know; ``known`` lists the names it does."""

    def __init__(self, model: object, known: tuple[str, ...] = ()) -> None:
        super().__init__("model_name", f"unknown model {show(model)}; known models: {', '.join(known)}")
        self.model = model
        self.known = tuple(known)

    def __reduce__(self) -> tuple:
        return (type(self), (self.model, self.known))


# ----- the pool at run time ------------------------------------------------------------------------


class WebpoolError(RuntimeError):
    """Base of webpool's runtime errors (input errors derive from ValueError instead)."""


class BrowserFailure(WebpoolError):
    """A browser stopped serving: ``category`` says how (from real signals, see actors/browser.py)."""

    def __init__(self, browser_id: str, category: FailureCategory, detail: str) -> None:
        super().__init__(browser_id, FailureCategory(category), detail)
        self.browser_id = browser_id
        self.category = FailureCategory(category)
        self.detail = detail

    def __str__(self) -> str:
        return f"browser {self.browser_id} failed ({self.category.value}): {self.detail}"


class ActorUnreachable(BrowserFailure):
    """The browser's actor process did not answer at all (it, or its node, is gone or cut off): there is
    no live process to reconnect to over CDP, so recovery goes straight to another process."""


class NoBrowserAvailableError(WebpoolError):
    """No browser can serve the request (none can be launched, or all failed)."""


class PoolBusyError(WebpoolError):
    """The pool's request queue is full; retry after ``retry_after_s`` seconds (the pool's estimate of
    when the work ahead of it will be done, from its recent answer rate)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = float(retry_after_s)

    def __reduce__(self) -> tuple:
        return (type(self), (str(self), self.retry_after_s))


class NoMajorityError(WebpoolError):
    """Redundant runs (level critical) disagreed and no answer has a majority."""


class RecoveryStepError(WebpoolError):
    """A recovery step ran but did not bring the browser's work back."""


class BridgeNotReadyError(WebpoolError):
    """The guide's bridge or recovery manager has no usable pool yet (not initialized, or a pool without the API)."""


# ----- the event log -------------------------------------------------------------------------------


class EventError(Exception):
    """Base of every error raised by the events package."""


class InvalidEventError(EventError, ValueError):
    """An event was built with a field of the wrong type or an out-of-range value."""


class UnknownEventKindError(EventError, ValueError):
    """A record names an event kind this version does not define."""


class MalformedPayloadError(EventError, ValueError):
    """A payload is not valid JSON or does not match its kind's fields."""


class SchemaVersionError(EventError):
    """Data was written by a schema version this code cannot read (a newer one, or an unknown one)."""


class StoreConfigError(EventError, ValueError):
    """EventStore.open was given a bad option (fsync policy, compression, sizes, location)."""


class StoreClosedError(EventError):
    """An operation was attempted on a closed store."""


class StoreLockedError(EventError):
    """Another process holds the store's write lock."""


class CorruptSegmentError(EventError):
    """A sealed (non-tail) segment failed its checksum or structure check; it is not repaired silently."""


class CompactedRangeError(EventError):
    """A read asked for events that compaction removed from the log."""


class BatchConflictError(EventError):
    """A batch id was reused for a different batch of events."""


class SnapshotError(EventError):
    """A snapshot could not be written, or no readable snapshot matches the request."""


class StateError(EventError):
    """A record cannot be applied to a state (for example, a gap or repeat in seq)."""


class SequenceGapError(StateError):
    """A record's seq is not the state's last seq + 1."""
