"""The columnar replay (events/columnar.py) equals the reference fold, event for event.

``replay`` in events/fold.py is the definition of what each event means; ``replay_batches`` is the
fast path the store opens with. These properties compare the two on generated logs of every kind,
written through a real store and also as hand-made batches (old payloads without the trailing
newline, other schema versions, gaps). The same comparison runs on the logs of real pool runs in
``logcheck.assert_state_is_replay_of_disk`` (chaos, pool restart, ...).
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from pathlib import Path

import orjson
import pyarrow as pa
import pytest
from event_strategies import EVENTS_BY_KIND, busy_events, logs, odd_completions
from hypothesis import given, settings
from hypothesis import strategies as st

from events import columnar
from events.codec import encode
from events.columnar import replay_batches
from events.errors import SequenceGapError
from events.fold import replay
from events.schema import (
    EVENT_TYPES,
    SCHEMA_VERSION,
    BrowserHealthReported,
    BrowserLaunched,
    OperationCompleted,
    OperationStarted,
    Recorded,
    SessionOpened,
    TokensAppended,
)
from events.store import SEGMENT_SCHEMA, EventStore


def test_the_strategies_make_every_kind_of_event():
    assert {k.KIND for k in EVENTS_BY_KIND} == set(EVENT_TYPES)


def batch_of(recs: list[Recorded], newline: bool = True) -> pa.RecordBatch:
    """Records as the store lays them out; ``newline=False`` as payloads were written before it ended them."""
    payloads = [encode(r.event) if newline else orjson.dumps(r.event) for r in recs]
    return pa.record_batch([
        pa.array([r.seq for r in recs], pa.int64()), pa.array([r.ts for r in recs], pa.float64()),
        pa.array([r.kind for r in recs], pa.string()), pa.array([r.event.subject for r in recs], pa.string()),
        pa.array(payloads, pa.binary())], schema=SEGMENT_SCHEMA)


def cut(recs: list[Recorded], points: list[int]) -> list[list[Recorded]]:
    bounds = [0, *sorted(p for p in points if 0 < p < len(recs)), len(recs)]
    return [recs[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@settings(max_examples=300, deadline=None)
@given(logs(busy_events, max_size=200), st.data())
def test_columnar_replay_equals_replay(recs, data):
    """Any log, cut into batches anywhere, each batch with or without the trailing newline, folded from
    any starting state: the same PoolState as the reference."""
    points = data.draw(st.lists(st.integers(0, len(recs)), max_size=8), label="batch cuts")
    start = data.draw(st.integers(0, len(recs)), label="start after")
    newline = data.draw(st.lists(st.booleans(), min_size=9, max_size=9), label="newline per batch")
    before = replay(recs[:start])
    parts = cut(recs[start:], points)
    batches = [(batch_of(part, nl), SCHEMA_VERSION) for part, nl in zip(parts, newline, strict=False)]
    assert replay_batches(batches, before) == replay(recs[start:], before)


@settings(max_examples=100, deadline=None)
@given(logs(st.one_of(busy_events, odd_completions), max_size=60))
def test_a_page_time_of_another_type_is_ignored_as_replay_ignores_it(recs):
    assert replay_batches([(batch_of(recs), SCHEMA_VERSION)]) == replay(recs)


@settings(max_examples=40, deadline=None)
@given(logs(busy_events, max_size=300), st.data())
def test_a_store_opens_to_the_replay_of_its_records(recs, data):
    """Through a real store: append in random batches, maybe snapshot, reopen; ``project()`` (the
    columnar fold) equals ``replay`` of what ``read()`` returns."""
    events = [r.event for r in recs]
    points = data.draw(st.lists(st.integers(0, len(events)), max_size=6), label="batch cuts")
    snapshot_after = data.draw(st.integers(0, 6), label="snapshot after batch")
    root = Path(tempfile.mkdtemp())
    try:
        with EventStore.open(root, fsync="never") as store:
            for i, part in enumerate(cut(events, points)):
                store.append(part)
                if i == snapshot_after:
                    store.write_snapshot(store.last_seq, replay(store.read()))
        with EventStore.open(root, fsync="never") as store:
            reference = replay(store.read())
            assert store.project() == reference
            assert replay_batches(store.read_batches()) == reference
    finally:
        shutil.rmtree(root)


def test_a_gap_raises_where_replay_raises():
    recs = [Recorded(1, 1.0, BrowserLaunched("b1", "chromium", ("wasm",), 1, "n", False)),
            Recorded(2, 2.0, OperationStarted("o1", "m", "b1", "infer", "d")),
            Recorded(4, 3.0, OperationCompleted("o1", 5.0, {}))]
    with pytest.raises(SequenceGapError) as ref:
        replay(recs)
    with pytest.raises(SequenceGapError) as fast:
        replay_batches([(batch_of(recs), SCHEMA_VERSION)])
    assert str(fast.value) == str(ref.value)
    with pytest.raises(SequenceGapError, match="does not follow state seq 0"):
        replay_batches([(batch_of(recs[1:2]), SCHEMA_VERSION)])


def test_older_schema_versions_take_the_reference_path():
    """A batch written under an older schema version is decoded through the constructors (defaults for
    fields added since), so the columnar fold gives what replay gives for those decoded records."""
    recs = [Recorded(1, 1.0, BrowserLaunched("b1", "chromium", ("wasm",), 1, "n", False)),
            Recorded(2, 2.0, OperationStarted("o1", "m", "b1", "infer", "d")),
            Recorded(3, 3.0, OperationCompleted("o1", 5.0, {"page_ms": 4.0}))]
    assert replay_batches([(batch_of(recs), SCHEMA_VERSION - 1)]) == replay(recs)


def test_a_long_busy_log_across_chunks(monkeypatch):
    """Several chunks, hot runs broken by sessions and a relaunch: still the same state."""
    monkeypatch.setattr(columnar, "CHUNK_ROWS", 4096)
    events: list = [BrowserLaunched(f"b{i}", "chromium", ("wasm",), i, "n", False) for i in range(3)]
    for i in range(3 * 4096):
        b = f"b{i % 3}"
        events += [OperationStarted(f"o{i}", "m", b, "infer", "d"),
                   OperationCompleted(f"o{i}", 1.0 + i % 7, {"page_ms": 0.5 + i % 5} if i % 2 else {})]
        if i % 100 == 0:
            events += [SessionOpened(f"s{i}", "m", {}), TokensAppended(f"s{i}", (i % 50,)),
                       BrowserHealthReported(b, float(i), ("m",))]
        if i == 4096:
            events.append(BrowserLaunched("b1", "chromium", ("wasm",), 99, "n", False))
    events.append(OperationStarted("open-at-end", "m", "b0", "generate", "d"))
    recs = [Recorded(i + 1, 1.7e9 + i, e) for i, e in enumerate(events)]
    batches = [(batch_of(recs[i:i + 1000]), SCHEMA_VERSION) for i in range(0, len(recs), 1000)]
    folded_one_by_one = []
    reference_path = columnar._reference
    monkeypatch.setattr(columnar, "_reference", lambda d, b, *a: (folded_one_by_one.append(b.num_rows),
                                                                  reference_path(d, b, *a)))
    fast = replay_batches(batches)
    assert fast == replay(recs)
    assert not folded_one_by_one, "a chunk of a well-formed log left the columnar path"
    assert list(fast.operations) == ["open-at-end"] and fast.last_seq == len(recs)
