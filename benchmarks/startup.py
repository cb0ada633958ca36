"""Start-up and restart: how long until a new browser serves, on real Ray, Chromium, MiniLM and SmolLM2.

Cases (every trial counted, none dropped; every answer checked against the CPU reference):

- ``pool_first_answer_new_ray``: a new local Ray, left until the workers Ray starts ahead for its first
  driver are idle (as for a user whose ``ray.init()`` returned a moment ago), then ``ResourcePool.remote()``
  -> the first correct MiniLM answer. Only when the benchmark starts Ray itself (each trial its own Ray).
- ``pool_first_answer``: the same in a Ray that already served pools (a new pool, browser and page each
  trial; Ray's prestarted workers long used): every actor of the pool waits for a new worker process.
- ``restart_minilm``: a browser actor's browser SIGKILLed -> ``restart`` -> MiniLM loaded -> the first
  correct answer; with a spare process (``spare_process=True``) and without.
- ``after_sigkill_medium``: a pool at level ``medium``, strategy ``restart``: a one-sentence request sent
  right after its browser was SIGKILLed -> its correct answer; spare process on and off.
- ``restart_smollm2``: as ``restart_minilm`` with SmolLM2-135M whole on one browser -> session created and
  the first greedy token equal to CPU onnxruntime's.

Floors measured in the same run: a bare Chromium launch (process start -> DevTools port open), the
page runtime's WebAssembly set-up (paid by a spare before it is needed), a model's session creation in a
page whose runtime is set up. Prints a table; writes ``results/startup.json`` and ``results/startup.png``.
Run: ``python -m benchmarks.startup [--trials N] [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.results import ended, machine, results_dir, save_chart, summary_ms, utc_now, write_results
from webpool.helptext import plain
from webpool.localray import configure_auth_env, start_local_ray

MODEL = "all-minilm-l6-v2"
SENTENCE = "A browser that restarts should serve again in well under a second."
TOLERANCE = 1e-4            # max abs difference of an embedding from the numpy reference
SMOLLM2_PROMPT = "The capital of France is"
SPARE_WAIT_S = 60.0         # a spare that is not ready by then fails the run (it is prepared in ~2 s here)
# Issue targets (p50, this 2-core machine).
TARGETS_MS = {"restart_minilm": 1000.0, "after_sigkill_medium": 1500.0, "restart_smollm2": 3000.0,
              "pool_first_answer": 3000.0, "pool_first_answer_new_ray": 3000.0}
CHART_LABELS = {"pool_first_answer_new_ray": "first pool\nin a new Ray",
                "pool_first_answer": "further pool\nin one Ray", "after_sigkill_medium": "after SIGKILL\n(medium)"}
PRESTART_WAIT_S = 30.0      # a new Ray's prestarted workers are idle within ~0.5 s here


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


def _wait_for_spare(handle: Any, model: Any) -> None:
    """Until the browser's spare process is ready and holds ``model`` as it should (a session, or its bytes
    staged): the state a restart meets when the browser failed a while after it last loaded a model."""
    import ray

    deadline = time.monotonic() + SPARE_WAIT_S
    while True:
        health = ray.get(handle.health.remote())
        if (health["spare_pid"] is not None and health["spare_models"] == model.spare_models
                and health["spare_staged"] == model.spare_staged):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"no spare process holding {model.spare_models} (staged: {model.spare_staged}) "
                               f"within {SPARE_WAIT_S} s")
        time.sleep(0.02)


def chromium_launch_floor(trials: int) -> list[float]:
    """Process start -> DevTools port open, a fresh profile each time."""
    from actors import chromium

    async def once(exe: Any, profile: Path) -> float:
        t0 = time.perf_counter()
        proc, _, _ = await chromium.launch(exe, profile)
        ms = _ms(t0)
        chromium.terminate(proc)
        return ms

    exe = chromium.resolve_browser("chromium")
    temp = Path(tempfile.mkdtemp(prefix="wpstart-"))
    try:
        return [asyncio.run(once(exe, temp / f"p{i}")) for i in range(trials)]
    finally:
        shutil.rmtree(temp, ignore_errors=True)


class MiniLM:
    """Loads MiniLM on a browser actor and checks an answer against numpy's."""

    def __init__(self) -> None:
        from sharding.models import minilm
        from sharding.models.registry import artifacts

        [self.art] = artifacts(MODEL)
        self.data = np.fromfile(self.art.path, np.uint8)
        self.feeds = minilm.tokenize([SENTENCE])
        self.reference = minilm.reference_embed([SENTENCE])[0]
        self.ref: Any = None
        self.spare_models = [self.art.key]      # small enough to be held by a spare too
        self.spare_staged: list[str] = []

    def load(self, handle: Any) -> dict[str, Any]:
        import ray

        if self.ref is None:        # put once, as the pool's fleet does
            self.ref = ray.put(self.data)
        return ray.get(handle.load_model.remote(self.art.key, self.ref, self.art.sha256, "wasm"))

    def answer(self, handle: Any) -> bool:
        import ray

        out = ray.get(handle.run.remote(self.art.key, self.feeds, fetch=["embedding"]))["outputs"]["embedding"]
        return bool(np.abs(out[0] - self.reference).max() <= TOLERANCE)


