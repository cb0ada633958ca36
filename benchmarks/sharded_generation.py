"""Layer-sharded generation on real browsers: decode speed per shard count, and the cost of a shard failure.

1. Decode tokens/s of ``pool.generate(model, prompt, shards=n)`` for n = 1, 2, 3 against native CPU
   onnxruntime on the whole model (the same ONNX builder, 1 thread, as the pages use 1 wasm thread). Same
   prompt, same number of tokens; every run's tokens are checked identical to the native ones.
2. A mid-generation shard failure: with 3 shards, the middle shard's browser process is SIGKILLed
   (``pool.inject_fault(..., "kill_browser")``) once the session has produced ``kill_after`` tokens.
   - replay onto a restarted browser (level medium, strategy coordinated): the pool restarts that
     browser, reloads its shard and replays the session's prefix on it; the generation goes on.
   - replay onto the warm standby (level high, shadows off): the standby, which already holds the
     shard, takes the browser's place and the prefix is replayed on it.
   - shadow (level high, the default there): each shard also runs on a shadow browser fed the same
     hidden states; the shadow of the killed shard takes over with no replay. Its price is a second
     forward per shard per step: its no-fault decode tokens/s, next to replay's, is the cost.
   - baseline: what happens without any of that. A pool at level none reports the failure; the failed
     browser is restarted (``recover_browser(strategy="restart")``: a new process, its shard loaded again)
     and the whole generation is run again from the first token.
   Clean and faulted runs alternate on the same pool (clean, faulted, clean, ...), each after the pool has
   settled (no recovery or operation open, no event for 1 s, the standbys it is configured with up and
   warmed up, then up to 30 s for the spare processes it expects; each run records whether they were
   ready), so that a run pays for its own fault only. Before
   each pair the pool generates until it runs at steady speed again (a restarted browser's page starts on
   V8's baseline WebAssembly); each run records how many generations that took.
   Each is timed from the request to the correct answer; a faulted run's extra latency is its time minus
   that of the clean run just before it (paired: the shared machine's drift cancels). Ratios are each
   recovery's median extra latency over the baseline's.

No target is asserted: the machine may be shared. Prints a table and writes
``results/sharded_generation.json`` (``sharded_generation-quick.json`` with --quick: tiny-llama, fewer runs).
Run: ``python -m benchmarks.sharded_generation [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.pool_trials import spares_not_ready
from benchmarks.results import ended, load_text, machine, summary, utc_now, write_results
from events.state import SessionTokens, browsers_alive
from webpool.helptext import plain
from webpool.localray import configure_auth_env, start_local_ray

PROMPT = "The capital of France is"
SHARD_COUNTS = (1, 2, 3)
FAULT_SHARDS = 3
BASELINE = "fault_restart_from_scratch"
# (results key, the pool's fault_tolerance, its max_connections), for the middle-shard kill.
FAULT_CONFIGS: tuple[tuple[str, dict[str, Any], int], ...] = (
    ("fault_prefix_replay", {"level": "medium", "recovery_strategy": "coordinated"}, FAULT_SHARDS),
    ("fault_standby_replay", {"level": "high", "shadow_shards": False, "standby_browsers": 1}, FAULT_SHARDS),
    ("fault_shadow", {"level": "high", "standby_browsers": 0}, 2 * FAULT_SHARDS),
    (BASELINE, {}, FAULT_SHARDS),                     # level none: failures reach the caller
)
FAULT_LABELS = {"fault_prefix_replay": "replay onto restarted browser (medium)",
                "fault_standby_replay": "replay onto warm standby (high, no shadows)",
                "fault_shadow": "shadow takes over (high)",
                BASELINE: "restart browser + generate again (baseline)"}


def native_runs(model_name: str, prompt: str, tokens: int, repeats: int) -> dict[str, Any]:
    """Greedy decode with CPU onnxruntime on the whole model, 1 thread; ``repeats`` timed runs."""
    from sharding.models import llama_onnx
    from sharding.models.registry import llama_model

    model = llama_model(model_name)
    chain = llama_onnx.OrtShardChain(llama_onnx.build_shards(model, [(0, model.config.n_layers)]), threads=1)
    ids = model.encode(prompt)
    chain.greedy(ids, 2)                                              # warm
    tps, prefill, token_ids = [], [], None
    for _ in range(repeats):
        chain.reset()
        t0 = time.perf_counter()
        _, indices = chain.step(ids)
        prefill.append((time.perf_counter() - t0) * 1000)
        out, t1 = [int(indices[0])], time.perf_counter()
        while len(out) < tokens and out[-1] != model.config.eos_id:
            _, indices = chain.step([out[-1]])
            out.append(int(indices[0]))
        tps.append((len(out) - 1) / (time.perf_counter() - t1))
        token_ids = out
    return {"token_ids": token_ids, "decode_tokens_per_s": summary(tps), "prefill_ms": summary(prefill)}


def wait_for_tokens(pool: Any, seq: int, n: int, timeout: float = 120.0) -> dict[str, Any] | None:
    """The plan of the first session opened after ``seq`` to produce ``n`` tokens (None if none did in time),
    followed in the pool's log by long poll (``events_since``). Polling ``get_state`` instead, as this did
    before, copied the pool's whole state 200 times a second and slowed the generation it was timing."""
    import ray

    watch = SessionTokens(last_seq=seq)
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        watch.add(ray.get(pool.events_since.remote(watch.last_seq, min(left, 5.0))))
        if (session := watch.reached(n)) is not None:
            return watch.plans[session]
    return None


