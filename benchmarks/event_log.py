"""Event log speed: appends per fsync policy, appends through the StateLog actor (one caller, and 64
concurrent callers whose appends are group-committed), replay from disk (the columnar fold the store
opens with, against the reference fold and the read-from-disk floor), and StateLog restart on a
1M-event log with and without a snapshot, from SIGKILL to its first acknowledged append.

Events are a realistic mix (operation start/complete pairs, tokens, health reports, sessions), built
before timing starts; construction is timed separately. Targets from the issue are reported next to
each number, met or not; nothing here asserts them.

Prints a table and writes ``results/event_log.json``. Run: ``python -m benchmarks.event_log [--quick]``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import shutil
import signal
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.results import summary_ms, utc_now, write_results
from events.columnar import replay_batches
from events.fold import replay
from events.schema import (
    BrowserHealthReported,
    BrowserLaunched,
    Event,
    ModelLoaded,
    OperationCompleted,
    OperationStarted,
    SessionClosed,
    SessionOpened,
    TokensAppended,
)
from events.store import EventStore
from webpool.helptext import plain
from webpool.localray import configure_auth_env, start_local_ray

TARGETS = {"batched_append_events_per_s": 200_000, "concurrent_actor_append_events_per_s": 20_000,
           "concurrent_actor_append_p50_ms": 2.0, "replay_events_per_s": 1_000_000, "restart_with_snapshot_s": 1.0}
CONCURRENT_APPENDERS = 64


def event_stream(n: int) -> Iterator[Event]:
    """n events shaped like a busy pool: 4 browsers, op pairs, generation tokens, health reports."""
    browsers = [f"b{i}" for i in range(4)]
    made = 0
    for b in browsers:
        for e in (BrowserLaunched(b, "chromium", ("wasm", "webgpu"), 1000, "node-1", False),
                  ModelLoaded(b, "all-minilm-l6-v2", None, "ab" * 32, "wasm", 812.0)):
            if made < n:
                yield e
                made += 1
    op = session = token = 0
    while made < n:
        b = browsers[op % 4]
        cycle: list[Event] = [
            OperationStarted(f"op-{op:09d}", "all-minilm-l6-v2", b, "infer", "9f86d081884c7d65"),
            OperationCompleted(f"op-{op:09d}", 7.25, {"batch": 1, "backend": "wasm"}),
        ]
        if op % 4 == 0:
            if token % 64 == 0:
                if token:
                    cycle.append(SessionClosed(f"s-{session}", "max_new_tokens"))
                session += 1
                cycle.append(SessionOpened(f"s-{session}", "smollm2-135m", {"shards": 3}))
            cycle.append(TokensAppended(f"s-{session}", (token % 49152,)))
            token += 1
        if op % 16 == 0:
            cycle.append(BrowserHealthReported(b, 812.5, ("all-minilm-l6-v2",)))
        op += 1
        for e in cycle:
            if made < n:
                yield e
                made += 1


def chunks(n: int, size: int) -> list[list[Event]]:
    out, cur = [], []
    for e in event_stream(n):
        cur.append(e)
        if len(cur) == size:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


def rate(n: int, seconds: float) -> dict[str, float]:
    return {"events": n, "seconds": round(seconds, 4), "events_per_s": round(n / seconds, 1)}


def bench_append(base: Path, quick: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    n_batched = 50_000 if quick else 300_000
    single = {"always": 300 if quick else 2_000, "interval": 3_000 if quick else 20_000,
              "never": 3_000 if quick else 20_000}
    t0 = time.perf_counter()
    batches = chunks(n_batched, 1000)
    out["construct_events_per_s"] = round(n_batched / (time.perf_counter() - t0), 1)
    for policy in ("always", "interval", "never"):
        for compression in (None, "zstd") if policy == "never" else (None,):
            d = Path(tempfile.mkdtemp(dir=base))
            with EventStore.open(d, fsync=policy, compression=compression) as store:
                t0 = time.perf_counter()
                for b in batches:
                    store.append(b)
                dt = time.perf_counter() - t0
            key = f"batched_1000_{policy}" + (f"_{compression}" if compression else "")
            out[key] = rate(n_batched, dt)
            shutil.rmtree(d)
        d = Path(tempfile.mkdtemp(dir=base))
        events = [e for b in batches for e in b][: single[policy]]
        lat = []
        with EventStore.open(d, fsync=policy) as store:
            t0 = time.perf_counter()
            for e in events:
                t1 = time.perf_counter()
                store.append([e])
                lat.append(time.perf_counter() - t1)
            dt = time.perf_counter() - t0
        out[f"single_{policy}"] = {**rate(len(events), dt), "median_ms": round(statistics.median(lat) * 1e3, 4),
                                   "p99_ms": round(sorted(lat)[int(len(lat) * 0.99)] * 1e3, 4)}
        shutil.rmtree(d)
    return out


def timed_trials(fn: Any, n_events: int, trials: int) -> tuple[dict[str, Any], Any]:
    """Run ``fn`` ``trials`` times; the median run's rate, the sample summary, and the last result."""
    times, result = [], None
    for _ in range(trials):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return {**rate(n_events, statistics.median(times)), "trials": trials,
            **{k: round(v, 2) for k, v in summary_ms([t * 1e3 for t in times]).items() if k != "n"}}, result