class SmolLM2:
    """Loads SmolLM2-135M whole on a browser actor and checks its first greedy token against CPU onnxruntime."""

    def __init__(self) -> None:
        from sharding.models import llama_onnx
        from sharding.models.registry import artifacts, llama_model

        model = llama_model("smollm2-135m")
        self.prompt = model.encode(SMOLLM2_PROMPT)
        [self.art] = artifacts("smollm2-135m", [(0, model.config.n_layers)])
        self.data = np.fromfile(self.art.path, np.uint8)
        self.expected = llama_onnx.OrtShardChain([self.art]).greedy(self.prompt, 1)[:1]
        self.sessions = 0
        self.ref: Any = None
        self.spare_models: list[str] = []       # too big to be held twice as a session: the spare stages it
        self.spare_staged = [self.art.key]

    def load(self, handle: Any) -> dict[str, Any]:
        import ray

        if self.ref is None:        # put once, as the pool's fleet does
            self.ref = ray.put(self.data)
        return ray.get(handle.load_model.remote(self.art.key, self.ref, self.art.sha256, "wasm"))

    def answer(self, handle: Any) -> bool:
        import ray

        from sharding.coordinator import ShardChain, ShardStage, generate_tokens

        self.sessions += 1
        stage = ShardStage("startup-bench", handle, self.art)
        session = f"s{self.sessions}"
        result = asyncio.run(generate_tokens(ShardChain([stage], session), self.prompt, 1, eos_id=None))
        ray.get(handle.drop_state.remote(stage.state_id(session)))
        return result["token_ids"][:1] == self.expected


def restart_trials(model: Any, spare: bool, trials: int) -> list[dict[str, Any]]:
    """A browser actor serving ``model``; each trial SIGKILLs its browser, restarts it, reloads, answers."""
    import ray

    from actors.browser_actor import BrowserActor

    handle = BrowserActor.remote(f"startup-{type(model).__name__}-{spare}", "chromium", 1, None, None,
                                 spare_process=spare)
    rows = []
    try:
        ray.get(handle.start.remote())
        model.load(handle)
        if not model.answer(handle):
            raise RuntimeError("the first answer before any restart is wrong")
        for _ in range(trials):
            if spare:
                _wait_for_spare(handle, model)
            ray.get(handle.inject_fault.remote("kill_browser"))
            t0 = time.perf_counter()
            try:
                info = ray.get(handle.restart.remote())
                restart_ms = _ms(t0)
                loaded = model.load(handle)
                load_ms = _ms(t0) - restart_ms
                correct = model.answer(handle)
            except Exception as exc:      # counted, not dropped: the trial failed, and why
                rows.append({"total_ms": _ms(t0), "correct": False, "error": f"{type(exc).__name__}: {exc}"[:400]})
                print(f"  trial failed: {rows[-1]['error']}", flush=True)
                continue
            rows.append({"total_ms": _ms(t0), "restart_ms": restart_ms, "load_ms": load_ms,
                         "answer_ms": _ms(t0) - restart_ms - load_ms, "create_ms": loaded["createMs"],
                         "fetch_ms": loaded["fetchMs"], "staged": loaded.get("staged", False),
                         "from_spare": info["from_spare"], "runtime_warm_up_ms": info["runtime_warm_up_ms"],
                         "restart_phases_ms": info["phases_ms"], "correct": correct})
    finally:
        ray.get(handle.close.remote())
        ray.kill(handle)
    return rows


