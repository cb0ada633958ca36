"""Event kinds, their validation, and the orjson codec (round trips and typed errors)."""

from __future__ import annotations

import dataclasses
import math
import pickle
import typing

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from events import schema
from events.codec import decode, encode, log_entry
from events.errors import (
    FailureCategory,
    InvalidEventError,
    MalformedPayloadError,
    SchemaVersionError,
    UnknownEventKindError,
)
from events.schema import (
    EVENT_TYPES,
    SCHEMA_VERSION,
    BrowserFailed,
    BrowserLaunched,
    OperationCompleted,
    OperationStarted,
    Recorded,
    SessionOpened,
    SnapshotWritten,
    TokensAppended,
)

# The field names are a contract the pool, recovery and coordinator code rely on.
CONTRACT = {
    "BrowserLaunched": ("browser_id", "browser_type", "backend_caps", "pid", "node_id", "standby", "backend",
                        "wasm_threads"),
    "BrowserConnected": ("browser_id",),
    "BrowserDisconnected": ("browser_id", "reason"),
    "BrowserFailed": ("browser_id", "category", "error"),
    "BrowserRetired": ("browser_id", "reason"),
    "BrowserRoleChanged": ("browser_id", "standby"),
    "BrowserQuarantined": ("browser_id", "reason"),
    "BrowserHealthReported": ("browser_id", "memory_mb", "loaded"),
    "ModelLoaded": ("browser_id", "model", "shard", "sha256", "backend", "load_ms"),
    "ModelUnloaded": ("browser_id", "model", "shard"),
    "ModelWarmedUp": ("browser_id", "model", "shard", "rounds", "first_ms", "last_ms"),
    "OperationStarted": ("op_id", "model", "browser_id", "kind", "input_digest"),
    "OperationCompleted": ("op_id", "duration_ms", "metrics"),
    "OperationFailed": ("op_id", "category", "error"),
    "HedgeSent": ("hedge_id", "browser_id", "model", "rows", "after_ms"),
    "HedgeWon": ("hedge_id", "browser_id", "model"),
    "RecoveryStarted": ("recovery_id", "browser_id", "strategy", "attempt", "category"),
    "RecoveryStepFinished": ("recovery_id", "step", "success", "duration_ms", "error"),
    "RecoveryCompleted": ("recovery_id", "browser_id", "success", "replacement", "duration_ms"),
    "BrowserRecoveryDeferred": ("browser_id", "session_id"),
    "SessionOpened": ("session_id", "model", "plan"),
    "TokensAppended": ("session_id", "token_ids"),
    "SessionResumed": ("session_id", "tokens", "attempt"),
    "ShardPromoted": ("session_id", "shard", "failed_browser", "shadow_browser"),
    "SessionClosed": ("session_id", "reason"),
    "SnapshotWritten": ("snapshot_seq", "path"),
    "PageRequestsBlocked": ("browser_id", "count", "urls"),
    "RequestRejected": ("model", "reason", "admitted", "limit"),
    "BrowserDraining": ("browser_id", "reason"),
    "PoolScaled": ("direction", "browsers", "reason"),
    "PoolConfigured": ("level", "recovery_strategy", "options"),
}

SUBJECTS = {
    "Browser": "browser_id", "Model": "browser_id", "Operation": "op_id", "Recovery": "recovery_id",
    "Session": "session_id", "Tokens": "session_id", "Shard": "session_id", "Page": "browser_id", "Request": "model",
    "Hedge": "hedge_id",
}

# --- strategies built from each kind's type hints ---

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


def _strategy(hint: typing.Any) -> st.SearchStrategy:
    simple = {
        str: st.text(max_size=12),
        int: st.integers(0, 2**63 - 1),
        float: st.floats(0, 1e12, allow_nan=False, allow_infinity=False),
        bool: st.booleans(),
        dict: st.dictionaries(st.text(max_size=8), json_values, max_size=4),
        FailureCategory: st.sampled_from(FailureCategory),
    }
    if hint in simple:
        return simple[hint]
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        return st.lists(_strategy(args[0]), max_size=5).map(tuple)
    inner = args[0] if args[1] is type(None) else args[1]
    return st.none() | _strategy(inner)