def timed_generate(pool: Any, model: str, tokens: int, shards: int) -> tuple[float, dict[str, Any]]:
    import ray

    t0 = time.perf_counter()
    out = ray.get(pool.generate.remote(model, PROMPT, max_new_tokens=tokens, shards=shards))
    return (time.perf_counter() - t0) * 1000, out


SETTLE_TIMEOUT_S = 300.0
SETTLE_QUIET_S = 1.0          # no new event for this long
SPARE_WAIT_S = 30.0           # then at most this long for the browsers' spare processes to be ready


def standbys_not_ready(state: Any) -> str | None:
    """Why the pool's standbys are not yet what its configuration asks for, or None: as many alive as
    ``standby_browsers`` (level high), each holding models, every one of them warmed up. A failover takes the
    standby; its replacement starts after a deferral (seconds with no event), then loads and warms up
    the shards, on the cores a generation needs: a run meanwhile measured that too (clean runs 2.4-3.1 s
    after faults against 1.95 s before the first, 2026-12-05)."""
    ft = state.config.get("options", {}).get("fault_tolerance", {})
    wanted = ft.get("standby_browsers", 0) if state.config.get("level") == "high" else 0
    standbys = [b.browser_id for b in browsers_alive(state) if b.standby]
    if len(standbys) < wanted:
        return f"{len(standbys)} of {wanted} standbys"
    for b in standbys:
        models = [m for m in state.models.values() if m.browser_id == b]
        if not models or not all(m.warmed_up for m in models):
            return f"standby {b} not warmed up"
    return None


def settle(pool: Any) -> bool:
    """Wait for the pool's steady state before a run: no recovery and no operation open, no event for a
    second and the standbys ready (``standbys_not_ready``), then (where the pool keeps spare processes) up
    to ``SPARE_WAIT_S`` for every spare it expects to be ready (each browser that has served a run keeps
    one; a standby that only warmed up does not).
    Otherwise a run measures the previous fault too: the dead browser is recovered once its session closes,
    and its new spare is prepared after that, both on the two cores the next generation needs.
    A spare may never come (none is started where it would leave under 2 GiB of memory free): returns whether
    every expected spare was ready, and the run is kept either way."""
    import ray

    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    last_seq, changed = -1, time.monotonic()
    while True:
        state = ray.get(pool.get_state.remote())
        if state.last_seq != last_seq:            # a standby being replaced and warmed up logs as it goes
            last_seq, changed = state.last_seq, time.monotonic()
        if not (state.recoveries or state.operations) and time.monotonic() - changed >= SETTLE_QUIET_S \
                and standbys_not_ready(state) is None:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"the pool did not settle within {SETTLE_TIMEOUT_S:.0f} s "
                               f"({standbys_not_ready(state) or 'work or events went on'})")
        time.sleep(0.1)
    spare_deadline = time.monotonic() + SPARE_WAIT_S
    while spares_not_ready(pool, state):
        if time.monotonic() > spare_deadline:
            return False
        time.sleep(0.25)
    return True


