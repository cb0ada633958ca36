"""The on-disk format of an event segment: its Arrow schema, the checksum every batch carries, and the scan
that finds where a segment's valid prefix ends (events/store.py explains the layout and why).

A segment is an Arrow IPC stream of record batches with the columns seq, ts, kind, subject, payload. Each
batch is one group commit and carries in its custom metadata a CRC32 of its columns and the client's batch
id; a batch is valid only if its checksum matches and its seqs continue the previous batch's.
"""

from __future__ import annotations

import dataclasses
import logging
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from events.backends import Backend
from events.errors import CompactedRangeError, CorruptSegmentError, SchemaVersionError
from events.schema import SCHEMA_VERSION

log = logging.getLogger(__name__)

FORMAT = "webpool.events"
VERSION_KEY = b"webpool.schema_version"
SEGMENT_SUFFIX = ".arrows"
SNAPSHOT_SUFFIX = ".snap"

SEGMENT_SCHEMA = pa.schema(
    [
        ("seq", pa.int64()),
        ("ts", pa.float64()),
        ("kind", pa.string()),
        ("subject", pa.string()),
        ("payload", pa.binary()),
    ],
    metadata={VERSION_KEY: str(SCHEMA_VERSION).encode(), b"webpool.format": FORMAT.encode()},
)
SNAPSHOT_SCHEMA = pa.schema([("state", pa.binary())])


# --- checksums -------------------------------------------------------------------------------


def column_crc(col: pa.Array, crc: int) -> int:
    """CRC of the logical bytes of a null-free int64/float64/string/binary column with offset 0."""
    n = len(col)
    bufs = col.buffers()
    if len(bufs) == 2:  # fixed width, 8 bytes a value here
        return zlib.crc32(memoryview(bufs[1])[: n * 8], crc)
    offsets = memoryview(bufs[1])
    crc = zlib.crc32(offsets[: (n + 1) * 4], crc)
    start, end = struct.unpack_from("<i", offsets, 0)[0], struct.unpack_from("<i", offsets, n * 4)[0]
    data = bufs[2]
    if data is None:
        return crc
    return zlib.crc32(memoryview(data)[start:end], crc)


def batch_crc(batch: pa.RecordBatch, batch_id: str) -> int:
    """CRC of every column and of the batch id (so a damaged id cannot pass as another one)."""
    crc = zlib.crc32(batch_id.encode())
    for col in batch.columns:
        crc = column_crc(col, crc)
    return crc


def content_crc(batch: pa.RecordBatch) -> int:
    """CRC of what a client sent (kinds + payloads), to recognise a retried batch id."""
    return column_crc(batch.column(4), column_crc(batch.column(2), 0))


def check_batch(batch: pa.RecordBatch, meta: Any, expected_first: int) -> tuple[str | None, str]:
    """(why this batch is not a valid next batch or None, its client batch id)."""
    try:
        want = int((meta or {})[b"crc32"])
        batch_id = (meta.get(b"batch_id") or b"").decode()
    except (KeyError, ValueError, UnicodeDecodeError):
        return "missing or unreadable batch metadata", ""
    return check_batch_body(batch, want, batch_id, expected_first), batch_id


def check_batch_body(batch: pa.RecordBatch, want: int, batch_id: str, expected_first: int) -> str | None:
    if batch.num_rows == 0:
        return "empty batch"
    if batch.schema.names != SEGMENT_SCHEMA.names:
        return "wrong columns"
    for col in batch.columns:
        if col.null_count or col.offset:
            return "unexpected nulls/offset"
    try:
        batch.validate(full=True)
    except pa.ArrowInvalid as exc:
        return f"invalid batch: {exc}"
    seq = batch.column(0)
    first, last = seq[0].as_py(), seq[-1].as_py()
    if first != expected_first or last != expected_first + batch.num_rows - 1:
        return f"seq {first}..{last} where {expected_first}.. was expected"
    if want != batch_crc(batch, batch_id):
        return "checksum mismatch"
    return None


def stream_version(schema: pa.Schema, what: str) -> int:
    meta = schema.metadata or {}
    if VERSION_KEY not in meta:
        raise CorruptSegmentError(f"{what}: schema has no {VERSION_KEY.decode()}")
    try:
        version = int(meta[VERSION_KEY])
    except ValueError:
        raise CorruptSegmentError(f"{what}: unreadable {VERSION_KEY.decode()} {meta[VERSION_KEY][:20]!r}") from None
    if version < 1:
        raise CorruptSegmentError(f"{what}: impossible {VERSION_KEY.decode()} {version}")
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(f"{what} was written by schema version {version}; this code reads <= {SCHEMA_VERSION}")
    return version


# --- scanning and framing -------------------------------------------------------------------------------