def event_strategy(cls: type) -> st.SearchStrategy:
    hints = typing.get_type_hints(cls)
    fields = {}
    for f in dataclasses.fields(cls):
        s = _strategy(hints[f.name])
        fields[f.name] = st.text(min_size=1, max_size=12) if f.name == cls.SUBJECT_FIELD else s
    return st.builds(cls, **fields)


any_event = st.one_of([event_strategy(c) for c in EVENT_TYPES.values()])


def test_kinds_and_field_names_are_the_contract():
    assert {k: tuple(f.name for f in dataclasses.fields(c)) for k, c in EVENT_TYPES.items()} == CONTRACT
    for kind, cls in EVENT_TYPES.items():
        assert cls.KIND == kind
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen


def test_failure_category_values_are_lowercase_strings():
    assert [c.value for c in FailureCategory] == ["connection", "crash", "timeout", "memory", "device_lost", "unknown"]
    assert FailureCategory("crash") is FailureCategory.CRASH and FailureCategory.CRASH == "crash"


@pytest.mark.parametrize("kind", sorted(EVENT_TYPES))
def test_subject_is_the_id_the_event_is_about(kind):
    cls = EVENT_TYPES[kind]
    expected = next((f for prefix, f in SUBJECTS.items() if kind.startswith(prefix)), None)
    assert cls.SUBJECT_FIELD == expected


@settings(max_examples=300, deadline=None)
@given(any_event)
def test_encode_decode_round_trip(event):
    payload = encode(event)
    assert isinstance(payload, bytes)
    back = decode(event.KIND, payload)
    assert back == event and type(back) is type(event)
    assert decode(event.KIND, payload, trusted=True) == event
    assert back.subject == event.subject
    assert pickle.loads(pickle.dumps(event)) == event  # events cross Ray by pickle


def test_constructor_normalises_lists_categories_and_ints():
    e = BrowserLaunched("b1", "chromium", ["wasm", "webgpu"], 12, "n1", False)
    assert e.backend_caps == ("wasm", "webgpu")
    f = BrowserFailed("b1", "device_lost", "lost")
    assert f.category is FailureCategory.DEVICE_LOST
    c = OperationCompleted("op", 3, {"k": (1, 2)})
    assert c.duration_ms == 3.0 and type(c.duration_ms) is float and c.metrics == {"k": [1, 2]}
    original = {"shards": [{"layers": [0, 10]}]}
    s = SessionOpened("s1", "smollm2", original)
    original["shards"].append("mutated later")
    assert s.plan == {"shards": [{"layers": [0, 10]}]}  # a copy: the event does not change behind our back


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: BrowserFailed("b1", "nope", "x"), "BrowserFailed.category"),
        (lambda: BrowserFailed("b1", FailureCategory.CRASH, 5), "BrowserFailed.error"),
        (lambda: OperationCompleted("op", math.nan, {}), "duration_ms"),
        (lambda: OperationCompleted("op", math.inf, {}), "duration_ms"),
        (lambda: OperationCompleted("op", -1.0, {}), "duration_ms"),
        (lambda: OperationCompleted("op", 1.0, {"x": math.nan}), "metrics"),
        (lambda: OperationCompleted("op", 1.0, {1: "non-str key"}), "metrics"),
        (lambda: OperationCompleted("op", 1.0, {"x": object()}), "metrics"),
        (lambda: OperationCompleted("op", 1.0, [("k", 1)]), "metrics"),
        (lambda: BrowserLaunched("b1", "chromium", ("wasm",), True, "n", False), "pid"),
        (lambda: BrowserLaunched("b1", "chromium", ("wasm",), -5, "n", False), "pid"),
        (lambda: BrowserLaunched("b1", "chromium", "wasm", 5, "n", False), "backend_caps"),
        (lambda: BrowserLaunched("b1", "chromium", ("wasm",), 5, "n", 1), "standby"),
        (lambda: TokensAppended("s", (1, 2**63)), "token_ids"),
        (lambda: TokensAppended("s", (1, "2")), "token_ids"),
        (lambda: OperationStarted("", "m", "b", "infer", "d"), "op_id"),
        (lambda: SnapshotWritten(1.5, "p"), "snapshot_seq"),
    ],
)
def test_bad_fields_raise_invalid_event_error_naming_the_field(build, message):
    with pytest.raises(InvalidEventError, match=message):
        build()