# Where a pool's first answer spends its time: the first of each of these events in its log, in ms after
# ``ResourcePool.remote()``, in the order they come.
FIRST_ANSWER_MARKS = {"log_open_at_ms": "PoolConfigured", "browser_launched_at_ms": "BrowserLaunched",
                      "model_loaded_at_ms": "ModelLoaded"}


def first_answer_marks(events: list[dict[str, Any]], t0_wall: float) -> dict[str, float | None]:
    """When (ms after ``t0_wall``, a ``time.time()``) the pool's log first recorded each of
    ``FIRST_ANSWER_MARKS``; None for one it never recorded."""
    marks: dict[str, float | None] = dict.fromkeys(FIRST_ANSWER_MARKS)
    for name, action in FIRST_ANSWER_MARKS.items():
        first = next((e for e in events if e["action"] == action), None)
        if first is not None:
            marks[name] = (first["timestamp"] - t0_wall) * 1000
    return marks


def _first_answer(minilm: MiniLM, event_log: Path) -> dict[str, Any]:
    """``ResourcePool.remote()`` -> its first MiniLM answer: the time, where it went, and whether it is right."""
    import ray

    from webpool import ResourcePool

    t0, t0_wall = time.perf_counter(), time.time()
    pool = ResourcePool.remote(max_connections=1, event_log=str(event_log))
    try:
        out = ray.get(pool.infer.remote(MODEL, {"text": SENTENCE}))
        ms = _ms(t0)
        return {"total_ms": ms, **first_answer_marks(ray.get(pool.recent_events.remote(1000)), t0_wall),
                "correct": bool(np.abs(out["embedding"] - minilm.reference).max() <= TOLERANCE)}
    finally:
        ray.get(pool.shutdown.remote())
        ray.kill(pool)


def pool_first_answer_trials(trials: int, temp: Path) -> list[dict[str, Any]]:
    minilm = MiniLM()
    return [_first_answer(minilm, temp / f"first-{i}") for i in range(trials)]


def idle_ray_workers() -> int:
    """Ray worker processes below this driver (its local Ray's) waiting for work: titled ``ray::IDLE``."""
    import os

    from actors.chromium import descendants

    idle = 0
    for pid in descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                idle += f.read().startswith(b"ray::IDLE")
        except OSError:
            pass
    return idle


def pool_first_answer_new_ray_trials(trials: int, temp: Path) -> list[dict[str, Any]]:
    """Each trial in a Ray of its own, started for it: the pool comes once Ray's raylet has the workers it
    starts for a new driver (one per CPU of the node) idle, or ``PRESTART_WAIT_S`` has passed (the row says
    how many were idle)."""
    import ray

    minilm = MiniLM()
    rows = []
    for i in range(trials):
        start_local_ray(temp / f"ray-{i}")
        try:
            wanted = int(ray.cluster_resources().get("CPU", 1))
            deadline = time.monotonic() + PRESTART_WAIT_S
            while (idle := idle_ray_workers()) < wanted and time.monotonic() < deadline:
                time.sleep(0.05)
            rows.append({**_first_answer(minilm, temp / f"first-new-ray-{i}"), "idle_workers": idle})
        finally:
            ray.shutdown()
    return rows