def start_and_kill_middle_shard(pool: Any, model: str, tokens: int, kill_after: int) -> tuple[float, Any, str]:
    """Start a generation over 3 shards and kill its middle shard's browser after ``kill_after`` tokens:
    (start time, the generation's ref, the killed browser)."""
    import ray

    seq = ray.get(pool.get_state.remote()).last_seq
    t0 = time.perf_counter()
    ref = pool.generate.remote(model, PROMPT, max_new_tokens=tokens, shards=FAULT_SHARDS)
    plan = wait_for_tokens(pool, seq, kill_after)
    if plan is None:
        raise RuntimeError(f"no session reached {kill_after} tokens")
    victim = plan["shards"][1]["browser_id"]
    ray.get(pool.inject_fault.remote(victim, "kill_browser"))
    return t0, ref, victim


def _generations_since(pool: Any, seq: int) -> int:
    """How many generate operations the pool started after ``seq`` (more than one for one call: it was rerun)."""
    import ray

    events = ray.get(pool.recent_events.remote(100_000))
    return sum(e["seq"] > seq and e["action"] == "OperationStarted" and e["data"]["kind"] == "generate"
               for e in events)


def faulted_in_flight(pool: Any, model: str, tokens: int, kill_after: int) -> dict[str, Any]:
    """One generation over 3 shards whose middle shard's browser is killed after ``kill_after`` tokens, and
    how it was recovered: inside the generation (a prefix "replay", or a shadow's "promotion"), as a "whole
    rerun" of the generation by the pool, or "not interrupted" (the kill landed after the last token)."""
    import ray

    seq = ray.get(pool.get_state.remote()).last_seq
    t0, ref, victim = start_and_kill_middle_shard(pool, model, tokens, kill_after)
    out = ray.get(ref, timeout=300)
    total_ms = (time.perf_counter() - t0) * 1000
    if out["replays"] or out["promotions"]:
        how = "replay" if out["replays"] else "promotion"
    else:
        how = "whole rerun" if _generations_since(pool, seq) > 1 else "not interrupted"
    return {"total_ms": total_ms, "token_ids": out["token_ids"], "recovered_by": how,
            "replays": len(out["replays"]), "promotions": len(out["promotions"]),
            "replay_ms": [r["ms"] for r in out["replays"]],
            "promotion_step_ms": [p["step_ms"] for p in out["promotions"]], "victim": victim}


def faulted_with_restart(pool: Any, model: str, tokens: int, kill_after: int) -> dict[str, Any]:
    """The baseline: the failure ends the generation; restart the browser, then generate from scratch
    ("restart and rerun"; "not interrupted" if the kill landed after the last token)."""
    import ray

    from events.errors import BrowserFailure

    t0, ref, victim = start_and_kill_middle_shard(pool, model, tokens, kill_after)
    try:
        out = ray.get(ref, timeout=300)
        return {"total_ms": (time.perf_counter() - t0) * 1000, "recovered_by": "not interrupted",
                "token_ids": out["token_ids"], "victim": victim}
    except BrowserFailure as exc:
        failure = getattr(exc, "cause", None) or exc          # Ray's wrapper carries the pool's error as cause
        t_fail = time.perf_counter()
        outcome = ray.get(pool.recover_browser.remote(failure.browser_id, failure.category.value, str(failure),
                                                      strategy="restart"))
        if not outcome["success"]:
            raise RuntimeError(f"restart of {failure.browser_id} failed: {outcome['error']}") from exc
        restart_ms = (time.perf_counter() - t_fail) * 1000
        out = ray.get(pool.generate.remote(model, PROMPT, max_new_tokens=tokens, shards=FAULT_SHARDS), timeout=300)
    return {"total_ms": (time.perf_counter() - t0) * 1000, "recovered_by": "restart and rerun",
            "restart_ms": restart_ms, "token_ids": out["token_ids"], "victim": victim}


RESTART_WARM_UP_MAX = 8       # generations at most to bring a restarted browser's page up to speed


def warm_up(pool: Any, model: str, tokens: int) -> int:
    """Generate until the pool runs at its steady speed (the standby warm-up's rule, on whole generations: at
    least three, the last two within 1.25x of the fastest); returns how many it took. A browser restarted by
    the last fault runs V8's baseline WebAssembly for its first ~80 runs (docs/facts.md): with one generation
    after a fault the next clean run was slowed by it, and the faulted runs looked cheaper than free."""
    from actors.decisions.warmup import warmed_up

    times: list[float] = []
    while not warmed_up(times, min_work_ms=0.0, max_rounds=RESTART_WARM_UP_MAX):
        times.append(timed_generate(pool, model, tokens, FAULT_SHARDS)[0])
    return len(times)


