"""Snapshot files: the pool's state at one seq, stored so that opening a log replays only what came after.

A snapshot is a one-row Arrow IPC stream (``snapshots/<seq, 20 digits>.snap``) holding the state as JSON
(events/state.py ``state_to_json``), with the schema and state versions in its metadata and a CRC32 of
the row; one of another state version, or damaged, is never used (the store skips it and replays more).
"""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pyarrow.ipc as ipc

from events.backends import Backend
from events.errors import SchemaVersionError, SnapshotError
from events.schema import SCHEMA_VERSION
from events.segments import SNAPSHOT_SCHEMA, SNAPSHOT_SUFFIX, VERSION_KEY, column_crc, snapshot_name, stream_version
from events.state import STATE_VERSION, PoolState, state_from_json, state_to_json


@dataclasses.dataclass(frozen=True)
class Snapshot:
    seq: int
    state: PoolState
    path: str


def encode_snapshot(state: PoolState, options: ipc.IpcWriteOptions) -> bytes:
    """The snapshot file of ``state`` (at ``state.last_seq``)."""
    batch = pa.record_batch([pa.array([state_to_json(state)], pa.binary())], schema=SNAPSHOT_SCHEMA)
    schema = SNAPSHOT_SCHEMA.with_metadata({
        VERSION_KEY: str(SCHEMA_VERSION).encode(),
        b"webpool.state_version": str(STATE_VERSION).encode(),
        b"webpool.seq": str(state.last_seq).encode(),
    })
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, schema, options=options) as w:
        w.write_batch(batch, custom_metadata={"crc32": str(column_crc(batch.column(0), 0))})
    return sink.getvalue().to_pybytes()


def snapshot_seqs(backend: Backend) -> list[int]:
    """Seqs of the stored snapshots, ascending; leftovers of a write that died are removed."""
    out = []
    for name, _ in backend.listdir("snapshots"):
        stem = name[: -len(SNAPSHOT_SUFFIX)] if name.endswith(SNAPSHOT_SUFFIX) else ""
        if len(stem) == 20 and stem.isdigit():
            out.append(int(stem))
        elif name.endswith(".tmp"):
            backend.remove(f"snapshots/{name}")
    return sorted(out)


def read_snapshot(backend: Backend, seq: int) -> PoolState:
    """The state stored at ``seq``, checked; SnapshotError (or SchemaVersionError) if it cannot be used."""
    rel = snapshot_name(seq)
    try:
        with backend.open_read(rel) as src:
            reader = ipc.open_stream(src)
            meta = reader.schema.metadata or {}
            stream_version(reader.schema, rel)
            if int(meta.get(b"webpool.state_version", b"0")) != STATE_VERSION:
                raise SnapshotError(f"{rel}: state version {meta.get(b'webpool.state_version')!r}, "
                                    f"this code uses {STATE_VERSION}")
            batch, bmeta = reader.read_next_batch_with_custom_metadata()
            col = batch.column(0)
            if len(col) != 1 or int(bmeta[b"crc32"]) != column_crc(col, 0):
                raise SnapshotError(f"{rel}: checksum mismatch")
            state = state_from_json(col[0].as_py())
    except (SnapshotError, SchemaVersionError):
        raise
    except Exception as exc:  # any damage makes this snapshot unusable, not the log
        raise SnapshotError(f"{rel}: unreadable: {exc!r}") from None
    if state.last_seq != seq:
        raise SnapshotError(f"{rel}: holds state at seq {state.last_seq}")
    return state