def after_sigkill_trials(spare: bool, trials: int, temp: Path) -> list[dict[str, Any]]:
    """Level medium, strategy restart: a request sent right after the pool's browser was SIGKILLed."""
    import ray

    from webpool import ResourcePool

    minilm = MiniLM()
    pool = ResourcePool.remote(max_connections=1, event_log=str(temp / f"medium-{spare}"), spare_process=spare,
                               fault_tolerance={"level": "medium", "recovery_strategy": "restart"})
    rows = []
    try:
        browser_id = ray.get(pool.infer.remote(MODEL, {"text": SENTENCE}))["browser_id"]
        for _ in range(trials):
            handle = ray.get(pool.browser_handle.remote(browser_id))
            if spare:
                _wait_for_spare(handle, minilm)
            ray.get(pool.inject_fault.remote(browser_id, "kill_browser"))
            t0 = time.perf_counter()
            out = ray.get(pool.infer.remote(MODEL, {"text": SENTENCE}))
            rows.append({"total_ms": _ms(t0), "browser_id": out["browser_id"],
                         "correct": bool(np.abs(out["embedding"] - minilm.reference).max() <= TOLERANCE)})
            browser_id = out["browser_id"]
    finally:
        ray.get(pool.shutdown.remote())
        ray.kill(pool)
    return rows