def bench_replay(log_dir: Path, trials: int, reference_trials: int) -> dict[str, Any]:
    """The read floor and the columnar fold ``trials`` times each, interleaved by kind; the reference
    fold (tens of seconds on 1M events) ``reference_trials`` times."""
    out: dict[str, Any] = {}
    with EventStore.open(log_dir, fsync="never") as store:
        n = store.last_seq
        out["arrow_scan_checked"], _ = timed_trials(store.read_arrow, n, trials)
        out["bytes_on_disk"] = sum(f.stat().st_size for f in (log_dir / "segments").iterdir())
        out["decode"], _ = timed_trials(lambda: sum(1 for _ in store.read()), n, reference_trials)
        out["reference_replay"], state = timed_trials(lambda: replay(store.read()), n, reference_trials)
        out["columnar_replay"], columnar = timed_trials(lambda: replay_batches(store.read_batches()), n, trials)
        out["columnar_equals_reference"] = columnar == state
        floor = out["arrow_scan_checked"]["seconds"]
        out["columnar_replay"]["x_read_floor"] = round(out["columnar_replay"]["seconds"] / floor, 2)
        out["columnar_speedup_over_reference"] = round(
            out["reference_replay"]["seconds"] / out["columnar_replay"]["seconds"], 1)
        out["final_state"] = {"open_operations": len(state.operations), "sessions": len(state.sessions),
                              "browsers": len(state.browsers)}
    return out


def _ray_up() -> str:
    temp = tempfile.mkdtemp(prefix="wpray-", dir="/tmp")
    start_local_ray(Path(temp), num_cpus=2)
    return temp


def bench_actor_append(base: Path, quick: bool) -> dict[str, Any]:
    import ray

    from actors.state_log import StateLog, new_batch_id

    out: dict[str, Any] = {}
    d = Path(tempfile.mkdtemp(dir=base))
    log = StateLog.remote(str(d), fsync="interval", snapshot_every=None)
    ray.get(log.last_seq.remote())
    events = [e for b in chunks(2_000 if quick else 10_000, 1000) for e in b]
    lat = []
    t0 = time.perf_counter()
    for e in events[: 500 if quick else 2000]:
        t1 = time.perf_counter()
        ray.get(log.append.remote(e))
        lat.append(time.perf_counter() - t1)
    out["single_interval"] = {**rate(len(lat), time.perf_counter() - t0),
                              "median_ms": round(statistics.median(lat) * 1e3, 3)}
    batches = chunks(20_000 if quick else 200_000, 1000)
    t0 = time.perf_counter()
    for b in batches:
        ray.get(log.append_batch.remote(b, new_batch_id()))
    out["batched_1000_interval"] = rate(sum(len(b) for b in batches), time.perf_counter() - t0)
    out["concurrent_single_interval"] = concurrent_appends(log, events[: 2_000 if quick else 10_000])
    # The same two loads against an actor that does nothing: what Ray itself costs here.
    echo = _echo_actor()
    lat = []
    for e in events[: 500 if quick else 2000]:
        t1 = time.perf_counter()
        ray.get(echo.append.remote(e))
        lat.append(time.perf_counter() - t1)
    out["echo_floor_single"] = {**rate(len(lat), sum(lat)), "median_ms": round(statistics.median(lat) * 1e3, 3)}
    out["echo_floor_concurrent"] = concurrent_appends(echo, events[: 2_000 if quick else 10_000])
    out["concurrent_x_echo_floor"] = round(out["echo_floor_concurrent"]["events_per_s"]
                                           / out["concurrent_single_interval"]["events_per_s"], 2)
    ray.kill(echo)
    ray.kill(log, no_restart=True)
    shutil.rmtree(d, ignore_errors=True)
    return out


def _echo_actor() -> Any:
    """The floor for a call to an async actor on this machine: a method that returns its argument."""
    import ray

    @ray.remote(num_cpus=0)
    class Echo:
        async def append(self, event: Event) -> Event:
            return event

    echo = Echo.remote()
    ray.get(echo.append.remote(None))
    return echo


