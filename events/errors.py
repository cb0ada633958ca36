"""Typed errors of the event log. Each names what was wrong so a caller can act on it."""

from __future__ import annotations


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