class BatchCollector:
    """Sink for the IPC writer: gathers one batch's pieces so they reach the file in one write."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        data = b"".join(self.parts)
        self.parts.clear()
        return data


@dataclasses.dataclass
class ScanResult:
    rows: int = 0  # valid rows from the file's first seq on
    good_offset: int = 0  # byte offset after the last valid batch (or after EOS)
    sealed: bool = False  # an end-of-stream marker was read
    problem: str | None = None  # why scanning stopped early, if it did
    batches: list[tuple[str, int, int, int]] = dataclasses.field(default_factory=list)  # id, first, n, crc


def scan_stream(source: pa.NativeFile, first_seq: int, what: str) -> ScanResult:
    """Walk a segment batch by batch, checking each, and report where its valid prefix ends."""
    res = ScanResult()
    if source.size() == 0:
        return res
    try:
        reader = ipc.open_stream(source)
    except Exception as exc:  # fuzzed bytes raise many kinds; none may escape repair
        res.problem = f"unreadable stream header: {exc}"
        return res
    if not reader.schema.equals(SEGMENT_SCHEMA, check_metadata=False):
        res.problem = "segment schema does not match"
        return res
    try:
        stream_version(reader.schema, what)
    except CorruptSegmentError as exc:
        res.problem = str(exc)
        return res
    expected = first_seq
    while True:
        try:
            batch, meta = reader.read_next_batch_with_custom_metadata()
        except StopIteration:
            res.sealed = True
            res.good_offset = source.tell()
            return res
        except Exception as exc:  # torn or fuzzed tail
            res.problem = f"unreadable batch after seq {expected - 1}: {exc}"
            return res
        problem, batch_id = check_batch(batch, meta, expected)
        if problem is not None:
            res.problem = f"batch after seq {expected - 1}: {problem}"
            return res
        res.batches.append((batch_id, expected, batch.num_rows, content_crc(batch)))
        expected += batch.num_rows
        res.rows += batch.num_rows
        res.good_offset = source.tell()


def segment_name(first_seq: int) -> str:
    return f"segments/{first_seq:020d}{SEGMENT_SUFFIX}"


def snapshot_name(seq: int) -> str:
    return f"snapshots/{seq:020d}{SNAPSHOT_SUFFIX}"


# --- writing and reading segments ---------------------------------------------------------------


def make_batch(first: int, ts: float, kinds: list[str], subjects: list[str], payloads: list[bytes]) -> pa.RecordBatch:
    """One group commit's rows: seqs first.., all at ``ts``."""
    n = len(kinds)
    return pa.record_batch(
        [
            pa.array(np.arange(first, first + n, dtype=np.int64)),
            pa.array(np.full(n, ts, dtype=np.float64)),
            pa.array(kinds, pa.string()),
            pa.array(subjects, pa.string()),
            pa.array(payloads, pa.binary()),
        ],
        schema=SEGMENT_SCHEMA,
    )


def segment_first_seq(file_name: str) -> int | None:
    """The first seq a segment file's name (``<20 digits>.arrows``) carries; None for any other name."""
    stem = file_name[: -len(SEGMENT_SUFFIX)] if file_name.endswith(SEGMENT_SUFFIX) else ""
    return int(stem) if len(stem) == 20 and stem.isdigit() else None


def segment_files(backend: Backend) -> list[tuple[int, int]]:
    """(first seq, size) of each segment file; leftovers of a rewrite that died are removed."""
    out = []
    for name, size in backend.listdir("segments"):
        if name.endswith(".tmp"):
            backend.remove(f"segments/{name}")  # a rewrite that died before its rename
            continue
        first = segment_first_seq(name)
        if first is None:
            log.warning("ignoring unexpected file segments/%s in %s", name, backend.describe())
            continue
        out.append((first, size))
    return out


def read_segment(backend: Backend, first: int) -> Iterator[tuple[pa.RecordBatch, str, int]]:
    """(batch, batch id, schema version) of a stored segment, each checked; a bad one raises
    CorruptSegmentError."""
    rel = segment_name(first)
    try:
        src = backend.open_read(rel)
    except FileNotFoundError:
        raise CompactedRangeError(f"{rel} was removed while reading") from None
    with src:
        if src.size() == 0:
            return
        try:
            reader = ipc.open_stream(src)
        except Exception as exc:
            raise CorruptSegmentError(f"{backend.describe()}/{rel}: unreadable header: {exc}") from None
        version = stream_version(reader.schema, rel)
        expected = first
        while True:
            try:
                batch, meta = reader.read_next_batch_with_custom_metadata()
            except StopIteration:
                return
            except Exception as exc:
                raise CorruptSegmentError(
                    f"{backend.describe()}/{rel}: unreadable batch after seq {expected - 1}: {exc}") from None
            problem, batch_id = check_batch(batch, meta, expected)
            if problem is not None:
                raise CorruptSegmentError(f"{backend.describe()}/{rel}: batch after seq {expected - 1}: {problem}")
            expected += batch.num_rows
            yield batch, batch_id, version


def select_rows(batch: pa.RecordBatch, start: int, end: int, b_first: int, b_last: int,
            kind_set: pa.Array | None, subject: str | None) -> pa.RecordBatch:
    """The rows of ``batch`` (seqs b_first..b_last) with start <= seq <= end, of ``kind_set`` and about ``subject``."""
    if b_first < start or b_last > end:
        batch = batch.slice(max(0, start - b_first), min(b_last, end) - max(b_first, start) + 1)
    mask = None
    if kind_set is not None:
        mask = pc.is_in(batch.column(2), value_set=kind_set)
    if subject is not None:
        m = pc.equal(batch.column(3), pa.scalar(subject, pa.string()))
        mask = m if mask is None else pc.and_(mask, m)
    return batch if mask is None else batch.filter(mask)
