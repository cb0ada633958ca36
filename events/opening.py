"""What opening an event log finds on disk, before anything is written (``EventStore.open`` in
events/store.py, under the writer's lock): the options checked, the format and schema version checked, the
newest segment's torn or corrupt tail cut back to whole batches, and the client batch ids to remember so a
retried append is recorded once.
"""

from __future__ import annotations

import logging
from pathlib import Path

import orjson

from events.backends import Backend
from events.errors import CorruptSegmentError, SchemaVersionError, StoreConfigError
from events.schema import SCHEMA_VERSION
from events.segments import FORMAT, ScanResult, content_crc, read_segment, scan_stream, segment_name

log = logging.getLogger("events.store")     # the store's own messages, wherever the code sits

FSYNC_POLICIES = ("always", "interval", "never")
COMPRESSIONS = (None, "zstd", "lz4")


def check_options(fsync: str, compression: str | None, segment_bytes: int, snapshot_every: int | None,
                  keep_snapshots: int, dedup_window: int, fsync_interval_s: float, location: object) -> None:
    """Raise StoreConfigError naming the first option ``EventStore.open`` cannot work with."""
    if fsync not in FSYNC_POLICIES:
        raise StoreConfigError(f"fsync must be one of {FSYNC_POLICIES}, got {fsync!r}")
    if compression not in COMPRESSIONS:
        raise StoreConfigError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    if type(segment_bytes) is not int or segment_bytes < 4096:
        raise StoreConfigError(f"segment_bytes must be an int >= 4096, got {segment_bytes!r}")
    if snapshot_every is not None and (type(snapshot_every) is not int or snapshot_every < 1):
        raise StoreConfigError(f"snapshot_every must be None or an int >= 1, got {snapshot_every!r}")
    if type(keep_snapshots) is not int or keep_snapshots < 1:
        raise StoreConfigError(f"keep_snapshots must be an int >= 1, got {keep_snapshots!r}")
    if type(dedup_window) is not int or dedup_window < 0:
        raise StoreConfigError(f"dedup_window must be an int >= 0, got {dedup_window!r}")
    if not fsync_interval_s > 0:
        raise StoreConfigError(f"fsync_interval_s must be > 0, got {fsync_interval_s!r}")
    if not isinstance(location, str | Path) or not str(location):
        raise StoreConfigError(f"location must be a non-empty str or Path, got {location!r}")


def check_meta(b: Backend) -> None:
    """The log is an event store of a schema this code reads (written as the current one if new or older)."""
    if b.exists("meta.json"):
        try:
            meta = orjson.loads(b.read_bytes("meta.json"))
            version = int(meta["schema_version"])
            fmt = meta["format"]
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise CorruptSegmentError(f"{b.describe()}/meta.json is unreadable: {exc!r}") from None
        if fmt != FORMAT:
            raise StoreConfigError(f"{b.describe()} holds {fmt!r}, not an event store")
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{b.describe()} was written by schema version {version}; this code reads <= {SCHEMA_VERSION}")
        if version == SCHEMA_VERSION:
            return
    b.write_atomic("meta.json", orjson.dumps({"format": FORMAT, "schema_version": SCHEMA_VERSION}))


def recover_tail(b: Backend, segments: list[int]) -> tuple[int, ScanResult]:
    """The last seq, from the newest segment, and that segment's scan; a torn or corrupt tail is cut back to
    whole batches, and a newest segment with no whole batch is removed (from ``segments`` too)."""
    while segments:
        first = segments[-1]
        rel = segment_name(first)
        size = b.size(rel)
        with b.open_read(rel) as src:
            res = scan_stream(src, first, rel)
        if res.rows == 0 and len(segments) > 1:
            # Nothing valid here: drop the file and let the previous segment define the end.
            if size:
                log.warning("event log %s: removing %s (%s; %d bytes, no whole batch)",
                            b.describe(), rel, res.problem, size)
            b.remove(rel)
            segments.pop()
            continue
        if res.good_offset < size:
            log.warning(
                "event log %s: cut %s from %d to %d bytes (%s); kept %d events up to seq %d",
                b.describe(), rel, size, res.good_offset, res.problem or "data after end of stream",
                res.rows, first + res.rows - 1,
            )
            # A zero-length file stays as a placeholder whose name carries the next seq.
            b.truncate(rel, res.good_offset)
        return first + res.rows - 1, res
    return 0, ScanResult()


def recent_batch_ids(b: Backend, segments: list[int], tail: ScanResult, window: int
                     ) -> list[tuple[str, int, int, int]]:
    """(batch id, first seq, rows, content crc) of the newest ``window`` batches that carry an id, oldest
    first; older segments are read only as needed."""
    found: list[tuple[str, int, int, int]] = list(tail.batches)
    for first in reversed(segments[:-1]):
        if sum(1 for x in found if x[0]) >= window:
            break
        older = []
        try:
            for batch, bid, _ in read_segment(b, first):
                older.append((bid, batch.column(0)[0].as_py(), batch.num_rows, content_crc(batch)))
        except CorruptSegmentError as exc:
            # Dedup is best effort across a damaged sealed segment; reads of it will still fail loudly.
            log.warning("event log %s: batch ids before seq %d not loaded: %s", b.describe(), first, exc)
            break
        found = older + found
    return [x for x in found if x[0]]
