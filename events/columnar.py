"""Replay at Arrow speed: the store's record batches folded column by column.

``replay_batches`` returns exactly what ``events.fold.replay`` returns for the same records (tests
check it on generated logs of every event kind and on the logs of real pool runs); it is only faster.

How. Payloads of the *hot* kinds (operation start / completion / failure, tokens, health reports:
nearly all of a busy log) are decoded per kind by Arrow's JSON reader in one call per chunk of the
log (each payload ends in a newline, so a payload column is newline-delimited JSON as it lies). Their
effects are then folded in bulk, in three families that touch disjoint parts of the state:

- operations: ``operations``, the browsers' ``last_active_ts`` / ``failures``, ``perf`` (numpy passes);
- tokens: the open sessions' token lists;
- health: ``resources`` (only each browser's last report stays).

Every other (*cold*) event goes through the reference handler, one at a time, in seq order; before
it, the families whose state it reads or writes are brought up to date (``_FLUSHES``). None of the hot
kinds adds or removes a browser or a session, which is why a family can wait until a cold event
needs it. Whatever the bulk path does not expect (another schema version, a gap in seq, a payload
that is not what its schema says) sends the chunk through the reference path, which then decides,
and raises, exactly as ``replay`` does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson

from events.codec import decode
from events.errors import FailureCategory
from events.fold import Draft, step
from events.schema import (
    SCHEMA_VERSION,
    BrowserHealthReported,
    HedgeSent,
    HedgeWon,
    ModelLoaded,
    ModelUnloaded,
    ModelWarmedUp,
    OperationCompleted,
    OperationFailed,
    OperationStarted,
    PoolConfigured,
    PoolScaled,
    Recorded,
    RecoveryCompleted,
    RecoveryStepFinished,
    RequestRejected,
    SessionClosed,
    SessionOpened,
    SessionResumed,
    ShardPromoted,
    SnapshotWritten,
    TokensAppended,
)
from events.state import MEASURED_KINDS, PERF_WINDOW, OperationState, PerfWindow, PoolState, ResourceState

CHUNK_ROWS = 1 << 18     # batches are joined up to this many rows, so one JSON parse covers many of them

_STARTED, _COMPLETED, _FAILED, _TOKENS, _HEALTH = (
    k.KIND for k in (OperationStarted, OperationCompleted, OperationFailed, TokensAppended, BrowserHealthReported))
_HOT = pa.array([_STARTED, _COMPLETED, _FAILED, _TOKENS, _HEALTH], pa.string())
S, C, F, T, H = range(5)   # index in _HOT
OPS, TOKENS, HEALTH = "operations", "tokens", "health"
_FAMILIES = (OPS, TOKENS, HEALTH)

# Which families a cold event must find up to date. A kind not named here reads or writes browsers
# (or may, in a later version): it waits for all three, which is always correct.
_FLUSHES: dict[str, tuple[str, ...]] = {
    **{k.KIND: () for k in (ModelLoaded, ModelUnloaded, ModelWarmedUp, PoolScaled, PoolConfigured, RequestRejected,
                            SnapshotWritten, RecoveryStepFinished, RecoveryCompleted, HedgeSent, HedgeWon)},
    **{k.KIND: (TOKENS,) for k in (SessionOpened, SessionResumed, ShardPromoted, SessionClosed)},
}

# Explicit schemas: a payload of another shape fails to parse, and its chunk takes the reference path.
_STARTED_SCHEMA = pa.schema([(n, pa.string()) for n in ("op_id", "model", "browser_id", "kind", "input_digest")])
_COMPLETED_SCHEMA = pa.schema([("op_id", pa.string()), ("duration_ms", pa.float64()),
                               ("metrics", pa.struct([("page_ms", pa.float64()), ("rows", pa.int64()),
                                                      ("batch_requests", pa.int64())]))])
_FAILED_SCHEMA = pa.schema([("op_id", pa.string()), ("category", pa.string()), ("error", pa.string())])
_TOKENS_SCHEMA = pa.schema([("session_id", pa.string()), ("token_ids", pa.list_(pa.int64()))])
_CATEGORIES = pa.array([c.value for c in FailureCategory], pa.string())


class _NotBulk(Exception):
    """This chunk holds something the bulk fold does not handle: fold it one record at a time."""


def replay_batches(batches: Iterable[tuple[pa.RecordBatch, int]], state: PoolState | None = None) -> PoolState:
    """Fold the store's batches (``(batch, schema version)``, columns seq, ts, kind, subject, payload, in
    seq order, starting at ``state.last_seq + 1``) onto ``state``; equals ``replay`` of their records."""
    d = Draft(state if state is not None else PoolState())
    for chunk, version in _chunks(batches):
        seq = chunk.column(0).to_numpy()
        if version != SCHEMA_VERSION or seq[0] != d.last_seq + 1 or not (np.diff(seq) == 1).all():
            _reference(d, chunk, version, 0, chunk.num_rows)   # raises SequenceGapError where replay does
            continue
        try:
            fold = _Chunk(chunk)
        except _NotBulk:
            _reference(d, chunk, version, 0, chunk.num_rows)
            continue
        fold.into(d)
    return d.freeze()


def _chunks(batches: Iterable[tuple[pa.RecordBatch, int]]) -> Iterator[tuple[pa.RecordBatch, int]]:
    """Consecutive batches of one schema version joined, up to CHUNK_ROWS rows each."""
    pending: list[pa.RecordBatch] = []
    rows, version = 0, None
    for batch, v in batches:
        if batch.num_rows == 0:
            continue
        if pending and (v != version or rows + batch.num_rows > CHUNK_ROWS):
            yield pa.concat_batches(pending), version
            pending, rows = [], 0
        pending.append(batch)
        rows += batch.num_rows
        version = v
    if pending:
        yield pa.concat_batches(pending), version


def _reference(d: Draft, batch: pa.RecordBatch, version: int, start: int, end: int) -> None:
    part = batch.slice(start, end - start)
    for seq, ts, kind, payload in zip(part.column(0).to_pylist(), part.column(1).to_pylist(),
                                      part.column(2).to_pylist(), part.column(4).to_pylist(), strict=True):
        step(d, Recorded(seq, ts, decode(kind, payload, version, trusted=True)))


def _ndjson(payloads: pa.Array) -> pa.Buffer:
    """The payloads as one newline-delimited JSON buffer: their own bytes when each ends in a newline
    (as ``codec.encode`` writes them), else a copy with newlines put in (logs written before that)."""
    payloads = pa.concat_arrays([payloads]) if payloads.offset else payloads
    offsets = np.frombuffer(payloads.buffers()[1], np.int32, len(payloads) + 1)
    data = np.frombuffer(payloads.buffers()[2], np.uint8, offsets[-1]) if offsets[-1] else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    if (lengths > 0).all() and (data[offsets[1:] - 1] == 10).all():
        return pa.py_buffer(data)
    return pa.py_buffer(np.insert(data, offsets[1:], 10))


def _read_json(payloads: pa.Array, schema: pa.Schema, free_below: bool = False) -> dict[str, pa.Array]:
    """Parse one payload per row with ``schema`` into its columns; any other shape raises _NotBulk.
    ``free_below``: below the top level there may be more fields than the schema names (a free dict)."""
    if len(payloads) == 0:
        return {name: pa.array([], schema.field(name).type) for name in schema.names}
    try:
        table = pajson.read_json(pa.BufferReader(_ndjson(payloads)), parse_options=pajson.ParseOptions(
            explicit_schema=schema, unexpected_field_behavior="infer" if free_below else "error"))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise _NotBulk(str(exc)) from None
    if table.num_rows != len(payloads) or table.schema.names != schema.names:
        raise _NotBulk("payloads do not have the expected fields")
    columns = {name: table.column(name).combine_chunks() for name in schema.names}
    if any(col.null_count for col in columns.values()):
        raise _NotBulk("a payload lacks a field")
    return columns


def _index(rows: np.ndarray, n: int) -> np.ndarray:
    """For each of n positions, its index in ``rows`` (-1 where absent)."""
    out = np.full(n, -1, np.int64)
    out[rows] = np.arange(len(rows))
    return out


class _Chunk:
    """One chunk of the log: its hot payloads decoded, and the fold of it into a draft."""

    def __init__(self, chunk: pa.RecordBatch) -> None:
        n = chunk.num_rows
        self.chunk = chunk
        self.seq = chunk.column(0).to_numpy()
        self.ts = chunk.column(1).to_numpy()
        hot = pc.index_in(chunk.column(2), value_set=_HOT).fill_null(-1).to_numpy(zero_copy_only=False)
        self.kind = hot.astype(np.int8)
        subject, payload = chunk.column(3), chunk.column(4)
        rows = {k: np.flatnonzero(self.kind == k) for k in range(5)}

        # Operations: positions (in order), type, and where each start / completion / failure was decoded.
        self.ops_pos = np.flatnonzero((self.kind >= S) & (self.kind <= F))
        self.ops_type = self.kind[self.ops_pos]
        self.ops_subject = subject.take(self.ops_pos)
        self.started = _read_json(payload.take(rows[S]), _STARTED_SCHEMA)
        self.completed = _read_json(payload.take(rows[C]), _COMPLETED_SCHEMA, free_below=True)
        self.failed = _read_json(payload.take(rows[F]), _FAILED_SCHEMA)
        for k, cols in ((S, self.started), (C, self.completed), (F, self.failed)):
            if not cols["op_id"].equals(subject.take(rows[k])):
                raise _NotBulk("an op_id differs from its record's subject")
        categories = self.failed["category"]
        if len(categories) and not pc.all(pc.is_in(categories, value_set=_CATEGORIES)).as_py():
            raise _NotBulk("unknown failure category")
        self.start_of = _index(rows[S], n)[self.ops_pos]
        self.completion_of = _index(rows[C], n)[self.ops_pos]
        self.failure_of = _index(rows[F], n)[self.ops_pos]
        page = self.completed["metrics"].field("page_ms")
        duration = self.completed["duration_ms"].to_numpy(zero_copy_only=False)
        # What _measure records for a completion (state._service_ms): the page's own time where it reported
        # one, per row where a request had several.
        service = np.where(page.is_null().to_numpy(zero_copy_only=False), duration,
                           page.fill_null(0.0).to_numpy(zero_copy_only=False))
        per = self.completed["metrics"].field("rows").fill_null(1).to_numpy(zero_copy_only=False)
        self.service_ms = np.where(per > 1, service / np.maximum(per, 1), service)
        self.duration_ms = duration
        self.batched = self.completed["metrics"].field("batch_requests").is_valid().to_numpy(zero_copy_only=False)
        self.browsers, self.b_code = _codes(self.started["browser_id"])
        self.models, self.m_code = _codes(self.started["model"])
        self.kinds, self.k_code = _codes(self.started["kind"])

        # Tokens: each row's session and token list, as Python values (the fold is a loop over rows).
        self.tokens_pos = rows[T]
        tokens = _read_json(payload.take(rows[T]), _TOKENS_SCHEMA)
        if not tokens["session_id"].equals(subject.take(rows[T])):
            raise _NotBulk("a session_id differs from its record's subject")
        self.tokens_session = tokens["session_id"].to_pylist()
        self.tokens_flat = tokens["token_ids"].flatten().to_pylist()
        self.tokens_offsets = tokens["token_ids"].offsets.to_numpy().tolist()

        # Health: the browser of each report (its subject, which the store takes from the event itself); a
        # report is decoded only if it ends up its browser's last.
        self.health_pos = rows[H]
        self.health_browser = subject.take(rows[H]).to_pylist()
        self.flushed = dict.fromkeys(_FAMILIES, 0)   # position up to which each family is in the draft

    def into(self, d: Draft) -> None:
        kinds = self.chunk.column(2)
        payloads = self.chunk.column(4)
        for p in np.flatnonzero(self.kind < 0).tolist():
            kind = kinds[p].as_py()
            for family in _FLUSHES.get(kind, _FAMILIES):
                self._flush(d, family, p)
            d.last_seq = int(self.seq[p]) - 1
            step(d, Recorded(int(self.seq[p]), float(self.ts[p]),
                              decode(kind, payloads[p].as_py(), SCHEMA_VERSION, trusted=True)))
        for family in _FAMILIES:
            self._flush(d, family, len(self.seq))
        d.last_seq = int(self.seq[-1])
        d.last_ts = float(self.ts[-1])

    def _flush(self, d: Draft, family: str, end: int) -> None:
        start = self.flushed[family]
        if start >= end:
            return
        self.flushed[family] = end
        if family == OPS:
            lo, hi = np.searchsorted(self.ops_pos, (start, end))
            if hi > lo:
                self._operations(d, int(lo), int(hi))
        elif family == TOKENS:
            lo, hi = np.searchsorted(self.tokens_pos, (start, end))
            self._tokens(d, int(lo), int(hi))
        else:
            lo, hi = np.searchsorted(self.health_pos, (start, end))
            self._health(d, int(lo), int(hi))

    # --- operations ---

    def _operations(self, d: Draft, lo: int, hi: int) -> None:
        """Fold ops rows lo..hi-1 (all operation events between two cold events that need them)."""
        n = hi - lo
        typ = self.ops_type[lo:hi]
        encoded = pc.dictionary_encode(self.ops_subject.slice(lo, n))
        codes = encoded.indices.to_numpy(zero_copy_only=False)
        op_ids = encoded.dictionary
        open_ops = d.r("operations")
        initially_open = np.zeros(len(op_ids), bool)
        if open_ops:
            initially_open = pc.is_in(op_ids, value_set=pa.array(list(open_ops), pa.string())).to_numpy(
                zero_copy_only=False)

        # Each op's events in order. A start opens the op unless it is open (an anomaly); a completion or
        # failure closes it if it is open (else an anomaly). So an op is open after its event iff that event
        # is a start, and open before it iff its previous event was a start (or, for its first, it was open).
        order = np.argsort(codes, kind="stable")
        g_codes, g_type = codes[order], typ[order]
        first = np.r_[True, g_codes[1:] != g_codes[:-1]]
        last = np.r_[g_codes[1:] != g_codes[:-1], True]
        is_start = g_type == S
        open_before = np.where(first, initially_open[g_codes], np.r_[False, is_start[:-1]])
        g_valid = np.where(is_start, ~open_before, open_before)
        idx = np.arange(n)
        group_first = np.maximum.accumulate(np.where(first, idx, 0))
        # The start that opened the op an event closes: the last valid start before it in its group.
        opener = np.maximum.accumulate(np.where(g_valid & is_start, idx, group_first - 1))
        valid = np.empty(n, bool)
        valid[order] = g_valid
        opened_here = opener >= group_first
        opener_row = np.full(n, -1)                        # (sliced) ops row of the opening start
        opener_row[order[opened_here]] = order[opener[opened_here]]

        # Who each valid event is about, (browser, model, kind): from its opening start, or from the state
        # for an op that was open before these rows.
        start_of = self.start_of[lo:hi]
        browsers, models, kinds = self.browsers, self.models, self.kinds   # may grow below; codes stay valid
        starts = valid & (typ == S)
        closes = valid & (typ != S)
        src = np.where(starts, start_of, np.where(opener_row >= 0, start_of[np.maximum(opener_row, 0)], -1))
        who = np.full((n, 3), -1)
        from_here = (starts | closes) & (src >= 0)
        for col, code in enumerate((self.b_code, self.m_code, self.k_code)):
            who[from_here, col] = code[src[from_here]]
        for row in np.flatnonzero(closes & (src < 0)).tolist():
            op = open_ops[op_ids[codes[row]].as_py()]
            who[row] = (_code_of(browsers, op.browser_id), _code_of(models, op.model), _code_of(kinds, op.kind))

        # After these rows an op is open iff its last event is a start. Its state then comes from its last
        # valid start; if every start was a duplicate, it keeps the state it had.
        last_valid_start = np.maximum.accumulate(np.where(g_valid & is_start, idx, group_first - 1))
        ends_open = last & is_start
        for k in np.flatnonzero(last & (ends_open != initially_open[g_codes])
                                | ends_open & (last_valid_start >= group_first)).tolist():
            op_id = op_ids[g_codes[k]].as_py()
            if not ends_open[k]:
                del d.w("operations")[op_id]
                continue
            row = int(order[last_valid_start[k]])
            s, pos = int(start_of[row]), int(self.ops_pos[lo + row])
            st = self.started
            d.w("operations")[op_id] = OperationState(
                op_id=op_id, model=st["model"][s].as_py(), browser_id=st["browser_id"][s].as_py(),
                kind=st["kind"][s].as_py(), input_digest=st["input_digest"][s].as_py(),
                started_seq=int(self.seq[pos]), started_ts=float(self.ts[pos]))

        self._touch_browsers(d, lo, valid, typ, who[:, 0], browsers)
        self._perf(d, lo, closes, typ, who, browsers, models, kinds)
        self._count_operations(d, lo, hi, valid, typ)

    def _touch_browsers(self, d: Draft, lo: int, valid: np.ndarray, typ: np.ndarray, b_code: np.ndarray,
                        browsers: list[str]) -> None:
        """Every valid operation event sets its browser's last_active_ts; a completion also resets failures."""
        rows = np.flatnonzero(valid)
        if not len(rows):
            return
        last = np.full(len(browsers), -1)
        np.maximum.at(last, b_code[rows], rows)
        completed = np.zeros(len(browsers), bool)
        completed[b_code[rows[typ[rows] == C]]] = True
        known = d.r("browsers")
        for code in np.flatnonzero(last >= 0).tolist():
            b = known.get(browsers[code])
            if b is None:
                continue
            ts = float(self.ts[self.ops_pos[lo + last[code]]])
            d.w("browsers")[b.browser_id] = (dataclasses.replace(b, failures=0, last_active_ts=ts) if completed[code]
                                             else dataclasses.replace(b, last_active_ts=ts))

    def _perf(self, d: Draft, lo: int, closes: np.ndarray, typ: np.ndarray, who: np.ndarray,
              browsers: list[str], models: list[str], kinds: list[str]) -> None:
        """Closed operations of a measured kind go into their (browser, model) window, as ``_measure`` does."""
        measured_kind = np.array([k in MEASURED_KINDS for k in kinds] + [False], bool)
        rows = np.flatnonzero(closes & measured_kind[who[:, 2]])
        if not len(rows):
            return
        keys = who[rows, 0] * (len(models) + 1) + who[rows, 1]
        completion_of = self.completion_of[lo:]
        for key in np.unique(keys).tolist():
            mine = rows[keys == key]
            b, m = browsers[who[mine[0], 0]], models[who[mine[0], 1]]
            ok = typ[mine[-PERF_WINDOW:]] == C
            completed = mine[typ[mine] == C]
            with_ms = completed[~self.batched[completion_of[completed]]][-PERF_WINDOW:]
            w = d.r("perf").get((b, m)) or PerfWindow(b, m)
            d.w("perf")[(b, m)] = dataclasses.replace(
                w, recent_ms=(*w.recent_ms, *self.service_ms[completion_of[with_ms]].tolist())[-PERF_WINDOW:],
                recent_ok=(*w.recent_ok, *ok.tolist())[-PERF_WINDOW:])

    def _count_operations(self, d: Draft, lo: int, hi: int, valid: np.ndarray, typ: np.ndarray) -> None:
        for k, name in ((S, "operations_started"), (C, "operations_completed"), (F, "operations_failed")):
            mine = typ == k
            _add(d, name, int((valid & mine).sum()))
            _add(d, "anomaly." + _HOT[k].as_py(), int((~valid & mine).sum()))
        completions = self.completion_of[lo:hi][valid & (typ == C)]
        if len(completions):
            # Added one by one in order, as the reference does (np.cumsum adds sequentially).
            m = d.w("metrics")
            m["operation_ms_total"] = float(np.cumsum(np.r_[m.get("operation_ms_total", 0),
                                                            self.duration_ms[completions]])[-1])
        failures = self.failure_of[lo:hi][valid & (typ == F)]
        if len(failures):
            categories = self.failed["category"].take(failures).value_counts()
            for cat, count in zip(categories.field("values").to_pylist(), categories.field("counts").to_pylist(),
                                  strict=True):
                _add(d, "operations_failed." + cat, count)

    # --- tokens and health ---

    def _tokens(self, d: Draft, lo: int, hi: int) -> None:
        sessions = d.r("sessions")
        added: dict[str, list[int]] = {}
        anomalies = count = 0
        offsets, flat = self.tokens_offsets, self.tokens_flat
        for i in range(lo, hi):
            sid = self.tokens_session[i]
            if sid not in sessions:
                anomalies += 1
                continue
            added.setdefault(sid, []).extend(flat[offsets[i]:offsets[i + 1]])
            count += offsets[i + 1] - offsets[i]
        _add(d, "anomaly." + _TOKENS, anomalies)
        if added:
            for sid, ids in added.items():
                s = sessions[sid]
                d.w("sessions")[sid] = dataclasses.replace(s, tokens=s.tokens + tuple(ids))
            m = d.w("metrics")
            m["tokens_appended"] = m.get("tokens_appended", 0) + count

    def _health(self, d: Draft, lo: int, hi: int) -> None:
        """Each known browser keeps its last report; reports about unknown browsers count as anomalies."""
        known = d.r("browsers")
        last: dict[str, int] = {}
        anomalies = 0
        for i in range(lo, hi):
            if self.health_browser[i] in known:
                last[self.health_browser[i]] = i
            else:
                anomalies += 1
        _add(d, "anomaly." + _HEALTH, anomalies)
        payloads = self.chunk.column(4)
        for browser_id, i in last.items():
            pos = int(self.health_pos[i])
            e = decode(_HEALTH, payloads[pos].as_py(), SCHEMA_VERSION, trusted=True)
            d.w("resources")[browser_id] = ResourceState(
                browser_id=browser_id, memory_mb=e.memory_mb, reported_models=e.loaded,
                reported_seq=int(self.seq[pos]), reported_ts=float(self.ts[pos]))


def _codes(column: pa.Array) -> tuple[list[str], np.ndarray]:
    """Distinct values (a list that may grow) and each row's index into it."""
    encoded = pc.dictionary_encode(column)
    return encoded.dictionary.to_pylist(), encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)


def _code_of(values: list[str], value: str) -> int:
    try:
        return values.index(value)
    except ValueError:
        values.append(value)
        return len(values) - 1


def _add(d: Draft, key: str, n: int) -> None:
    """``d.count(key)`` n times (no key written when n is 0, as no call would write one)."""
    if n:
        d.count(key, n)


__all__ = ["replay_batches"]
