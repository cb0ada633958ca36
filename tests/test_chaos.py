"""Chaos: 200+ requests, 16 at a time, over 4 browsers while a seeded random real fault strikes every 2.5-4 s.

Every request must return the right embedding (numpy reference); the event log must have no gap
and every started operation must end; the pool's state must equal a fresh replay of the segment files
on disk, field by field; afterwards no browser process or temp folder may remain.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import numpy as np
import ray
from logcheck import assert_state_is_replay_of_disk, state_once_operations_end
from procs import alive

from events.state import ALIVE_STATUSES, open_operations
from sharding.models import minilm
from webpool import ResourcePool

FAULTS = ("crash_page", "kill_renderer", "kill_browser", "kill_actor", "disconnect", "hang")
REQUESTS = 208
WAVE = 16               # in flight at once (4 per browser): each wave waits for its slowest, a recovery
MIN_FAULTS = 6          # keep sending past REQUESTS until this many faults have struck (quiet machines)...
FAULTS_WAIT_S = 180.0   # ...for at most this long (faults come every 2.5-4 s; recoveries from a spare are fast)



def test_chaos_every_request_correct_no_event_lost_nothing_left(ray_local, tmp_path):
    rng = random.Random(20261128)
    texts = [f"chaos sentence {i}: the pool keeps answering while browsers die" for i in range(16)]
    reference = minilm.reference_embed(texts)
    pool = ResourcePool.remote(max_connections=4, event_log=str(tmp_path / "events"), request_timeout=5.0,
                               name="chaos-pool",
                               health_interval=0.5,
                               fault_tolerance={"level": "medium", "recovery_strategy": "progressive",
                                                "max_recovery_attempts": 5})
    ray.get([pool.infer.remote("all-minilm-l6-v2", {"text": t}) for t in texts[:WAVE]])    # grow the pool

    seen_pids: set[int] = set()
    seen_dirs: set[str] = set()
    injected: list[tuple[str, str]] = []
    stop = threading.Event()

    def chaos() -> None:
        while not stop.wait(rng.uniform(2.5, 4.0)):
            health = ray.get(pool.health.remote())   # failures come back as reports, never as errors
            alive = sorted(b for b, h in health.items() if "pids" in h)
            for report in health.values():
                seen_pids.update(report.get("pids", {}).values())
                if "temp_dir" in report:
                    seen_dirs.add(report["temp_dir"])
            if not alive:
                continue
            victim, fault = rng.choice(alive), rng.choice(FAULTS)
            try:
                ray.get(pool.inject_fault.remote(victim, fault))
                injected.append((victim, fault))
            except Exception:   # the victim died a moment ago from the previous fault
                pass

    monkey = threading.Thread(target=chaos, daemon=True)
    monkey.start()
    wrong = []
    try:
        sent = 0
        give_up = time.monotonic() + FAULTS_WAIT_S
        while sent < REQUESTS or (len(injected) < MIN_FAULTS and time.monotonic() < give_up):
            start, sent = sent, sent + WAVE
            picks = [rng.randrange(len(texts)) for _ in range(WAVE)]
            outs = ray.get([pool.infer.remote("all-minilm-l6-v2", {"text": texts[i]}) for i in picks], timeout=300)
            wrong += [(start + j, float(np.abs(o["embedding"] - reference[i]).max()))
                      for j, (i, o) in enumerate(zip(picks, outs, strict=True))
                      if np.abs(o["embedding"] - reference[i]).max() > 1e-4]
    finally:
        stop.set()
        monkey.join(30)
    assert wrong == [], wrong
    assert len(injected) >= MIN_FAULTS, injected

    state = ray.get(pool.get_state.remote())
    # More than were there: the health loop may append while we read, and the read must start at seq 1.
    events = ray.get(pool.recent_events.remote(state.last_seq + 10_000))
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, seqs[-1] + 1)) and seqs[-1] >= state.last_seq, "no event lost, none twice"
    assert open_operations(state) == []
    m = state.metrics
    assert m["operations_started"] == m["operations_completed"] + m.get("operations_failed", 0)
    assert m["operations_completed"] >= sent + WAVE
    assert m.get("recovery_successes", 0) >= 1

    final = ray.get(pool.health.remote())
    for report in final.values():
        seen_pids.update(report.get("pids", {}).values())
        if "temp_dir" in report:
            seen_dirs.add(report["temp_dir"])
    ray.get(pool.shutdown.remote())
    # After shutdown nothing appends: the pool's final state is the replay of every event on disk.
    assert_state_is_replay_of_disk(ray.get(pool.get_state.remote()), "chaos-pool", tmp_path / "events")
    ray.kill(pool)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and ([p for p in seen_pids if alive(p)] or
                                           [d for d in seen_dirs if Path(d).exists()]):
        time.sleep(0.2)
    assert [p for p in seen_pids if alive(p)] == [], "no orphan browser process"
    assert [d for d in seen_dirs if os.path.exists(d)] == [], "no temp folder left"


SIGKILL_REQUESTS = 64
SIGKILL_MIN_KILLS = 8


def test_sigkill_to_any_browser_process_every_few_seconds_gives_right_answers_or_documented_errors(
        ray_local, tmp_path):
    """A SIGKILL to a random process of a random browser (main, renderer, GPU, zygote, utility: whichever its
    health report lists; every third one a serving browser's main process) every 1.5-3 s, while two
    clients send requests: each request is answered correctly or ends with an error of a documented type
    (events/errors.py), never a Playwright or bare runtime exception; every started operation ends; the
    pool recovered at least once; the state is the replay of the disk."""
    import signal

    from events import errors as documented

    rng = random.Random(20261202)
    texts = [f"sigkill sentence {i}: any process of a browser may die at any moment" for i in range(12)]
    reference = minilm.reference_embed(texts)
    pool = ResourcePool.remote(max_connections=3, event_log=str(tmp_path / "events"), request_timeout=5.0,
                               name="sigkill-pool", health_interval=0.5,
                               fault_tolerance={"level": "high", "recovery_strategy": "progressive",
                                                "max_recovery_attempts": 5})
    ray.get([pool.infer.remote("all-minilm-l6-v2", {"text": t}) for t in texts[:6]])    # grow the pool
    kills: list[tuple[str, str, int]] = []
    stop = threading.Event()

    def killer() -> None:
        while not stop.wait(rng.uniform(1.5, 3.0)):
            health = ray.get(pool.health.remote())
            candidates = [(b, role, pid) for b, h in sorted(health.items())
                          for role, pid in sorted(h.get("pids", {}).items())]
            if len(kills) % 3 == 2:
                # Many of a browser's processes are restarted by Chromium itself (GPU, network service, a
                # spare renderer): every third kill takes a serving browser's main process, so the pool
                # surely has a recovery to make.
                serving = {b.browser_id for b in ray.get(pool.get_state.remote()).browsers.values()
                           if b.status in ALIVE_STATUSES and not b.standby}
                candidates = [c for c in candidates if c[1] == "browser" and c[0] in serving] or candidates
            if candidates:
                browser_id, role, pid = rng.choice(candidates)
                try:
                    os.kill(pid, signal.SIGKILL)
                    kills.append((browser_id, role, pid))
                except ProcessLookupError:
                    pass

    outcomes: list[tuple[int, str]] = []       # (request, "ok" | "wrong" | the error's type)
    lock = threading.Lock()

    def client(which: range) -> None:
        for n in which:
            i = n % len(texts)
            try:
                out = ray.get(pool.infer.remote("all-minilm-l6-v2", {"text": texts[i]}), timeout=300)
                what = "ok" if np.abs(out["embedding"] - reference[i]).max() <= 1e-4 else "wrong"
            except Exception as exc:
                cause = getattr(exc, "cause", None) or exc
                documented_type = isinstance(cause, documented.WebpoolError | documented.InputError)
                what = f"{'documented' if documented_type else 'UNDOCUMENTED'} {type(cause).__name__}: " \
                       f"{str(cause).splitlines()[0][:200] if str(cause) else ''}"
            with lock:
                outcomes.append((n, what))

    monkey = threading.Thread(target=killer, daemon=True)
    clients = [threading.Thread(target=client, args=(range(k, SIGKILL_REQUESTS, 2),)) for k in range(2)]
    monkey.start()
    for c in clients:
        c.start()
    for c in clients:
        c.join(600)
    extra = SIGKILL_REQUESTS
    deadline = time.monotonic() + 120
    while len(kills) < SIGKILL_MIN_KILLS and time.monotonic() < deadline:   # a fast machine: more faults
        client(range(extra, extra + 4))
        extra += 4
    stop.set()
    monkey.join(30)

    assert len(outcomes) >= SIGKILL_REQUESTS
    assert not [o for o in outcomes if o[1] == "wrong"], "an answer differs from the reference"
    assert not [o for o in outcomes if o[1].startswith("UNDOCUMENTED")], outcomes
    assert len(kills) >= SIGKILL_MIN_KILLS, kills
    # The losing run of a hedged request may still be going: it ends within its budget.
    state = state_once_operations_end(pool, timeout=10 * 5.0)
    assert state.metrics.get("recovery_successes", 0) >= 1
    ray.get(pool.shutdown.remote())
    assert_state_is_replay_of_disk(ray.get(pool.get_state.remote()), "sigkill-pool", tmp_path / "events")
    ray.kill(pool)