def concurrent_appends(log: Any, events: list[Event]) -> dict[str, Any]:
    """CONCURRENT_APPENDERS callers, each appending one event at a time and sending the next as soon as its
    last is acknowledged (kept in flight from this process with ray.wait). Latency: call to acknowledgement."""
    import ray

    sent: dict[Any, float] = {}
    lat: list[float] = []
    todo = iter(events)
    t0 = time.perf_counter()
    for e in itertools.islice(todo, CONCURRENT_APPENDERS):
        sent[log.append.remote(e)] = time.perf_counter()
    while sent:
        done, _ = ray.wait(list(sent), num_returns=1)
        for ref in done:
            ray.get(ref)
            lat.append(time.perf_counter() - sent.pop(ref))
            nxt = next(todo, None)
            if nxt is not None:
                sent[log.append.remote(nxt)] = time.perf_counter()
    out = {**rate(len(lat), time.perf_counter() - t0), "appenders": CONCURRENT_APPENDERS}
    out.update({k: round(v, 3) for k, v in summary_ms([x * 1e3 for x in lat]).items()})
    return out


def bench_restart(log_dir: Path, snapshot: bool, trials: int) -> dict[str, Any]:
    """In-process open time, actor start to first answer, then ``trials`` times: SIGKILL of the actor's
    process to its first acknowledged append (Ray restarts it; it reopens the store)."""
    import ray

    from actors.state_log import StateLog

    if snapshot:
        with EventStore.open(log_dir, fsync="always") as store:
            store.write_snapshot(store.last_seq, store.project())
    else:
        for f in (log_dir / "snapshots").iterdir():
            f.unlink()
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    with EventStore.open(log_dir, snapshot_every=10_000) as store:
        out["in_process_open_s"] = round(time.perf_counter() - t0, 3)
        out["events"] = store.last_seq
    t0 = time.perf_counter()
    # Without a snapshot the actor must never write one (a pool's StateLog writes one every 10,000 events,
    # which would make every restart after the first a restart from a snapshot).
    log = StateLog.remote(str(log_dir), snapshot_every=10_000 if snapshot else 10**12)
    info = ray.get(log.info.remote())
    out["actor_start_to_first_answer_s"] = round(time.perf_counter() - t0, 3)
    kill_to_ack, to_new_process, opens = [], [], []
    for _ in range(trials):
        killed_at, t0 = time.time(), time.perf_counter()
        os.kill(info["pid"], signal.SIGKILL)
        ray.get(log.append.remote(BrowserHealthReported("b0", 1.0, ())), timeout=600)
        kill_to_ack.append(time.perf_counter() - t0)
        after = ray.get(log.info.remote(), timeout=600)
        assert after["pid"] != info["pid"] and after["last_seq"] >= info["last_seq"]
        to_new_process.append(after["started_at"] - killed_at)
        opens.append(after["open_s"])
        info = after
    summary = summary_ms([t * 1e3 for t in kill_to_ack])
    out["actor_kill9_to_first_ack_s"] = round(summary["median_ms"] / 1e3, 3)
    out["actor_kill9_to_first_ack_ms"] = {k: round(v, 1) for k, v in summary.items()}
    # Where the time goes: Ray noticing the death and starting a new worker up to the actor's __init__,
    # the store's open (snapshot + tail replay), and the rest (the first call reaching the new actor).
    out["breakdown_median_s"] = {
        "kill_to_new_actor_init": round(statistics.median(to_new_process), 3),
        "store_open": round(statistics.median(opens), 3),
        "rest": round(statistics.median(kill_to_ack) - statistics.median(to_new_process)
                      - statistics.median(opens), 3),
    }
    out["actor_store_open_s"] = round(statistics.median(opens), 3)
    ray.kill(log, no_restart=True)
    time.sleep(0.5)  # let the killed process release the store's lock before the next open
    return out


def run(quick: bool, workdir: Path | None) -> dict[str, Any]:
    configure_auth_env()     # before ray is imported
    import ray

    base = Path(tempfile.mkdtemp(prefix="webpool-eventlog-", dir=workdir))
    results: dict[str, Any] = {
        "date": utc_now(),
        "quick": quick,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "workdir": str(base)},
        "targets": TARGETS,
    }
    temp = None
    try:
        results["append_in_process"] = bench_append(base, quick)
        n_log = 100_000 if quick else 1_000_000
        log_dir = base / "log"
        t0 = time.perf_counter()
        with EventStore.open(log_dir, fsync="never") as store:
            for b in chunks(n_log, 1000):
                store.append(b)
        results["log_build_s"] = round(time.perf_counter() - t0, 2)
        results["replay"] = bench_replay(log_dir, trials=3 if quick else 10, reference_trials=1 if quick else 2)
        temp = _ray_up()
        results["append_through_actor"] = bench_actor_append(base, quick)
        restarts = 3 if quick else 10
        results["restart_without_snapshot"] = bench_restart(log_dir, snapshot=False, trials=restarts)
        results["restart_with_snapshot"] = bench_restart(log_dir, snapshot=True, trials=restarts)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if temp:
            shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
    a, r = results["append_in_process"], results["replay"]
    c = results["append_through_actor"]["concurrent_single_interval"]
    results["targets_met"] = {
        "batched_append_events_per_s": a["batched_1000_interval"]["events_per_s"]
        >= TARGETS["batched_append_events_per_s"],
        "concurrent_actor_append_events_per_s": c["events_per_s"] >= TARGETS["concurrent_actor_append_events_per_s"],
        "concurrent_actor_append_p50_ms": c["median_ms"] <= TARGETS["concurrent_actor_append_p50_ms"],
        "replay_events_per_s": r["columnar_replay"]["events_per_s"] >= TARGETS["replay_events_per_s"],
        "restart_with_snapshot_s": results["restart_with_snapshot"]["actor_kill9_to_first_ack_s"]
        <= TARGETS["restart_with_snapshot_s"],
    }
    return results