def fault_section(pool: Any, model: str, tokens: int, kill_after: int, repeats: int, expected: list[int],
                  in_flight: bool) -> dict[str, Any]:
    """Clean runs (the reference time) and faulted runs on the same pool, taken in turn: clean, faulted,
    clean, ... A shared machine's speed drifts by tens of percent over minutes (the same no-fault generation
    took 3.7-5.4 s in one minute here), so a block of clean runs followed by a block of faulted ones measured
    the drift as the fault's cost. ``in_flight``: the pool recovers inside the generation (else the baseline:
    restart the browser, generate again)."""
    timed_generate(pool, model, tokens, FAULT_SHARDS)                  # loads the shards; not timed
    clean, runs = [], []
    for _ in range(repeats):
        # The last fault's recovery done, its restarted browser brought up to speed (and so its new spare
        # prepared), then the pair: a clean run and a faulted one, each from a settled pool.
        settle(pool)
        warm_ups = warm_up(pool, model, tokens)
        settle(pool)
        clean.append(timed_generate(pool, model, tokens, FAULT_SHARDS))
        spares_ready = settle(pool)
        run = (faulted_in_flight if in_flight else faulted_with_restart)(pool, model, tokens, kill_after)
        run |= {"spares_ready": spares_ready, "clean_before_ms": clean[-1][0], "warm_up_generations": warm_ups}
        runs.append(run)
    identical = all(out["token_ids"] == expected for _, out in clean) and all(
        run["token_ids"] == expected for run in runs)
    # Every run is kept and counted by how it was recovered; the times are those of the runs the kill interrupted.
    # A faulted run's extra time is taken against the clean run just before it (paired, so drift cancels).
    hit = [r for r in runs if r["recovered_by"] != "not interrupted"]
    extra = [r["total_ms"] - r["clean_before_ms"] for r in hit]
    section = {"clean_total_ms": summary([ms for ms, _ in clean]),
               "clean_decode_tokens_per_s": summary([out["metrics"]["decode_tokens_per_s"] for _, out in clean]),
               "shadows": clean[0][1]["metrics"].get("shadows", 0),
               "recovered_by": dict(Counter(r["recovered_by"] for r in runs)),
               "faulted_total_ms": summary([r["total_ms"] for r in hit]),
               "extra_latency_ms": summary(extra), "runs": runs, "tokens_identical": identical}
    if in_flight:
        section["replays_per_run"] = [r["replays"] for r in runs]
        section["promotions_per_run"] = [r["promotions"] for r in runs]
        section["replay_ms"] = summary([ms for r in runs for ms in r["replay_ms"]])
        section["promotion_step_ms"] = summary([ms for r in runs for ms in r["promotion_step_ms"]])
    else:
        section["restart_ms"] = summary([r["restart_ms"] for r in hit])
    return section


