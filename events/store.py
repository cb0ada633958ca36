"""Append-only event store: Arrow IPC stream segments, group commit, snapshots, torn-tail repair.

Layout under the store's location::

    meta.json                         {"format": "webpool.events", "schema_version": N}
    LOCK                              (local disk only) flock held by the one writer
    segments/<first seq, 20 digits>.arrows   Arrow IPC streams: seq, ts, kind, subject, payload
    snapshots/<seq, 20 digits>.snap          one-row Arrow IPC stream holding state JSON
    archive/<first>-<last>.parquet           (optional) events removed by compaction

Each ``append`` is one record batch (one group commit): it is written with one write call, then made
durable by the fsync policy before ``append`` returns: ``always`` fsyncs every batch, ``interval``
fsyncs at most every ``fsync_interval_s`` (a background thread covers the quiet periods), ``never``
leaves it to the OS. Every policy survives the death of the process (the bytes are in the OS before the
ack); only ``always`` also survives a power loss.

Every batch carries a CRC32 of its columns and an optional client batch id in its custom metadata.
On open, the newest segment is checked batch by batch; anything after the last whole, valid batch (a
torn write, garbage) is cut off with a warning. Older segments are sealed; a bad one found later
raises ``CorruptSegmentError`` instead of being silently shortened. Writes always go to a new segment
after open, so a segment file is only ever appended by the process that created it.

A non-local ``pyarrow.fs`` filesystem works the same way, with two limits: there is no fsync (a
flush is all pyarrow offers) and object stores publish a file only when it is closed, so there
durability comes at segment roll. The segment being written is also kept in memory, so reads see
it on every backend.

The segment format (schema, checksums, the scan that finds a valid prefix, the checked reader) is in
events/segments.py, what opening finds on disk (the checks, the tail cut, the batch ids) in events/opening.py,
snapshot files in events/snapshots.py, the two storage backends in events/backends.py.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc

from events.backends import ArrowFile, Backend, LocalFile, backend_for
from events.codec import decode, encode
from events.columnar import replay_batches
from events.errors import (
    BatchConflictError,
    CompactedRangeError,
    InvalidEventError,
    SchemaVersionError,
    SnapshotError,
    StoreClosedError,
)
from events.fold import replay
from events.opening import check_meta, check_options, recent_batch_ids, recover_tail
from events.schema import SCHEMA_VERSION, Event, Recorded, SnapshotWritten
from events.segments import (
    SEGMENT_SCHEMA,
    BatchCollector,
    batch_crc,
    column_crc,
    content_crc,
    make_batch,
    read_segment,
    segment_files,
    segment_name,
    select_rows,
    snapshot_name,
)
from events.snapshots import Snapshot, encode_snapshot, read_snapshot, snapshot_seqs
from events.state import PoolState

log = logging.getLogger(__name__)



# --- the store ---------------------------------------------------------------------------------


class EventStore:
    """One writer's handle on an event log. Thread-safe; use ``EventStore.open``."""

    def __init__(self, backend: Backend, *, fsync: str, fsync_interval_s: float, segment_bytes: int,
                 snapshot_every: int | None, keep_snapshots: int, compression: str | None,
                 dedup_window: int) -> None:
        self._b = backend
        self._fsync = fsync
        self._fsync_interval_s = fsync_interval_s
        self._segment_bytes = segment_bytes
        self._snapshot_every = snapshot_every
        self._keep_snapshots = keep_snapshots
        self._options = ipc.IpcWriteOptions(compression=compression)
        self._lock = threading.RLock()
        self._closed = False
        self._segments: list[int] = []  # first seq of each segment, ascending
        self._last_seq = 0
        # The segment being written: file, IPC writer, its collector, its size, and its batches in memory.
        self._file: LocalFile | ArrowFile | None = None
        self._writer: ipc.RecordBatchStreamWriter | None = None
        self._collector = BatchCollector()
        self._active_first = 0
        self._active_bytes = 0
        self._active_batches: list[pa.RecordBatch] = []
        self._dirty = False
        self._last_sync = time.monotonic()
        self._dedup: collections.OrderedDict[str, tuple[int, int, int]] = collections.OrderedDict()
        self._dedup_window = dedup_window
        self._state: PoolState | None = None
        self._last_snapshot_seq = 0
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None

    # -- opening --

    @classmethod
    def open(
        cls,
        location: str | Path,
        fsync: str = "interval",
        segment_bytes: int = 64 << 20,
        snapshot_every: int | None = None,
        compression: str | None = None,
        *,
        filesystem: pafs.FileSystem | None = None,
        fsync_interval_s: float = 0.2,
        keep_snapshots: int = 2,
        dedup_window: int = 4096,
        lock_timeout_s: float = 10.0,
    ) -> EventStore:
        """Open (creating if needed) the log at ``location``: a local path, or a pyarrow.fs URI
        (``file:///...``, ``s3://...``, ``mock:///...``), or a path inside ``filesystem``.

        ``snapshot_every=N`` makes the store keep the projected ``PoolState`` current and write a
        snapshot after every N events. ``dedup_window`` batch ids are remembered (across restarts)
        so a retried ``append(..., batch_id=...)`` is recorded once.
        """
        check_options(fsync, compression, segment_bytes, snapshot_every, keep_snapshots, dedup_window,
                      fsync_interval_s, location)
        backend = backend_for(location, filesystem)
        store = cls(backend, fsync=fsync, fsync_interval_s=fsync_interval_s, segment_bytes=segment_bytes,
                    snapshot_every=snapshot_every, keep_snapshots=keep_snapshots, compression=compression,
                    dedup_window=dedup_window)
        backend.makedirs("")
        backend.lock(lock_timeout_s)
        try:
            store._load()
        except BaseException:
            backend.unlock()
            raise
        if fsync == "interval":
            store._flusher = threading.Thread(target=store._flush_loop, name="eventstore-fsync", daemon=True)
            store._flusher.start()
        return store

    def _load(self) -> None:
        b = self._b
        b.makedirs("segments")
        b.makedirs("snapshots")
        check_meta(b)
        self._segments = [first for first, _ in sorted(segment_files(b))]
        self._last_seq, tail = recover_tail(b, self._segments)
        for bid, first, n, crc in recent_batch_ids(b, self._segments, tail, self._dedup_window):
            self._remember(bid, first, n, crc)
        snaps = snapshot_seqs(self._b)
        self._last_snapshot_seq = max((s for s in snaps if s <= self._last_seq), default=0)
        if self._snapshot_every is not None:
            self._state = self.project()

    def _remember(self, batch_id: str, first: int, n: int, crc: int) -> None:
        self._dedup[batch_id] = (first, n, crc)
        self._dedup.move_to_end(batch_id)
        while len(self._dedup) > self._dedup_window:
            self._dedup.popitem(last=False)

    # -- properties --

    @property
    def last_seq(self) -> int:
        return self._last_seq

    @property
    def first_seq(self) -> int:
        """Oldest seq still readable (compaction moves it forward)."""
        with self._lock:
            return self._segments[0] if self._segments else self._last_seq + 1

    @property
    def location(self) -> str:
        return self._b.describe()

    # -- appending --

    def append(self, events: Sequence[Event], batch_id: str | None = None) -> list[Recorded]:
        """Record ``events`` as one batch; returns them with their seq, once durable under the policy.

        With a ``batch_id`` seen before (within ``dedup_window`` batches, also across restarts), nothing
        is written and the original records are returned; a different batch under the same id raises
        ``BatchConflictError``.
        """
        (outcome,) = self.append_group([(events, batch_id)])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def append_group(self, requests: Sequence[tuple[Sequence[Event], str | None]]) -> list[list[Recorded] | Exception]:
        """Group commit: record several appends, in order, with one write and one sync decision.

        Each request is ``(events, batch_id)`` with ``append``'s meaning, and stays its own batch on disk
        (its own checksum and batch id). Returns, per request, its records or the error that request alone
        caused (an invalid event or batch id, a batch id conflict). A failed write fails the whole call
        and records none of it. Every returned record is durable under the fsync policy.
        """
        outcomes: list[list[Recorded] | Exception | None] = []
        prepared: list[tuple[int, list[Event], list[bytes], str | None]] = []
        for i, (events, batch_id) in enumerate(requests):
            try:
                if batch_id is not None and (type(batch_id) is not str or not batch_id):
                    raise InvalidEventError(f"batch_id must be a non-empty str or None, got {batch_id!r}")
                events = list(events)
                prepared.append((i, events, [encode(e) for e in events], batch_id))  # encode rejects non-events
                outcomes.append(None)
            except InvalidEventError as exc:
                outcomes.append(exc)
        with self._lock:
            self._check_open()
            to_write, repeats, ids = [], [], set()
            for item in prepared:
                i, events, payloads, batch_id = item
                if not events:
                    outcomes[i] = []
                elif batch_id is not None and batch_id in ids:
                    repeats.append(item)                 # the same append twice in one group (a retry)
                elif batch_id is not None and batch_id in self._dedup:
                    outcomes[i] = self._replayed_outcome(batch_id, events, payloads)
                else:
                    to_write.append(item)
                    if batch_id is not None:
                        ids.add(batch_id)
            written = self._write_group_locked(to_write)
            for i, recs in written.items():
                outcomes[i] = recs
            for i, events, payloads, batch_id in repeats:
                outcomes[i] = self._replayed_outcome(batch_id, events, payloads)
            if written and self._state is not None:
                for i in sorted(written):
                    self._state = replay(written[i], self._state)
                if self._last_seq - self._last_snapshot_seq >= self._snapshot_every:
                    try:
                        self._write_snapshot_locked(self._state)
                    except Exception:
                        # The batches are recorded; failing their appends now would invite duplicate retries.
                        # A snapshot only shortens restarts, so log loudly and try again later.
                        log.exception("event log %s: automatic snapshot at seq %d failed",
                                      self._b.describe(), self._state.last_seq)
                        self._last_snapshot_seq = self._last_seq
        return outcomes  # type: ignore[return-value]

    def _replayed_outcome(self, batch_id: str, events: list[Event], payloads: list[bytes]
                          ) -> list[Recorded] | BatchConflictError:
        try:
            return self._replayed_batch(batch_id, [e.KIND for e in events], payloads)
        except BatchConflictError as exc:
            return exc

    def _replayed_batch(self, batch_id: str, kinds: list[str], payloads: list[bytes]) -> list[Recorded]:
        first, n, crc = self._dedup[batch_id]
        probe = pa.record_batch([pa.array(kinds, pa.string()), pa.array(payloads, pa.binary())],
                                names=["kind", "payload"])
        if n != len(kinds) or column_crc(probe.column(1), column_crc(probe.column(0), 0)) != crc:
            raise BatchConflictError(f"batch id {batch_id!r} was used for a different batch (seq {first}..)")
        log.info("batch %s already recorded at seq %d..%d; not written again", batch_id, first, first + n - 1)
        return list(self.read(first, first + n - 1))

    def _append_locked(self, events: list[Event], kinds: list[str], payloads: list[bytes],
                       batch_id: str | None) -> list[Recorded]:
        return self._write_group_locked([(0, events, payloads, batch_id)])[0]

    def _write_group_locked(self, items: list[tuple[int, list[Event], list[bytes], str | None]]
                            ) -> dict[int, list[Recorded]]:
        """Write each item as its own record batch, then all of them with one write call and one sync
        decision. On a failed write the segment is cut back to before the group and nothing is recorded."""
        if not items:
            return {}
        if self._writer is None:
            self._start_segment(self._last_seq + 1)
        before_bytes, before_seq = self._active_bytes, self._last_seq
        before_batches = len(self._active_batches)
        remembered: list[str] = []
        out: dict[int, list[Recorded]] = {}
        ts = time.time()
        try:
            for i, events, payloads, batch_id in items:
                n = len(events)
                first = self._last_seq + 1
                batch = make_batch(first, ts, [e.KIND for e in events], [e.subject for e in events], payloads)
                meta = {"crc32": str(batch_crc(batch, batch_id or "")), "batch_id": batch_id or ""}
                self._writer.write_batch(batch, custom_metadata=meta)
                self._active_batches.append(batch)
                self._last_seq = first + n - 1
                if batch_id is not None:
                    self._remember(batch_id, first, n, content_crc(batch))
                    remembered.append(batch_id)
                out[i] = [Recorded(first + k, ts, e) for k, e in enumerate(events)]
            data = self._collector.take()
            self._file.write(data)
            if self._fsync == "always":
                self._file.sync()
                self._last_sync = time.monotonic()
            elif self._fsync == "interval":
                self._dirty = True
                if time.monotonic() - self._last_sync >= self._fsync_interval_s:
                    self._sync_locked()
        except BaseException:
            for batch_id in remembered:
                self._dedup.pop(batch_id, None)
            del self._active_batches[before_batches:]
            self._last_seq = before_seq
            self._abandon_segment(before_bytes)
            raise
        self._active_bytes += len(data)
        if self._active_bytes >= self._segment_bytes:
            self._seal_segment()
        return out

    def _start_segment(self, first: int) -> None:
        self._file = self._b.create(segment_name(first))
        self._collector = BatchCollector()
        self._writer = ipc.new_stream(pa.PythonFile(self._collector, mode="w"), SEGMENT_SCHEMA,
                                      options=self._options)
        self._active_first = first
        self._active_bytes = 0
        self._active_batches = []
        if not self._segments or self._segments[-1] != first:
            self._segments.append(first)
        if self._fsync != "never":
            self._b.sync_dir("segments")

    def _seal_segment(self) -> None:
        """Close the segment being written (end-of-stream marker, fsync); the next append starts one."""
        if self._writer is None:
            return
        self._writer.close()
        self._file.write(self._collector.take())
        if self._fsync != "never":
            self._file.sync()
        self._file.close()
        self._writer = self._file = None
        self._active_batches = []
        self._dirty = False

    def _abandon_segment(self, good_bytes: int) -> None:
        """A write failed part-way: cut the segment back to its last whole batch and seal it there."""
        log.error("event log %s: write failed; cutting %s back to %d bytes",
                  self._b.describe(), segment_name(self._active_first), good_bytes)
        try:
            self._file.truncate(good_bytes)
        except OSError:
            log.exception("could not truncate; the torn tail will be repaired on the next open")
        try:
            self._file.close()
        except OSError:
            log.exception("closing the failed segment")
        self._writer = self._file = None
        self._active_batches = []
        self._collector = BatchCollector()

    def _sync_locked(self) -> None:
        if self._file is not None and self._dirty:
            self._file.sync()
        self._dirty = False
        self._last_sync = time.monotonic()

    def sync(self) -> None:
        """Make everything appended so far durable now, whatever the policy."""
        with self._lock:
            self._check_open()
            if self._file is not None:
                self._file.sync()
            self._dirty = False
            self._last_sync = time.monotonic()

    def _flush_loop(self) -> None:
        while not self._stop.wait(self._fsync_interval_s):
            with self._lock:
                if self._closed:
                    return
                if self._dirty:
                    try:
                        self._sync_locked()
                    except OSError:
                        log.exception("background fsync of the event log failed")

    # -- reading --

    def read(self, start_seq: int = 1, end_seq: int | None = None, kinds: Iterable[str] | None = None,
             subject: str | None = None) -> Iterator[Recorded]:
        """Records with start_seq <= seq <= end_seq (default: up to last_seq now), optionally only of
        ``kinds`` and/or about ``subject``, in seq order. Raises CompactedRangeError for removed seqs."""
        for batch, version in self._batches(start_seq, end_seq, kinds, subject):
            seqs = batch.column(0).to_pylist()
            tss = batch.column(1).to_pylist()
            ks = batch.column(2).to_pylist()
            payloads = batch.column(4).to_pylist()
            for seq, ts, kind, payload in zip(seqs, tss, ks, payloads, strict=True):
                yield Recorded(seq, ts, decode(kind, payload, version, trusted=True))

    def read_batches(self, start_seq: int = 1, end_seq: int | None = None) -> Iterator[tuple[pa.RecordBatch, int]]:
        """The records of ``read(start_seq, end_seq)`` as checked Arrow batches, each with the schema version
        its payloads were written under (what ``events.columnar.replay_batches`` folds)."""
        return self._batches(start_seq, end_seq, None, None)

    def read_arrow(self, start_seq: int = 1, end_seq: int | None = None, kinds: Iterable[str] | None = None,
                   subject: str | None = None) -> pa.Table:
        """The same selection as ``read``, as an Arrow table with payloads still encoded."""
        batches = [b for b, _ in self._batches(start_seq, end_seq, kinds, subject)]
        return pa.Table.from_batches(batches, schema=SEGMENT_SCHEMA)

    def tail(self, n: int = 100) -> list[Recorded]:
        """The newest ``n`` records still in the log."""
        last = self._last_seq
        return list(self.read(max(self.first_seq, last - n + 1), last))

    def _batches(self, start_seq: int, end_seq: int | None, kinds: Iterable[str] | None,
                 subject: str | None) -> Iterator[tuple[pa.RecordBatch, int]]:
        if type(start_seq) is not int or start_seq < 1:
            raise ValueError(f"start_seq must be an int >= 1, got {start_seq!r}")
        kind_set = None if kinds is None else pa.array(sorted(set(kinds)), pa.string())
        with self._lock:
            self._check_open()
            last = self._last_seq if end_seq is None else min(end_seq, self._last_seq)
            first_available = self._segments[0] if self._segments else self._last_seq + 1
            if start_seq < first_available and start_seq <= last:
                raise CompactedRangeError(f"seq {start_seq}.. was compacted away; the log starts at {first_available}")
            segments = list(self._segments)
            active_first = self._active_first if self._writer is not None else None
            active = list(self._active_batches)
        if start_seq > last:
            return
        for i, first in enumerate(segments):
            seg_end = segments[i + 1] - 1 if i + 1 < len(segments) else last
            if seg_end < start_seq or first > last:
                continue
            if first == active_first:
                source: Iterable[tuple[pa.RecordBatch, str, int]] = ((b, "", SCHEMA_VERSION) for b in active)
            else:
                source = read_segment(self._b, first)
            for batch, _meta, version in source:
                b_first = batch.column(0)[0].as_py()
                b_last = b_first + batch.num_rows - 1
                if b_last < start_seq:
                    continue
                if b_first > last:
                    break
                sel = select_rows(batch, start_seq, last, b_first, b_last, kind_set, subject)
                if sel.num_rows:
                    yield sel, version

    # -- snapshots --

    def write_snapshot(self, seq: int, state: PoolState) -> str:
        """Store ``state`` (the projection as of ``seq``) and record a SnapshotWritten event.
        Returns the snapshot's path relative to the store."""
        with self._lock:
            self._check_open()
            if not isinstance(state, PoolState):
                raise SnapshotError(f"state must be a PoolState, got {type(state).__name__}")
            if state.last_seq != seq or not 0 < seq <= self._last_seq:
                raise SnapshotError(
                    f"cannot snapshot at seq {seq}: state is at {state.last_seq}, log at {self._last_seq}")
            return self._write_snapshot_locked(state)

    def _write_snapshot_locked(self, state: PoolState) -> str:
        seq = state.last_seq
        rel = snapshot_name(seq)
        self._b.write_atomic(rel, encode_snapshot(state, self._options))
        self._last_snapshot_seq = seq
        self._prune_snapshots()
        marker = SnapshotWritten(snapshot_seq=seq, path=rel)
        recs = self._append_locked([marker], [marker.KIND], [encode(marker)], None)
        if self._state is not None:
            self._state = replay(recs, self._state)
        log.info("event log %s: snapshot at seq %d (%s)", self._b.describe(), seq, rel)
        return rel

    def _prune_snapshots(self) -> None:
        seqs = snapshot_seqs(self._b)
        for seq in seqs[: -self._keep_snapshots]:
            self._b.remove(snapshot_name(seq))

    def latest_snapshot(self) -> Snapshot | None:
        """The newest readable snapshot not beyond last_seq (a damaged one is skipped with a warning)."""
        with self._lock:
            self._check_open()
            seqs = [s for s in snapshot_seqs(self._b) if s <= self._last_seq]
        for seq in reversed(seqs):
            try:
                return Snapshot(seq, read_snapshot(self._b, seq), snapshot_name(seq))
            except (SnapshotError, SchemaVersionError) as exc:
                log.warning("event log %s: skipping snapshot %d: %s", self._b.describe(), seq, exc)
        return None

    def project(self) -> PoolState:
        """The state at last_seq from the newest usable snapshot plus the events after it."""
        last = self._last_seq
        snap = self.latest_snapshot()
        if snap is None:
            return replay_batches(self.read_batches(1, last))
        return replay_batches(self.read_batches(snap.seq + 1, last), snap.state)

    def state(self) -> PoolState:
        """The projected state now: kept current when snapshot_every is set, else computed."""
        with self._lock:
            if self._state is not None:
                return self._state
        return self.project()

    # -- compaction --

    def compact(self, archive: bool = False) -> dict[str, int]:
        """Remove sealed segments wholly behind the oldest kept snapshot (optionally archiving them
        to Parquet first). The newest segment is never removed."""
        with self._lock:
            self._check_open()
            snaps = [s for s in snapshot_seqs(self._b) if s <= self._last_seq]
            removed = 0
            if snaps:
                horizon = snaps[0]
                while len(self._segments) > 1 and self._segments[1] - 1 <= horizon:
                    first, end = self._segments[0], self._segments[1] - 1
                    if archive:
                        self._archive(first, end)
                    self._b.remove(segment_name(first))
                    self._segments.pop(0)
                    removed += 1
                if removed:
                    self._b.sync_dir("segments")
                    log.info("event log %s: compacted %d segments; log starts at seq %d",
                             self._b.describe(), removed, self._segments[0])
            return {"removed_segments": removed, "first_seq": self.first_seq, "last_seq": self._last_seq}

    def _archive(self, first: int, end: int) -> None:
        import pyarrow.parquet as pq

        table = pa.Table.from_batches([b for b, _, _ in read_segment(self._b, first)], schema=SEGMENT_SCHEMA)
        self._b.makedirs("archive")
        rel = f"archive/{first:020d}-{end:020d}.parquet"
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        self._b.write_atomic(rel, sink.getvalue().to_pybytes())

    # -- closing --

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"event store {self._b.describe()} is closed")

    def close(self) -> None:
        """Seal the segment being written, make it durable, and release the writer lock."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stop.set()
            try:
                self._seal_segment()
            finally:
                self._b.unlock()
        if self._flusher is not None:
            self._flusher.join(timeout=5)

    def __enter__(self) -> EventStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["SEGMENT_SCHEMA", "EventStore", "Snapshot"]
