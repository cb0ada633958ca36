"""orjson encoding of events.

A payload is the JSON object of the event's fields (orjson serialises the dataclass directly; enums
become their values, tuples become lists), ended by a newline: a column of payloads is then
newline-delimited JSON as it lies, which Arrow's JSON reader decodes in one call (``events.columnar``).
The kind travels beside the payload (a column in the store)
and the schema version in the segment's schema metadata, so payloads stay small. ``decode`` rebuilds
the dataclass through its constructor, so the same checks that guard ``append`` guard reading.
"""

from __future__ import annotations

from typing import Any

import orjson

from events.errors import InvalidEventError, MalformedPayloadError, SchemaVersionError, UnknownEventKindError
from events.schema import EVENT_TYPES, SCHEMA_VERSION, Event, Recorded


def encode(event: Event) -> bytes:
    """The event's fields as compact JSON bytes, ending in a newline."""
    if type(event) not in _KNOWN:
        raise InvalidEventError(f"not an event: {type(event).__name__}")
    try:
        return orjson.dumps(event, option=orjson.OPT_APPEND_NEWLINE)
    except (orjson.JSONEncodeError, TypeError) as exc:  # e.g. a lone surrogate in a str field
        raise InvalidEventError(f"{event.KIND} cannot be encoded: {exc}") from None


def decode(kind: str, payload: bytes | bytearray | memoryview, version: int = SCHEMA_VERSION,
           trusted: bool = False) -> Event:
    """Rebuild an event of ``kind`` from its payload written under schema ``version``.

    ``trusted=True`` is for payloads this code validated when it wrote them and that a checksum has
    confirmed since (the store's own segments): field names are still checked, values are not, which
    makes replay about twice as fast. Payloads of an older version always go through the constructor,
    which gives fields added since then their defaults.
    """
    if type(version) is not int or version > SCHEMA_VERSION or version < 1:
        shown = version if type(version) is int and abs(version) < 10**30 else "out of range"
        raise SchemaVersionError(f"payload has schema version {shown}; this code reads 1..{SCHEMA_VERSION}")
    cls = EVENT_TYPES.get(kind)
    if cls is None:
        raise UnknownEventKindError(f"unknown event kind {kind!r}")
    try:
        fields = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise MalformedPayloadError(f"{kind}: payload is not JSON: {exc}") from None
    if type(fields) is not dict:
        raise MalformedPayloadError(f"{kind}: payload is a {type(fields).__name__}, not an object")
    if trusted and version == SCHEMA_VERSION:
        if fields.keys() != cls._FIELDS:
            raise MalformedPayloadError(f"{kind}: fields {sorted(fields)} do not match {sorted(cls._FIELDS)}")
        for name, coerce in cls._COERCE:
            fields[name] = coerce(fields[name])
        event = object.__new__(cls)
        for name, value in fields.items():
            _set(event, name, value)
        return event
    try:
        return cls(**fields)
    except TypeError as exc:  # missing or unexpected field names
        raise MalformedPayloadError(f"{kind}: fields do not match: {exc}") from None
    except InvalidEventError as exc:
        raise MalformedPayloadError(f"{kind}: {exc}") from None


def log_entry(rec: Recorded) -> dict[str, Any]:
    """The seed's transaction-log shape (timestamp / action / data), plus seq and subject."""
    return {
        "seq": rec.seq,
        "timestamp": rec.ts,
        "action": rec.kind,
        "subject": rec.subject,
        "data": orjson.loads(orjson.dumps(rec.event)),
    }


_KNOWN = frozenset(EVENT_TYPES.values())
_set = object.__setattr__  # frozen dataclasses are built field by field this way

__all__ = ["decode", "encode", "log_entry"]
