"""`webpool log tail | show | replay`: the event log read straight from its folder, never written."""

from __future__ import annotations

import argparse
import bisect
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table
from rich.text import Text

from webpool import render
from webpool.render import entry_time, table

if TYPE_CHECKING:
    import pyarrow as pa

    from events.schema import Recorded
    from events.state import PoolState
    from events.store import EventStore


# # EventStore has no read-only mode: opening one takes the writer's lock (so it waits for, then fails
# against, a running StateLog), writes meta.json and cuts a torn tail in place. The log commands
# therefore copy the segment files they need (plus meta.json and snapshots) into a private temporary
# folder and open that copy: the log itself is never written, and reading works while a pool writes.
# A batch the writer is still in the middle of is cut from the copy only.

_DATA_CHARS = 240  # the table's data column; --json prints everything


def _events_root() -> Path:
    # Where the pool puts its logs: cache_dir()/events/<pool name>. cache_dir() itself would create the
    # cache folder, and reading a log creates nothing.
    return Path(os.environ.get("WEBPOOL_CACHE", Path.home() / ".cache" / "webpool")) / "events"


def _log_location(args: argparse.Namespace) -> str:
    from events.errors import StoreConfigError

    if args.dir:
        return args.dir
    root = _events_root()
    if args.name:
        return str(root / args.name)
    names = sorted(p.name for p in root.iterdir() if (p / "meta.json").is_file()) if root.is_dir() else []
    if len(names) == 1:
        return str(root / names[0])
    found = f"logs there: {', '.join(names)}" if names else "no logs there"
    raise StoreConfigError(f"say which log to read with --name NAME (under {root}; {found}) or --dir PATH")


