"""`webpool log tail|show|replay` against a real event store on disk (no Ray needed).

The log is written with events.store.EventStore exactly as the StateLog actor writes it, in small
segments so that reads cross segment files, with a snapshot in the middle. Every command must leave
the log's files byte-for-byte as they were, also with a torn tail and while a writer holds the lock.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from rich.console import Console

from events.errors import FailureCategory
from events.schema import (
    BrowserConnected,
    BrowserFailed,
    BrowserHealthReported,
    BrowserLaunched,
    BrowserRetired,
    ModelLoaded,
    OperationCompleted,
    OperationFailed,
    OperationStarted,
    RecoveryCompleted,
    RecoveryStarted,
    RecoveryStepFinished,
    SessionOpened,
    TokensAppended,
)
from events.store import EventStore
from webpool import cli, render

N_OPS = 30  # op0..op29 finish (every 7th fails), op-open stays open
MARKUP = "[red]boom[/red] :smile:"  # must come out as these characters, not as rich markup


def _batches() -> list[list]:
    batches = [
        [BrowserLaunched("b1", "chromium", ("wasm", "webgpu"), 101, "node-a", False), BrowserConnected("b1"),
         ModelLoaded("b1", "all-minilm-l6-v2", None, "ab" * 32, "wasm", 812.0)],
        [BrowserLaunched("b2", "chromium", ("wasm",), 102, "node-a", True), BrowserConnected("b2"),
         ModelLoaded("b2", "smollm2-135m", "0-15", "cd" * 32, "wasm", 4100.0),
         ModelLoaded("b2", "smollm2-135m", "15-30", "ef" * 32, "wasm", 3900.0)],
        [BrowserLaunched("b3", "chromium", ("wasm",), 103, "node-b", False), BrowserConnected("b3")],
        [SessionOpened("s1", "smollm2-135m", {"shards": [{"browser_id": "b2"}, {"browser_id": "b2"}]})],
    ]
    for i in range(N_OPS):
        end = (OperationFailed(f"op{i}", FailureCategory.TIMEOUT, MARKUP) if i % 7 == 3
               else OperationCompleted(f"op{i}", 10.0 + i, {"tokens": i}))
        batches.append([OperationStarted(f"op{i}", "all-minilm-l6-v2", "b1", "infer", f"{i:016x}"), end,
                        TokensAppended("s1", (i, i + 1))])
    batches += [
        [BrowserHealthReported("b1", 712.5, ("all-minilm-l6-v2",))],
        [BrowserFailed("b3", FailureCategory.CRASH, "renderer gone"),
         RecoveryStarted("r1", "b3", "progressive", 1, FailureCategory.CRASH)],
        [RecoveryStepFinished("r1", "reconnect", False, 12.0, "no target"),
         RecoveryStepFinished("r1", "restart", True, 870.0, None),
         RecoveryCompleted("r1", "b3", True, "b4", 900.0)],
        [BrowserFailed("b1", FailureCategory.MEMORY, "oom"),
         RecoveryStarted("r2", "b1", "failover", 1, FailureCategory.MEMORY)],
        [BrowserRetired("b3", "replaced by b4"), OperationStarted("op-open", "smollm2-135m", "b2", "generate", "ff")],
    ]
    return batches


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory) -> tuple[Path, list]:
    """events/pool-a under a cache folder: a log of ~120 events in several segments, with a snapshot."""
    root = tmp_path_factory.mktemp("cache") / "events" / "pool-a"
    with EventStore.open(root, fsync="never", segment_bytes=4096) as store:
        batches = _batches()
        for i, batch in enumerate(batches):
            store.append(batch)
            if i == len(batches) // 2:
                store.write_snapshot(store.last_seq, store.project())
        records = list(store.read())  # with the SnapshotWritten event
    assert len(list((root / "segments").iterdir())) >= 4
    return root, records


@pytest.fixture
def wide(monkeypatch):
    """Rich prints to stdout at 80 columns when it is not a terminal: widen it so rows and lines stay whole."""
    monkeypatch.setattr(render, "console", Console(width=1000, color_system=None))


def _fingerprint(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() + f"@{p.stat().st_mtime_ns}"
            for p in sorted(root.rglob("*")) if p.is_file()}


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_tail_json_is_the_newest_events_in_the_transaction_log_shape(log_dir, capsys):
    root, records = log_dir
    before = _fingerprint(root)
    assert cli.main(["log", "tail", "--dir", str(root), "-n", "5", "--json"]) == 0
    got = _json_lines(capsys.readouterr().out)
    assert [e["seq"] for e in got] == [r.seq for r in records[-5:]]
    for entry, rec in zip(got, records[-5:], strict=True):
        assert set(entry) == {"seq", "timestamp", "action", "subject", "data"}
        assert (entry["action"], entry["subject"], entry["timestamp"]) == (rec.kind, rec.subject, rec.ts)
    assert got[-1]["data"] == {"op_id": "op-open", "model": "smollm2-135m", "browser_id": "b2",
                               "kind": "generate", "input_digest": "ff"}
    assert _fingerprint(root) == before


def test_tail_reaches_back_across_segments(log_dir, capsys):
    root, records = log_dir
    assert cli.main(["log", "tail", "--dir", str(root), "-n", "100", "--json"]) == 0
    assert [e["seq"] for e in _json_lines(capsys.readouterr().out)] == [r.seq for r in records[-100:]]
    assert cli.main(["log", "tail", "--dir", str(root), "-n", "100000", "--json"]) == 0
    assert [e["seq"] for e in _json_lines(capsys.readouterr().out)] == list(range(1, len(records) + 1))


def test_tail_table_shows_seq_time_kind_subject_and_data_literally(log_dir, capsys, wide):
    root, records = log_dir
    failed = next(r for r in records if r.kind == "OperationFailed")
    n = records[-1].seq - failed.seq + 1
    assert cli.main(["log", "tail", "--dir", str(root), "-n", str(n)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if f" {failed.seq} " in line and "OperationFailed" in line)
    assert failed.subject in row and '"category":"timeout"' in row
    assert MARKUP in row  # printed as text: rich markup and emoji codes in event data are not interpreted
    assert time.strftime("%Y-%m-%d", time.localtime(failed.ts)) in row
    assert f"last {n} of {records[-1].seq} events" in out


def test_show_filters_by_kind_subject_and_seq(log_dir, capsys):
    root, records = log_dir

    def show(*extra: str) -> list[dict]:
        assert cli.main(["log", "show", "--dir", str(root), "--json", *extra]) == 0
        return _json_lines(capsys.readouterr().out)

    failed = show("--kind", "OperationFailed")
    assert [e["subject"] for e in failed] == [f"op{i}" for i in range(N_OPS) if i % 7 == 3]
    assert all(e["data"]["error"] == MARKUP for e in failed)
    # case-insensitive, repeatable and comma-separated kinds
    both = show("--kind", "operationfailed,RecoveryCompleted", "--kind", "BrowserRetired")
    assert [e["action"] for e in both] == ["OperationFailed"] * len(failed) + ["RecoveryCompleted", "BrowserRetired"]
    assert [e["action"] for e in show("--subject", "op11")] == ["OperationStarted", "OperationCompleted"]
    assert [e["seq"] for e in show("--from-seq", "20", "--to-seq", "33")] == list(range(20, 34))
    window = show("--from-seq", "20", "--to-seq", "60", "--kind", "TokensAppended", "--subject", "s1")
    expected = [r.seq for r in records if 20 <= r.seq <= 60 and r.kind == "TokensAppended"]
    assert [e["seq"] for e in window] == expected and expected
    assert show("--from-seq", str(records[-1].seq + 1)) == []
    assert len(show()) == len(records)


def test_show_table(log_dir, capsys, wide):
    root, _ = log_dir
    assert cli.main(["log", "show", "--dir", str(root), "--subject", "r1"]) == 0
    out = capsys.readouterr().out
    assert "subject r1" in out and "4 event(s)" in out
    for kind in ("RecoveryStarted", "RecoveryStepFinished", "RecoveryCompleted"):
        assert kind in out
    assert '"strategy":"progressive"' in out and '"replacement":"b4"' in out
    assert cli.main(["log", "show", "--dir", str(root), "--subject", "nobody"]) == 0
    assert "no events" in capsys.readouterr().out


def test_bad_filters_are_one_clear_line(log_dir, capsys, wide):
    root, _ = log_dir
    for extra, message in [(["--kind", "OpFailed"], "unknown event kind 'OpFailed'; kinds: BrowserConnected"),
                           (["--from-seq", "0"], "--from-seq must be >= 1"),
                           (["--from-seq", "9", "--to-seq", "3"], "--to-seq 3 is before --from-seq 9")]:
        assert cli.main(["log", "show", "--dir", str(root), *extra]) == 1
        out = capsys.readouterr().out.strip()
        assert message in out and len(out.splitlines()) == 1 and "Traceback" not in out
    assert cli.main(["log", "tail", "--dir", str(root), "-n", "0"]) == 1
    assert "-n must be >= 1" in capsys.readouterr().out


EXPECTED_METRICS = {
    "operations_started": N_OPS + 1,
    "operations_completed": N_OPS - len(range(3, N_OPS, 7)),
    "operations_failed": len(range(3, N_OPS, 7)),
    "operations_failed.timeout": len(range(3, N_OPS, 7)),
    "sessions_opened": 1,
    "tokens_appended": 2 * N_OPS,
    "recovery_attempts": 2,
    "recovery_successes": 1,
    "snapshots": 1,
}


def _check_replay(doc: dict, records: list) -> None:
    assert doc["last_seq"] == records[-1].seq
    assert doc["browsers_by_status"] == {"connected": 1, "failed": 1, "retired": 1}
    by_id = {b["browser_id"]: b for b in doc["browsers"]}
    assert set(by_id) == {"b1", "b2", "b3"}
    assert (by_id["b1"]["status"], by_id["b1"]["last_failure"], by_id["b1"]["failures"]) == ("failed", "memory", 1)
    assert [m["model"] for m in by_id["b1"]["models"]] == ["all-minilm-l6-v2"]  # kept for recovery to replay
    assert [(m["model"], m["shard"]) for m in by_id["b2"]["models"]] == [("smollm2-135m", "0-15"),
                                                                           ("smollm2-135m", "15-30")]
    assert by_id["b3"]["models"] == [] and by_id["b1"]["memory_mb"] == 712.5
    assert [o["op_id"] for o in doc["open_operations"]] == ["op-open"]
    assert doc["sessions"] == [{"session_id": "s1", "model": "smollm2-135m", "tokens": 2 * N_OPS,
                                "opened_seq": 10, "shards": 2, "resumes": 0}]
    assert [(r["recovery_id"], r["strategy"], r["steps"]) for r in doc["open_recoveries"]] == [("r2", "failover", 0)]
    stats = doc["recovery_statistics"]
    assert (stats["recovery_attempts"], stats["recovery_successes"], stats["success_rate"]) == (2, 1, 0.5)
    assert (stats["active_browsers"], stats["total_browsers"]) == (1, 3)
    for key, value in EXPECTED_METRICS.items():
        assert doc["metrics"][key] == value, key
    assert doc["metrics"]["operation_ms_total"] == sum(10.0 + i for i in range(N_OPS) if i % 7 != 3)


def test_replay_json_folds_the_whole_log(log_dir, capsys):
    root, records = log_dir
    before = _fingerprint(root)
    assert cli.main(["log", "replay", "--dir", str(root), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    _check_replay(doc, records)
    assert doc["events_replayed"] == len(records) and doc["source"].startswith("every event")
    assert doc["first_ts"] == records[0].ts and doc["last_ts"] == records[-1].ts
    # From the snapshot: the same state, fewer events folded.
    assert cli.main(["log", "replay", "--dir", str(root), "--json", "--snapshot"]) == 0
    snap_doc = json.loads(capsys.readouterr().out)
    _check_replay(snap_doc, records)
    assert "snapshot at seq" in snap_doc["source"] and 0 < snap_doc["events_replayed"] < len(records)
    assert _fingerprint(root) == before


def test_replay_tables(log_dir, capsys, wide):
    root, records = log_dir
    assert cli.main(["log", "replay", "--dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"state at seq {records[-1].seq} from every event" in out
    for title in ("browsers by status", "models per browser", "open operations", "sessions", "open recoveries",
                  "recovery statistics", "metrics"):
        assert title in out, title
    lines = out.splitlines()

    def row(*cells: str) -> str:
        found = [line for line in lines if all(c in line for c in cells)]
        assert found, cells
        return found[0]

    row("b2", "smollm2-135m", "15-30", "wasm", "ef" * 6)
    row("op-open", "smollm2-135m", "b2", "generate")
    row("r2", "b1", "failover", "memory")
    row("success_rate", "0.500")
    row("operations_failed.timeout", str(EXPECTED_METRICS["operations_failed.timeout"]))


def test_default_location_is_the_cache_events_folder(log_dir, capsys, monkeypatch, tmp_path, wide):
    root, records = log_dir
    monkeypatch.setenv("WEBPOOL_CACHE", str(root.parent.parent))
    assert cli.main(["log", "tail", "--name", "pool-a", "-n", "1", "--json"]) == 0
    assert _json_lines(capsys.readouterr().out)[0]["seq"] == records[-1].seq
    assert cli.main(["log", "tail", "-n", "1", "--json"]) == 0  # the only log there: no --name needed
    assert _json_lines(capsys.readouterr().out)[0]["seq"] == records[-1].seq
    # Two logs and no --name: say which exist.
    other = tmp_path / "cache"
    for name in ("pool-x", "pool-y"):
        EventStore.open(other / "events" / name).close()
    monkeypatch.setenv("WEBPOOL_CACHE", str(other))
    assert cli.main(["log", "tail"]) == 1
    assert "--name NAME" in (out := capsys.readouterr().out) and "pool-x, pool-y" in out
    assert cli.main(["log", "tail", "--name", "pool-z"]) == 1
    assert "no event log at" in capsys.readouterr().out
    assert not (other / "events" / "pool-z").exists()  # reading creates nothing


def test_a_pyarrow_filesystem_uri(log_dir, capsys, wide):
    root, _ = log_dir
    assert cli.main(["log", "show", "--dir", root.as_uri(), "--kind", "RecoveryCompleted", "--json"]) == 0
    (entry,) = _json_lines(capsys.readouterr().out)
    assert entry["data"]["replacement"] == "b4"
    assert cli.main(["log", "tail", "--dir", "nosuchscheme://x/y"]) == 1
    assert "cannot read 'nosuchscheme://x/y'" in capsys.readouterr().out


def test_reading_a_live_log_with_a_torn_tail_changes_nothing(tmp_path, capsys, monkeypatch):
    """A writer holds the lock and its last batch is half written: the log commands still read (they never
    ask for the writer's lock, so never wait on it), show every whole batch, and leave the files exactly as
    they were."""
    from events.backends import LocalBackend

    root = tmp_path / "live"
    writer = EventStore.open(root, fsync="always", segment_bytes=4096)
    try:
        recs = []
        for batch in _batches()[:8]:
            recs += writer.append(batch)
        segment = sorted((root / "segments").iterdir())[-1]
        with open(segment, "ab") as f:  # what a writer killed mid-write leaves behind
            f.write(b"\xff\xff\xff\xff\x40\x01\x00\x00" + os.urandom(37))
        before = _fingerprint(root)
        locked: list[Path] = []
        real_lock = LocalBackend.lock
        monkeypatch.setattr(LocalBackend, "lock", lambda self, timeout_s: (locked.append(self.root),
                                                                           real_lock(self, timeout_s))[1])
        assert cli.main(["log", "tail", "--dir", str(root), "-n", "3", "--json"]) == 0
        assert [e["seq"] for e in _json_lines(capsys.readouterr().out)] == [r.seq for r in recs[-3:]]
        assert cli.main(["log", "replay", "--dir", str(root), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["last_seq"] == recs[-1].seq
        assert cli.main(["log", "show", "--dir", str(root), "--json"]) == 0
        assert len(_json_lines(capsys.readouterr().out)) == len(recs)
        assert locked and root.resolve() not in [p.resolve() for p in locked], locked   # only their copies
        assert _fingerprint(root) == before
    finally:
        writer.close()


def test_a_log_from_a_newer_schema_is_refused_and_left_alone(tmp_path, capsys, wide):
    root = tmp_path / "newer"
    with EventStore.open(root) as store:
        store.append([BrowserConnected("b1")])
    (root / "meta.json").write_text(json.dumps({"format": "webpool.events", "schema_version": 99}))
    before = _fingerprint(root)
    assert cli.main(["log", "replay", "--dir", str(root)]) == 1
    out = capsys.readouterr().out
    assert "SchemaVersionError" in out and "schema version 99" in out and len(out.strip().splitlines()) == 1
    assert _fingerprint(root) == before


def test_a_missing_directory_is_one_clear_line(tmp_path, capsys, wide):
    assert cli.main(["log", "show", "--dir", str(tmp_path / "nothing")]) == 1
    out = capsys.readouterr().out.strip()
    assert "no event log at" in out and "--dir PATH" in out and len(out.splitlines()) == 1
    assert not (tmp_path / "nothing").exists()


def test_a_compacted_log_replays_from_its_snapshot_to_the_same_state(tmp_path, capsys, wide):
    full, compacted = tmp_path / "full", tmp_path / "compacted"
    with EventStore.open(full, fsync="never", segment_bytes=4096, snapshot_every=40) as store:
        for batch in _batches():
            store.append(batch)
    shutil.copytree(full, compacted)
    with EventStore.open(compacted, fsync="never") as store:
        assert store.compact()["removed_segments"] >= 1
        first = store.first_seq
    assert first > 1

    def replay(root: Path) -> dict:
        assert cli.main(["log", "replay", "--dir", str(root), "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    whole, from_snapshot = replay(full), replay(compacted)
    assert whole["source"].startswith("every event") and "snapshot at seq" in from_snapshot["source"]
    state_keys = ("last_seq", "last_ts", "browsers_by_status", "browsers", "open_operations", "sessions",
                  "open_recoveries", "recovery_statistics", "metrics")
    assert {k: from_snapshot[k] for k in state_keys} == {k: whole[k] for k in state_keys}
    # show starts at the oldest kept event; asking for a removed one is a one-line error.
    assert cli.main(["log", "show", "--dir", str(compacted), "--json"]) == 0
    assert _json_lines(capsys.readouterr().out)[0]["seq"] == first
    assert cli.main(["log", "show", "--dir", str(compacted), "--from-seq", "1"]) == 1
    out = capsys.readouterr().out.strip()
    assert "CompactedRangeError" in out and f"the log starts at {first}" in out and len(out.splitlines()) == 1