def test_encode_rejects_what_json_cannot_carry_and_non_events():
    with pytest.raises(InvalidEventError, match="cannot be encoded"):
        encode(OperationStarted("op", "m\ud800", "b", "infer", "d"))  # lone surrogate
    with pytest.raises(InvalidEventError, match="not an event"):
        encode({"op_id": "x"})


@pytest.mark.parametrize(
    ("kind", "payload", "error", "message"),
    [
        ("NoSuchKind", b"{}", UnknownEventKindError, "NoSuchKind"),
        ("BrowserConnected", b"{not json", MalformedPayloadError, "not JSON"),
        ("BrowserConnected", b"[1, 2]", MalformedPayloadError, "not an object"),
        ("BrowserConnected", b"{}", MalformedPayloadError, "fields do not match"),
        ("BrowserConnected", b'{"browser_id": "b", "extra": 1}', MalformedPayloadError, "fields do not match"),
        ("BrowserConnected", b'{"browser_id": 7}', MalformedPayloadError, "browser_id"),
        ("BrowserFailed", b'{"browser_id": "b", "category": "gone", "error": ""}', MalformedPayloadError, "category"),
        ("TokensAppended", b'{"session_id": "s", "token_ids": [1, -2]}', MalformedPayloadError, "token_ids"),
    ],
)
def test_decode_errors_are_typed(kind, payload, error, message):
    with pytest.raises(error, match=message):
        decode(kind, payload)


def test_trusted_decode_still_checks_field_names():
    with pytest.raises(MalformedPayloadError, match="do not match"):
        decode("BrowserConnected", b'{"browser": "b"}', trusted=True)
    with pytest.raises(UnknownEventKindError):
        decode("Nope", b"{}", trusted=True)


def test_decode_refuses_newer_schema_versions():
    payload = encode(schema.BrowserConnected("b1"))
    assert decode("BrowserConnected", payload, SCHEMA_VERSION) == schema.BrowserConnected("b1")
    with pytest.raises(SchemaVersionError, match=str(SCHEMA_VERSION + 1)):
        decode("BrowserConnected", payload, SCHEMA_VERSION + 1)


def test_a_payload_of_an_older_schema_gets_the_fields_added_since_with_their_defaults():
    old = b'{"browser_id": "b1", "browser_type": "chromium", "backend_caps": ["wasm"], "pid": 7, ' \
          b'"node_id": "n", "standby": false}'                    # BrowserLaunched as schema 3 wrote it
    for trusted in (False, True):
        e = decode("BrowserLaunched", old, 3, trusted=trusted)
        assert e.backend == "" and e.wasm_threads == 0 and e.backend_caps == ("wasm",) and e.pid == 7
    with pytest.raises(MalformedPayloadError, match="do not match"):
        decode("BrowserLaunched", old, SCHEMA_VERSION, trusted=True)   # the current schema has the field


def test_recorded_envelope_and_log_entry():
    rec = Recorded(7, 1700000000.5, BrowserFailed("b1", FailureCategory.MEMORY, "oom"))
    assert rec.kind == "BrowserFailed" and rec.subject == "b1"
    entry = log_entry(rec)
    assert entry == {
        "seq": 7, "timestamp": 1700000000.5, "action": "BrowserFailed", "subject": "b1",
        "data": {"browser_id": "b1", "category": "memory", "error": "oom"},
    }
    orjson.dumps(entry)  # plain JSON data


def test_events_are_immutable():
    e = OperationStarted("op", "m", "b", "infer", "d")
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.op_id = "other"  # type: ignore[misc]