def _cell(name: str, rows: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    cell = {"case": name, **extra, "summary": summary_ms([r["total_ms"] for r in rows]),
            "correct": sum(r["correct"] for r in rows), "trials": rows}
    for part in ("restart_ms", "load_ms", "answer_ms", "fetch_ms", "create_ms", "runtime_warm_up_ms",
                 *FIRST_ANSWER_MARKS):
        values = [r[part] for r in rows if r.get(part) is not None]
        if values:
            cell[f"median_{part}"] = float(np.median(values))
    target = TARGETS_MS.get(name)
    if target is not None and cell["summary"] is not None:
        cell["target_ms"] = target
        cell["target_met"] = cell["summary"]["median_ms"] <= target
    print(_row(cell), flush=True)
    return cell


def _row(cell: dict[str, Any]) -> str:
    s = cell["summary"]
    label = cell["case"] + ("" if "spare" not in cell else f" (spare {'on' if cell['spare'] else 'off'})")
    parts = [f"{label:<42} p50 {s['median_ms']:7.0f} ms  p95 {s['p95_ms']:7.0f} ms  "
             f"correct {cell['correct']}/{s['n']}"]
    for part in ("restart_ms", "load_ms", "fetch_ms", "create_ms", "answer_ms", *FIRST_ANSWER_MARKS):
        if f"median_{part}" in cell:
            parts.append(f"{part.removesuffix('_ms')} {cell[f'median_{part}']:.0f}")
    if "target_ms" in cell:
        parts.append(f"target {cell['target_ms']:.0f} {'met' if cell['target_met'] else 'MISSED'}")
    return "  ".join(parts)


def run(trials: int, quick: bool, smollm2: bool = True) -> dict[str, Any]:
    import ray

    result: dict[str, Any] = {
        "benchmark": "startup", "quick": quick,
        "when": utc_now(),
        "machine": machine(),
        "trials_per_cell": trials, "tolerance": TOLERANCE, "cells": [],
    }
    cells = result["cells"]
    launch = chromium_launch_floor(trials)
    result["floors"] = {"chromium_launch": summary_ms(launch)}
    print(f"floor: bare Chromium launch p50 {result['floors']['chromium_launch']['median_ms']:.0f} ms", flush=True)
    temp = Path(tempfile.mkdtemp(prefix="wpstart-", dir="/tmp"))
    started_ray = not ray.is_initialized()       # a test shares its session's Ray
    try:
        if started_ray:
            cells.append(_cell("pool_first_answer_new_ray", pool_first_answer_new_ray_trials(trials, temp)))
            start_local_ray(temp / "ray")
        else:
            result["not_measured"] = {"pool_first_answer_new_ray": "needs a Ray of its own per trial; this run "
                                                                   "shares the caller's"}
        minilm = MiniLM()
        restarts = [_cell("restart_minilm", restart_trials(minilm, spare, trials), spare=spare)
                    for spare in (False, True)]
        restarts += [_cell("after_sigkill_medium", after_sigkill_trials(spare, trials, temp), spare=spare)
                     for spare in (False, True)]
        # After the restarts: their actors have taken the workers Ray started ahead for this driver, so each
        # of these pools waits for new worker processes, as any pool after a Ray's first does.
        cells.append(_cell("pool_first_answer", pool_first_answer_trials(trials, temp)))
        cells.extend(restarts)
        if smollm2:
            model = SmolLM2()
            for spare in (False, True):
                cells.append(_cell("restart_smollm2", restart_trials(model, spare, trials), spare=spare))
    finally:
        if started_ray:
            ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    spared = [c for c in cells if c.get("spare") and "median_runtime_warm_up_ms" in c]
    result["floors"]["runtime_warm_up"] = summary_ms(
        [r["runtime_warm_up_ms"] for c in spared for r in c["trials"] if r["runtime_warm_up_ms"] is not None])
    # A launched process's page creates the session once its runtime is set up (a spare already holds it).
    result["floors"]["minilm_session_create"] = summary_ms(
        [r["create_ms"] for c in cells if c["case"] == "restart_minilm" and not c["spare"] for r in c["trials"]
         if "create_ms" in r])
    ended(result["machine"])
    return result


def plot(result: dict[str, Any], path: Path) -> Path:
    from matplotlib.figure import Figure  # no pyplot: no global backend to set, renders with Agg

    cells = result["cells"]
    fig = Figure(figsize=(9, 3.8))
    ax = fig.add_subplot()
    labels, p50, p95, colors = [], [], [], []
    for c in cells:
        spare = c.get("spare")
        labels.append(CHART_LABELS.get(c["case"], c["case"].replace("_", " "))
                      + ("" if spare is None else f"\nspare {'on' if spare else 'off'}"))
        p50.append(c["summary"]["median_ms"] / 1000)
        p95.append(c["summary"]["p95_ms"] / 1000)
        colors.append("#2ca02c" if spare else "#7f7f7f" if spare is False else "#1f77b4")
    x = np.arange(len(cells))
    ax.bar(x, p50, color=colors, label="p50")
    ax.errorbar(x, p50, yerr=[np.zeros(len(x)), np.subtract(p95, p50)], fmt="none", ecolor="black",
                capsize=3, label="p95")
    for i, c in enumerate(cells):
        if "target_ms" in c:
            ax.hlines(c["target_ms"] / 1000, i - 0.4, i + 0.4, colors="#d62728", linestyles="--",
                      label="target" if i == 0 or "target" not in ax.get_legend_handles_labels()[1] else None)
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("seconds")
    floor = result["floors"]["chromium_launch"]["median_ms"]
    ax.set_title(f"Start-up and restart, {result['trials_per_cell']} trials each "
                 f"(bare Chromium launch: {floor:.0f} ms p50)", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    return save_chart(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=plain(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10, help="trials per case (default 10)")
    parser.add_argument("--quick", action="store_true", help="2 trials per case, no SmolLM2 (CI size)")
    args = parser.parse_args(argv)
    if args.trials < 1:
        parser.error("--trials must be at least 1")
    configure_auth_env()
    r = run(2 if args.quick else args.trials, args.quick, smollm2=not args.quick)
    out = write_results("startup", args.quick, r)
    png = plot(r, results_dir() / f"startup{'-quick' if args.quick else ''}.png")
    print(f"wrote {out} and {png}")
    return r


if __name__ == "__main__":
    main()