def run(quick: bool, runs: int | None = None) -> dict[str, Any]:
    import ray

    from webpool import ResourcePool

    model = "tiny-llama" if quick else "smollm2-135m"
    tokens = 48 if quick else 32
    repeats = runs or (3 if quick else 10)      # >= 10 for a table the README publishes (median and p95)
    kill_after = 8 if quick else 12
    results: dict[str, Any] = {
        "benchmark": "sharded_generation", "quick": quick,
        "date": utc_now(),
        "machine": machine(),
        "model": model, "prompt": PROMPT, "new_tokens": tokens, "repeats": repeats, "kill_after_tokens": kill_after,
    }
    native = native_runs(model, PROMPT, tokens, repeats)
    expected = native["token_ids"]
    results["native_onnxruntime_1_thread"] = {k: native[k] for k in ("decode_tokens_per_s", "prefill_ms")}

    temp = Path(tempfile.mkdtemp(prefix="wpshard-", dir="/tmp"))
    start_local_ray(temp / "ray")
    try:
        pool = ResourcePool.remote(max_connections=FAULT_SHARDS, event_log=str(temp / "events-decode"),
                                   request_timeout=60.0)
        decode: dict[str, Any] = {}
        for n in SHARD_COUNTS:
            timed_generate(pool, model, tokens, n)                      # loads the shards; not timed
            outs = [timed_generate(pool, model, tokens, n)[1] for _ in range(repeats)]
            tps = [o["metrics"]["decode_tokens_per_s"] for o in outs]
            native_tps = native["decode_tokens_per_s"]["median"]
            decode[str(n)] = {
                "decode_tokens_per_s": summary(tps),
                "prefill_ms": summary([o["metrics"]["prefill_ms"] for o in outs]),
                "shard_compute_ms_per_token": np.median([o["metrics"]["shard_compute_ms"] for o in outs],
                                                        axis=0).tolist(),
                "hop_ms_per_token": (np.median([o["metrics"]["hop_ms"] for o in outs], axis=0).tolist()
                                     if n > 1 else []),
                "ratio_vs_native_median": summary(tps)["median"] / native_tps,
                "tokens_identical": all(o["token_ids"] == expected for o in outs),
            }
        results["decode"] = decode
        ray.get(pool.shutdown.remote())
        ray.kill(pool)

        # Fresh pools for the fault runs, so that each holds only the 3-shard artifacts: a restarted browser
        # reloads every model it held, and the decode runs above left 1- and 2-shard artifacts around.
        for key, options, browsers in FAULT_CONFIGS:
            pool = ResourcePool.remote(max_connections=browsers, event_log=str(temp / f"events-{key}"),
                                       request_timeout=60.0, fault_tolerance=options)
            results[key] = fault_section(pool, model, tokens, kill_after, repeats, expected,
                                         in_flight=key != BASELINE)
            ray.get(pool.shutdown.remote())
            ray.kill(pool)
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)

    ended(results["machine"])
    restart = results[BASELINE]["extra_latency_ms"]
    for key, _options, _browsers in FAULT_CONFIGS:
        extra = results[key]["extra_latency_ms"]
        if key != BASELINE and extra and restart:
            results[key]["extra_latency_vs_baseline"] = {"median": extra["median"] / restart["median"],
                                                         "p95": extra["p95"] / restart["p95"]}
    replay, shadow = results["fault_prefix_replay"], results["fault_shadow"]
    if replay["clean_decode_tokens_per_s"] and shadow["clean_decode_tokens_per_s"]:
        results["shadow_decode_cost"] = (shadow["clean_decode_tokens_per_s"]["median"]
                                         / replay["clean_decode_tokens_per_s"]["median"])
    results["tokens_identical"] = (all(d["tokens_identical"] for d in results["decode"].values())
                                   and all(results[key]["tokens_identical"] for key, _o, _b in FAULT_CONFIGS))
    return results


def _fmt(s: dict[str, float] | None, key: str = "median", digits: int = 1) -> str:
    return "-" if s is None else f"{s[key]:.{digits}f}"


def print_table(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title=f"sharded generation: {r['model']}, {r['new_tokens']} tokens, {r['repeats']} runs "
                    f"({r['date']}, {r['machine']['cpus']} CPUs{load_text(r['machine'])}"
                    f"{', quick' if r['quick'] else ''})")
    for col in ("configuration", "decode tok/s median", "p95", "prefill ms median", "vs native", "same tokens"):
        t.add_column(col)
    nat = r["native_onnxruntime_1_thread"]
    t.add_row("onnxruntime CPU, 1 thread, whole model", _fmt(nat["decode_tokens_per_s"]),
              _fmt(nat["decode_tokens_per_s"], "p95"), _fmt(nat["prefill_ms"]), "1.00x", "(reference)")
    for n, d in r["decode"].items():
        t.add_row(f"webpool, {n} shard(s)", _fmt(d["decode_tokens_per_s"]), _fmt(d["decode_tokens_per_s"], "p95"),
                  _fmt(d["prefill_ms"]), f"{d['ratio_vs_native_median']:.2f}x", str(d["tokens_identical"]))
    console.print(t)

    f = Table(title=f"middle shard of {FAULT_SHARDS} killed after {r['kill_after_tokens']} tokens")
    for col in ("recovery", "runs: how recovered", "no-fault tok/s", "no-fault total ms", "faulted total ms median",
                "p95", "extra ms median", "p95", "extra vs baseline", "same tokens"):
        f.add_column(col)
    for key, _options, _browsers in FAULT_CONFIGS:
        s = r[key]
        ratio = s.get("extra_latency_vs_baseline")
        how = ", ".join(f"{k} {v}" for k, v in s["recovered_by"].items())
        f.add_row(FAULT_LABELS[key], how, _fmt(s["clean_decode_tokens_per_s"]), _fmt(s["clean_total_ms"], digits=0),
                  _fmt(s["faulted_total_ms"], digits=0), _fmt(s["faulted_total_ms"], "p95", 0),
                  _fmt(s["extra_latency_ms"], digits=0), _fmt(s["extra_latency_ms"], "p95", 0),
                  f"{ratio['median']:.2f}x" if ratio else "-", str(s["tokens_identical"]))
    if "shadow_decode_cost" in r:
        f.caption = f"no-fault decode with shadows / without: {r['shadow_decode_cost']:.2f}x"
    console.print(f)