class _LogCopy:
    """The files of one event log, copied on demand into a private folder and opened there."""

    def __init__(self, location: str, workdir: Path) -> None:
        import pyarrow as pa
        import pyarrow.fs as pafs

        from events.errors import StoreConfigError
        from events.segments import segment_first_seq

        self.location = location
        if "://" in location:
            try:
                self.fs, self.root = pafs.FileSystem.from_uri(location)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as exc:
                raise StoreConfigError(f"cannot read {location!r}: {exc}") from None
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(location).absolute())
        self.root = self.root.rstrip("/")
        if not (self._is_file("meta.json") or self._is_dir("segments")):
            raise StoreConfigError(f"no event log at {location} (no meta.json or segments/ there); "
                                   "pass --dir PATH or --name NAME")
        infos = self.fs.get_file_info(pafs.FileSelector(f"{self.root}/segments", allow_not_found=True))
        firsts = (segment_first_seq(i.base_name) for i in infos)
        self.segments = sorted(first for first in firsts if first is not None)
        self.copy_root = workdir / "log"
        (self.copy_root / "segments").mkdir(parents=True)
        self._copied: set[str] = set()
        self.store: EventStore | None = None
        if self._is_file("meta.json"):
            self._copy("meta.json")

    def _is_file(self, rel: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(f"{self.root}/{rel}").type == pafs.FileType.File

    def _is_dir(self, rel: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(f"{self.root}/{rel}").type == pafs.FileType.Directory

    def _copy(self, rel: str) -> None:
        if rel in self._copied:
            return
        target = self.copy_root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self.fs.open_input_stream(f"{self.root}/{rel}") as src, open(target, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
        except FileNotFoundError:
            target.unlink(missing_ok=True)  # compacted away since it was listed: the copy starts later
        self._copied.add(rel)

    def open(self, first_index: int = 0, last_index: int | None = None, snapshots: bool = False) -> EventStore:
        """Open the copy holding segments[first_index..last_index] (and the snapshots)."""
        import pyarrow.fs as pafs

        from events.segments import SNAPSHOT_SUFFIX, segment_name
        from events.store import EventStore

        self.close()
        chosen = self.segments[first_index: None if last_index is None else last_index + 1]
        for first in chosen:
            self._copy(segment_name(first))
        if snapshots:
            infos = self.fs.get_file_info(pafs.FileSelector(f"{self.root}/snapshots", allow_not_found=True))
            for info in infos:
                if info.base_name.endswith(SNAPSHOT_SUFFIX):
                    self._copy(f"snapshots/{info.base_name}")
        self.store = EventStore.open(self.copy_root, fsync="never")
        return self.store

    def index_of(self, seq: int) -> int:
        """Index of the segment that holds ``seq`` (0 if it is before the first one)."""
        return max(0, bisect.bisect_right(self.segments, seq) - 1)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None


@contextlib.contextmanager
def log_copy(args: argparse.Namespace) -> Iterator[_LogCopy]:
    location = _log_location(args)
    workdir = Path(tempfile.mkdtemp(prefix="webpool-log-copy-"))  # owner-only, like the log
    try:
        copy = _LogCopy(location, workdir)
        try:
            yield copy
        finally:
            copy.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _print_events(records: list[Recorded], title: str, as_json: bool) -> None:
    """Records as a table (seq, time, kind, subject, data) or, with --json, one JSON object a line in
    the seed's transaction-log shape (seq, timestamp, action, subject, data)."""
    import orjson

    from events.codec import log_entry

    if as_json:
        for rec in records:
            sys.stdout.write(orjson.dumps(log_entry(rec)).decode() + "\n")
        return
    if not records:
        render.console.print(Text(f"{title}: no events"))
        return
    table = Table(title=Text(title), caption=f"{len(records)} event(s)")
    table.add_column("seq", justify="right")
    table.add_column("time")
    table.add_column("kind")
    table.add_column("subject")
    table.add_column("data", overflow="fold")
    for rec in records:
        data = orjson.dumps(rec.event).decode()
        if len(data) > _DATA_CHARS:
            data = data[: _DATA_CHARS - 1] + "…"
        # Text, not markup: event data is whatever callers sent ("[red]" stays "[red]").
        table.add_row(str(rec.seq), entry_time(rec.ts), rec.kind, Text(rec.subject), Text(data))
    render.console.print(table)


def cmd_log_tail(args: argparse.Namespace) -> int:
    """The newest N events."""
    if args.n < 1:
        raise ValueError(f"-n must be >= 1, got {args.n}")
    with log_copy(args) as copy:
        # Copy segments from the newest back (doubling) until they hold N events or the log ends.
        count = 1
        while True:
            first_index = max(0, len(copy.segments) - count)
            store = copy.open(first_index)
            if first_index == 0 or store.last_seq - store.first_seq + 1 >= args.n:
                break
            count *= 2
        records = store.tail(args.n)
        _print_events(records, f"{copy.location}: last {len(records)} of {store.last_seq} events", args.json)
    return 0


def _kinds(values: list[str] | None) -> list[str] | None:
    from events.schema import EVENT_TYPES

    if not values:
        return None
    by_lower = {k.lower(): k for k in EVENT_TYPES}
    kinds = []
    for value in values:
        for name in filter(None, (v.strip() for v in value.split(","))):
            if name.lower() not in by_lower:
                raise ValueError(f"unknown event kind {name!r}; kinds: {', '.join(sorted(EVENT_TYPES))}")
            kinds.append(by_lower[name.lower()])
    return kinds


def cmd_log_show(args: argparse.Namespace) -> int:
    """Events filtered by kind, subject and seq range."""
    kinds = _kinds(args.kind)
    if args.from_seq is not None and args.from_seq < 1:
        raise ValueError(f"--from-seq must be >= 1, got {args.from_seq}")
    if args.to_seq is not None and args.to_seq < (args.from_seq or 1):
        raise ValueError(f"--to-seq {args.to_seq} is before --from-seq {args.from_seq or 1}")
    with log_copy(args) as copy:
        last_index = None if args.to_seq is None else copy.index_of(args.to_seq)
        store = copy.open(0 if args.from_seq is None else copy.index_of(args.from_seq), last_index)
        start = store.first_seq if args.from_seq is None else args.from_seq  # default: the oldest kept
        records = list(store.read(start, args.to_seq, kinds, args.subject))
        shown = [f"seq {start}..{args.to_seq if args.to_seq is not None else store.last_seq}"]
        if kinds:
            shown.append("kind " + ",".join(kinds))
        if args.subject is not None:
            shown.append(f"subject {args.subject}")
        _print_events(records, f"{copy.location}: {', '.join(shown)}", args.json)
    return 0


def _replay_summary(state: PoolState, location: str, source: str, events: int, first_ts: float | None,
                    seconds: float) -> dict:
    from events.state import models_on, open_operations, recovery_statistics

    by_status: dict[str, int] = {}
    for b in state.browsers.values():
        by_status[b.status] = by_status.get(b.status, 0) + 1
    browsers = []
    for b in sorted(state.browsers.values(), key=lambda b: b.browser_id):
        res = state.resources.get(b.browser_id)
        browsers.append({
            "browser_id": b.browser_id, "browser_type": b.browser_type, "status": b.status,
            "standby": b.standby, "pid": b.pid, "node_id": b.node_id, "backend_caps": list(b.backend_caps),
            "failures": b.failures, "last_failure": b.last_failure.value if b.last_failure else None,
            "memory_mb": res.memory_mb if res else None,
            "models": [{"model": m.model, "shard": m.shard, "backend": m.backend, "sha256": m.sha256,
                        "load_ms": m.load_ms} for m in models_on(state, b.browser_id)],
        })
    return {
        "location": location,
        "source": source,
        "events_replayed": events,
        "last_seq": state.last_seq,
        "first_ts": first_ts,
        "last_ts": state.last_ts or None,
        "replay_s": seconds,
        "browsers_by_status": dict(sorted(by_status.items())),
        "browsers": browsers,
        "open_operations": [{"op_id": o.op_id, "model": o.model, "browser_id": o.browser_id, "kind": o.kind,
                             "started_seq": o.started_seq, "started_ts": o.started_ts}
                            for o in open_operations(state)],
        "sessions": [{"session_id": s.session_id, "model": s.model, "tokens": len(s.tokens),
                      "opened_seq": s.opened_seq, "shards": len(s.plan.get("shards") or []), "resumes": s.resumes}
                     for s in sorted(state.sessions.values(), key=lambda s: s.opened_seq)],
        "open_recoveries": [{"recovery_id": r.recovery_id, "browser_id": r.browser_id, "strategy": r.strategy,
                             "attempt": r.attempt, "category": r.category.value, "steps": len(r.steps)}
                            for r in sorted(state.recoveries.values(), key=lambda r: r.started_seq)],
        "recovery_statistics": recovery_statistics(state),
        "metrics": dict(sorted(state.metrics.items())),
    }


def _print_replay(doc: dict) -> None:
    span = ""
    if doc["first_ts"] is not None and doc["last_ts"] is not None:
        span = f", {entry_time(doc['first_ts'])} .. {entry_time(doc['last_ts'])}"
    render.console.print(Text(f"{doc['location']}: state at seq {doc['last_seq']} from {doc['source']} "
                       f"({doc['events_replayed']} events folded in {doc['replay_s'] * 1000:.0f} ms{span})"))
    render.console.print(table("browsers by status", ["status", "browsers"], [list(kv) for kv in
                                                                          doc["browsers_by_status"].items()]))
    render.console.print(table("browsers", ["browser", "type", "status", "standby", "pid", "failures", "last failure",
                                      "memory MB", "models"],
                         [[b["browser_id"], b["browser_type"], b["status"], b["standby"], b["pid"], b["failures"],
                           b["last_failure"], b["memory_mb"], len(b["models"])] for b in doc["browsers"]]))
    render.console.print(table("models per browser", ["browser", "model", "shard", "backend", "sha256", "load ms"],
                         [[b["browser_id"], m["model"], m["shard"] or "all", m["backend"], m["sha256"][:12],
                           m["load_ms"]] for b in doc["browsers"] for m in b["models"]]))
    render.console.print(table("open operations", ["op", "model", "browser", "kind", "started seq", "started"],
                         [[o["op_id"], o["model"], o["browser_id"], o["kind"], o["started_seq"],
                           entry_time(o["started_ts"])] for o in doc["open_operations"]]))
    render.console.print(table("sessions", ["session", "model", "tokens", "shards", "opened seq", "resumes"],
                         [[s["session_id"], s["model"], s["tokens"], s["shards"], s["opened_seq"], s["resumes"]]
                          for s in doc["sessions"]]))
    render.console.print(table("open recoveries", ["recovery", "browser", "strategy", "attempt", "category", "steps"],
                         [list(r.values()) for r in doc["open_recoveries"]]))
    stats = doc["recovery_statistics"]
    render.console.print(table("recovery statistics", ["statistic", "value"],
                         [[k, f"{v:.3f}" if isinstance(v, float) else v] for k, v in stats.items()]))
    render.console.print(table("metrics", ["counter", "value"],
                         [[k, f"{v:g}" if isinstance(v, float) else v] for k, v in doc["metrics"].items()]))


def cmd_log_replay(args: argparse.Namespace) -> int:
    """Fold the log into the pool's projection (events.columnar.replay_batches, which equals
    events.fold.replay) and summarise it."""
    import orjson

    from events.columnar import replay_batches
    from events.errors import CompactedRangeError

    with log_copy(args) as copy:
        store = copy.open(snapshots=True)
        first_ts: list[float] = []
        counted = 0

        def records(start: int) -> Iterator[tuple[pa.RecordBatch, int]]:
            nonlocal counted
            for batch, version in store.read_batches(start):
                if not first_ts:
                    first_ts.append(batch.column(1)[0].as_py())
                counted += batch.num_rows
                yield batch, version

        t0 = time.perf_counter()
        snap = store.latest_snapshot() if args.snapshot or store.first_seq > 1 else None
        if snap is not None and snap.seq >= store.first_seq - 1:
            state = replay_batches(records(snap.seq + 1), snap.state)
            source = f"the snapshot at seq {snap.seq} + the events after it"
        elif store.first_seq > 1:
            raise CompactedRangeError(f"the log starts at seq {store.first_seq} (compacted) and no readable "
                                      "snapshot covers the events before it")
        else:
            state = replay_batches(records(1))
            source = "every event (full replay)"
        doc = _replay_summary(state, copy.location, source, counted, first_ts[0] if first_ts else None,
                              time.perf_counter() - t0)
    if args.json:
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        _print_replay(doc)
    return 0