def print_table(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"webpool event log ({r['date']}, {r['machine']['cpus']} CPUs{', quick' if r['quick'] else ''})")
    for col in ("measure", "result", "target"):
        t.add_column(col)
    a = r["append_in_process"]
    for policy in ("always", "interval", "never"):
        t.add_row(f"append batched x1000, fsync={policy}", f"{a[f'batched_1000_{policy}']['events_per_s']:,.0f} ev/s",
                  ">= 200,000 ev/s" if policy == "interval" else "")
    t.add_row("append batched x1000, fsync=never, zstd",
              f"{a['batched_1000_never_zstd']['events_per_s']:,.0f} ev/s", "")
    for policy in ("always", "interval", "never"):
        s = a[f"single_{policy}"]
        t.add_row(f"append single, fsync={policy}", f"{s['events_per_s']:,.0f} ev/s (median {s['median_ms']} ms)", "")
    act = r["append_through_actor"]
    t.add_row("append through actor, single", f"{act['single_interval']['events_per_s']:,.0f} ev/s "
              f"(median {act['single_interval']['median_ms']} ms)", "")
    t.add_row("append through actor, batched x1000", f"{act['batched_1000_interval']['events_per_s']:,.0f} ev/s", "")
    c = act["concurrent_single_interval"]
    t.add_row(f"append through actor, {c['appenders']} concurrent single appenders",
              f"{c['events_per_s']:,.0f} ev/s (median {c['median_ms']} ms, p95 {c['p95_ms']} ms)",
              ">= 20,000 ev/s, p50 <= 2 ms")
    rp = r["replay"]
    t.add_row("Ray floor: an actor that does nothing, single / 64 concurrent",
              f"{act['echo_floor_single']['median_ms']} ms median / "
              f"{act['echo_floor_concurrent']['events_per_s']:,.0f} calls/s "
              f"(the StateLog: {act['concurrent_x_echo_floor']}x slower)", "")
    t.add_row("read from disk, Arrow + checksums", f"{rp['arrow_scan_checked']['events_per_s']:,.0f} ev/s", "")
    t.add_row("read + decode to events", f"{rp['decode']['events_per_s']:,.0f} ev/s", "")
    t.add_row("replay, reference fold (read + decode + apply)",
              f"{rp['reference_replay']['events_per_s']:,.0f} ev/s", "")
    t.add_row("replay, columnar fold (what the store opens with)",
              f"{rp['columnar_replay']['events_per_s']:,.0f} ev/s ({rp['columnar_replay']['x_read_floor']}x the "
              f"read floor, {rp['columnar_speedup_over_reference']}x the reference; equal: "
              f"{rp['columnar_equals_reference']})", ">= 1,000,000 ev/s")
    for key, label in (("restart_without_snapshot", "no snapshot"), ("restart_with_snapshot", "snapshot")):
        x = r[key]
        kills = x["actor_kill9_to_first_ack_ms"]
        t.add_row(f"StateLog restart, {x['events']:,} events, {label}",
                  f"open {x['actor_store_open_s']} s; kill -9 -> first acknowledged append "
                  f"{x['actor_kill9_to_first_ack_s']} s median, p95 "
                  f"{kills['p95_ms'] / 1e3:.3f} s ({kills['n']} kills); of the median: Ray to the new actor "
                  f"{x['breakdown_median_s']['kill_to_new_actor_init']} s",
                  "<= 1 s" if key == "restart_with_snapshot" else "")
    Console(width=120).print(t)
    print("targets met:", r["targets_met"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=plain(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (100k-event log)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the logs are written (default: temp dir)")
    args = parser.parse_args(argv)
    r = run(args.quick, args.workdir)
    out = write_results("event_log", args.quick, r)
    print_table(r)
    print(f"wrote {out}")
    return r


if __name__ == "__main__":
    main()