def markdown(r: dict[str, Any]) -> str:
    """The README's two tables from a results JSON. Decode speed shows the slowest run beside the median (the
    tail that matters for a rate); each fault row counts its runs by how they were recovered and by whether
    the pool's expected spare processes were ready when the kill came."""
    from actors.decisions.recovery import FaultToleranceConfig  # imports ray: after configure_auth_env

    nat = r["native_onnxruntime_1_thread"]
    native_tps = nat["decode_tokens_per_s"]["median"]
    lines = ["| configuration | decode tok/s median (slowest run) | prefill ms median | vs native | same tokens |",
             "|---|---|---|---|---|",
             f"| onnxruntime CPU, 1 thread, whole model | {_fmt(nat['decode_tokens_per_s'])} "
             f"({_fmt(nat['decode_tokens_per_s'], 'min')}) | {_fmt(nat['prefill_ms'], digits=0)} | 1.00x | reference |"]
    for n, d in r["decode"].items():
        tps = d["decode_tokens_per_s"]
        lines.append(f"| webpool, {n} shard{'s' if n != '1' else ''} | {_fmt(tps)} ({_fmt(tps, 'min')}) | "
                     f"{_fmt(d['prefill_ms'], digits=0)} | {tps['median'] / native_tps:.2f}x | "
                     f"{'yes' if d['tokens_identical'] else 'NO'} |")
    lines += ["", "| recovery | runs (how recovered; spares ready) | no-fault tok/s | no-fault ms | "
                  "faulted ms median / p95 | extra ms median / p95 | extra vs baseline | same tokens |",
              "|---|---|---|---|---|---|---|---|"]
    for key, options, _browsers in FAULT_CONFIGS:
        s = r[key]
        ratio = s.get("extra_latency_vs_baseline")
        how = ", ".join(f"{k} {v}" for k, v in s["recovered_by"].items())
        keeps_spares = FaultToleranceConfig.from_options(options).restarts_in_place     # the pool's default
        ready = (f"{sum(bool(run.get('spares_ready')) for run in s['runs'])}/{len(s['runs'])}" if keeps_spares
                 else "none kept")
        vs_baseline = f"{ratio['median']:.2f}x" if ratio else "1.00x"      # the baseline row is its own unit
        lines.append(
            f"| {FAULT_LABELS[key]} | {how}; {ready} | {_fmt(s['clean_decode_tokens_per_s'])} | "
            f"{_fmt(s['clean_total_ms'], digits=0)} | {_fmt(s['faulted_total_ms'], digits=0)} / "
            f"{_fmt(s['faulted_total_ms'], 'p95', 0)} | {_fmt(s['extra_latency_ms'], digits=0)} / "
            f"{_fmt(s['extra_latency_ms'], 'p95', 0)} | {vs_baseline} | "
            f"{'yes' if s['tokens_identical'] else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    configure_auth_env()
    parser = argparse.ArgumentParser(description=plain(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI size: tiny-llama, 3 runs each")
    parser.add_argument("--runs", type=int, default=None,
                        help="runs per configuration (default 10; 3 with --quick)")
    parser.add_argument("--markdown", type=Path, metavar="JSON",
                        help="print the results in JSON as the README's markdown tables and exit")
    args = parser.parse_args(argv)
    if args.markdown is not None:
        r = json.loads(args.markdown.read_text())
        print(markdown(r))
        return r
    if args.runs is not None and args.runs < 1:
        parser.error(f"--runs must be >= 1, got {args.runs}")
    r = run(args.quick, args.runs)
    out = write_results("sharded_generation", args.quick, r)
    print_table(r)
    print(f"wrote {out}")
    return r


if __name__ == "__main__":
    main()
