"""What an event field may hold: one checker per field type, each returning the (possibly normalised) value
or raising ``InvalidEventError``; events/schema.py picks them from each event kind's type hints.

Field rules, checked in ``__post_init__`` so a bad event never reaches the log:
- ``str`` fields must be str; the subject field must be non-empty.
- Numbers must be finite and >= 0 (every number here is an id, count, size or duration); ``int``
  fields reject bool and must fit in int64; ``float`` fields accept int and store float.
- ``tuple[...]`` fields accept any list/tuple and store a tuple (so events stay hashable-ish and
  compare equal after a JSON round trip).
- ``dict`` fields must be JSON data with str keys; they are copied with tuples turned into lists,
  so the stored value equals what decoding gives back.
- ``FailureCategory`` fields accept the enum or its string value.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable
from typing import Any, Union

from events.errors import FailureCategory, InvalidEventError

_INT64_MAX = 2**63 - 1


def _int_text(v: int) -> str:
    """An int for an error message: huge ones by size (str() of > 4300 digits raises)."""
    return str(v) if abs(v) < 10**30 else f"an int of {v.bit_length()} bits"


def _check_str(v: Any) -> str:
    if type(v) is not str:
        raise InvalidEventError(f"expected str, got {type(v).__name__}")
    return v


def _check_int(v: Any) -> int:
    if type(v) is not int:
        raise InvalidEventError(f"expected int, got {type(v).__name__}")
    if v < 0 or v > _INT64_MAX:
        raise InvalidEventError(f"{_int_text(v)} is outside 0..2**63-1")
    return v


def _check_float(v: Any) -> float:
    t = type(v)
    if t is not float:
        if t is not int:
            raise InvalidEventError(f"expected a number, got {t.__name__}")
        try:
            v = float(v)
        except OverflowError:
            raise InvalidEventError(f"{_int_text(v)} is too large for a float") from None
    if not (0.0 <= v < math.inf):  # also false for NaN
        raise InvalidEventError(f"{v} is not a finite number >= 0")
    return v


def _check_bool(v: Any) -> bool:
    if type(v) is not bool:
        raise InvalidEventError(f"expected bool, got {type(v).__name__}")
    return v


def _check_category(v: Any) -> FailureCategory:
    if type(v) is FailureCategory:
        return v
    try:
        return FailureCategory(v)
    except ValueError:
        allowed = ", ".join(c.value for c in FailureCategory)
        try:
            shown = _int_text(v) if type(v) is int else repr(v)[:80]
        except (ValueError, RecursionError):   # a container holding a huge int, or nested too deep
            shown = f"a {type(v).__name__}"
        raise InvalidEventError(f"{shown} is not a failure category ({allowed})") from None


def _json_value(v: Any, depth: int) -> Any:
    if depth > 32:
        raise InvalidEventError("JSON value nested deeper than 32 levels")
    t = type(v)
    if v is None or t is str or t is bool:
        return v
    if t is int:
        if not -_INT64_MAX - 1 <= v <= _INT64_MAX:
            raise InvalidEventError(f"integer {_int_text(v)} does not fit in int64")
        return v
    if t is float:
        if not math.isfinite(v):
            raise InvalidEventError(f"{v} is not finite (JSON cannot carry it)")
        return v
    if t is list or t is tuple:
        return [_json_value(x, depth + 1) for x in v]
    if t is dict:
        out = {}
        for k, x in v.items():
            if type(k) is not str:
                raise InvalidEventError(f"dict key {k!r} is not a str")
            out[k] = _json_value(x, depth + 1)
        return out
    raise InvalidEventError(f"{t.__name__} is not JSON data")


def _check_dict(v: Any) -> dict:
    if type(v) is not dict:
        raise InvalidEventError(f"expected dict, got {type(v).__name__}")
    return _json_value(v, 0)


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def run(v: Any) -> Any:
        return None if v is None else check(v)

    return run


def _tuple_of(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def run(v: Any) -> tuple:
        if type(v) is not tuple and type(v) is not list:
            raise InvalidEventError(f"expected a tuple or list, got {type(v).__name__}")
        out = tuple(check(x) for x in v)
        # Keep the caller's tuple object when nothing changed (saves an allocation per event).
        return v if type(v) is tuple and all(a is b for a, b in zip(out, v, strict=True)) else out

    return run


_SCALARS: dict[Any, Callable[[Any], Any]] = {
    str: _check_str,
    int: _check_int,
    float: _check_float,
    bool: _check_bool,
    dict: _check_dict,
    FailureCategory: _check_category,
}


def checker_for(hint: Any) -> Callable[[Any], Any]:
    if hint in _SCALARS:
        return _SCALARS[hint]
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is dict:
        return _check_dict
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return _tuple_of(checker_for(args[0]))
    if origin in (Union, types.UnionType) and len(args) == 2 and type(None) in args:
        inner = args[0] if args[1] is type(None) else args[1]
        return _optional(checker_for(inner))
    raise TypeError(f"unsupported event field type {hint!r}")


def coercer_for(hint: Any) -> Callable[[Any], Any] | None:
    if hint is FailureCategory:
        return FailureCategory
    if typing.get_origin(hint) is tuple:
        return tuple
    if typing.get_origin(hint) in (Union, types.UnionType) and FailureCategory in typing.get_args(hint):
        return lambda v: None if v is None else FailureCategory(v)
    return None
