"""The recovery benchmark's Ray baselines: the plain Ray actor owning a BrowserCore (``PlainBrowserActor``,
``run_baseline``), the careful one that restarts itself on its browser's failure signals
(``WatchfulBrowserActor``, ``run_watchful_baseline``), and the pool's ratios against them
(``_baseline_ratios``)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.recovery_common import (
    MODEL,
    OPEN_TIMEOUT,
    TOLERANCE,
    Config,
    Workload,
    _answer,
    _max_err,
    ratio,
)
from benchmarks.results import summary_ms

log = logging.getLogger(__name__)

WATCHFUL_WAIT_S = 60.0              # the careful Ray actor's restart and re-run: ~5 s here; more is "never"


def baseline_verdict(answered: bool, errors: int, kind: str, waited_s: float) -> str:
    """The baseline's outcome in words, for faults where it may never answer.

    Answered at the first call with no error: the fault did not break it (no memory ceiling; the GPU
    process on wasm), which is no recovery and gets no ratio.
    """
    if answered:
        return "unaffected (answered at once, no error)" if errors == 0 else "answered"
    return f"never ({kind}; waited {waited_s:g} s)"


# ----- the baseline: a plain Ray actor, what a Ray user writes today ---------------------------------------
class PlainBrowserActor:
    """One BrowserCore with MiniLM loaded in ``__init__``; Ray's restart options are its only fault tolerance.

    Ray runs ``__init__`` synchronously (inside a running loop of its own), so the actor drives the async
    BrowserCore on an event loop in a thread it owns; Playwright objects stay bound to that loop.
    """

    def __init__(self) -> None:
        from actors.browser import BrowserCore
        from sharding.models.registry import artifacts

        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="browser-loop", daemon=True).start()
        [self.art] = artifacts(MODEL)
        self.core = BrowserCore(f"baseline-{os.getpid()}")
        self._call(self._start())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def _start(self) -> None:
        await self.core.start()
        await self.core.load_model(self.art.key, np.fromfile(self.art.path, np.uint8), self.art.sha256, "wasm")

    def embed(self, texts: list[str]) -> dict[str, Any]:
        from sharding.models import minilm

        out = self._call(self.core.run(self.art.key, minilm.tokenize(texts), fetch=["embedding"]))
        return {"embedding": out["outputs"]["embedding"], "browser_id": self.core.browser_id}

    def pid(self) -> int:
        return os.getpid()

    def inject(self, kind: str, mb: int = 256) -> dict[str, Any]:
        from actors.faults import inject_fault

        return self._call(inject_fault(self.core, kind, mb))

    def close(self) -> None:
        self._call(self.core.close())


class WatchfulBrowserActor(PlainBrowserActor):
    """What a careful Ray user writes: the plain actor, but it watches its browser and, on any sign that the
    browser is gone or stuck, ends its own process so that Ray restarts it (``max_restarts``, which re-runs
    ``__init__``: a new browser, the model loaded again) and runs the call again (``max_task_retries``).

    The signs are BrowserCore's own failure signals (the browser process's exit, the page's crash event, a
    lost CDP connection) and a deadline on every call (the pool's request budget). The process ends with
    ``os._exit``: ``ray.actor.exit_actor()`` is an intended exit, after which Ray does not restart the actor.
    """

    def __init__(self, deadline_s: float) -> None:
        super().__init__()
        self.deadline_s = deadline_s
        asyncio.run_coroutine_threadsafe(self._watch(), self.loop)

    async def _watch(self) -> None:
        while not await self.core.signal.wait(3600.0):
            pass
        os._exit(1)

    def embed(self, texts: list[str]) -> dict[str, Any]:
        from events.errors import BrowserFailure
        from sharding.models import minilm

        try:
            out = self._call(self.core.run(self.art.key, minilm.tokenize(texts), fetch=["embedding"],
                                           timeout=self.deadline_s))
        except BrowserFailure:
            os._exit(1)
        return {"embedding": out["outputs"]["embedding"], "browser_id": self.core.browser_id}


def _baseline_kill(actor: Any, work: Workload) -> dict[str, Any]:
    import ray

    pid = ray.get(actor.pid.remote())
    t0 = time.perf_counter()
    os.kill(pid, signal.SIGKILL)
    answer = _answer(actor.embed.remote(work.texts), work.reference, t0)
    new_pid = ray.get(actor.pid.remote()) if answer["correct"] else None
    return {"fault": "kill_actor", "answered": answer["correct"], "time_to_result_ms": answer["ms"] if answer["correct"]
            else None, "error": answer["error"], "restarted_pid_differs": new_pid is not None and new_pid != pid}


def _baseline_other(actor: Any, fault: str, cfg: Config, work: Workload) -> dict[str, Any]:
    """A browser-level fault: keep calling (as a client would, every 0.1 s after an error) until a correct
    answer or ``zombie_wait_s``."""
    import ray

    mb = cfg.memory_limit_mb // 2 + 256     # the baseline has no ceiling: this much ballast, as a leak would
    t0 = time.perf_counter()
    inject_error = None
    try:
        ray.get(actor.inject.remote(fault, mb), timeout=60)
    except Exception as exc:
        inject_error = f"{type(exc).__name__}: {str(exc)[:300]}"
    deadline = t0 + cfg.zombie_wait_s
    errors: dict[str, int] = {}
    ttr = None
    pending = None
    while time.perf_counter() < deadline and inject_error is None:
        pending = pending or actor.embed.remote(work.texts)
        try:
            out = ray.get(pending, timeout=max(0.0, deadline - time.perf_counter()))
        except ray.exceptions.GetTimeoutError:
            errors["no answer (call still running)"] = errors.get("no answer (call still running)", 0) + 1
            break
        except Exception as exc:
            cause = getattr(exc, "cause", None) or exc
            key = f"{type(cause).__name__}: {str(cause)[:120]}"
            errors[key] = errors.get(key, 0) + 1
            pending = None
            time.sleep(0.1)
            continue
        pending = None
        if _max_err(out["embedding"], work.reference) <= TOLERANCE:
            ttr = (time.perf_counter() - t0) * 1000
            break
        errors["wrong answer"] = errors.get("wrong answer", 0) + 1
    waited = (time.perf_counter() - t0)
    kind = "hang" if fault == "hang" else "zombie"
    return {"fault": fault, "answered": ttr is not None, "time_to_result_ms": ttr, "inject_error": inject_error,
            "waited_s": round(waited, 2), "errors": errors,
            "verdict": baseline_verdict(ttr is not None, sum(errors.values()), kind, cfg.zombie_wait_s)
            if inject_error is None
            else f"fault could not be injected: {inject_error}"}


def run_baseline(cfg: Config, work: Workload, advance: Callable[[str], None]) -> dict[str, Any]:
    """Kill trials each need a fresh actor (max_restarts=1 is spent by one kill); the restarted actor then
    serves one browser-level fault trial (Ray's restart budget plays no part in those)."""
    import ray

    Plain = ray.remote(max_restarts=1, max_task_retries=1, num_cpus=0)(PlainBrowserActor)
    kills = cfg.baseline_kill_trials if "kill_actor" in cfg.faults else 0
    others = [f for f in cfg.faults if f != "kill_actor" for _ in range(cfg.baseline_other_trials)]
    cold, kill_trials = [], []
    other_trials: dict[str, list[dict[str, Any]]] = {}
    errors: list[str] = []
    while (kills > 0 or others) and len(errors) < 3:
        t0 = time.perf_counter()
        actor = Plain.remote()
        try:
            ray.get(actor.pid.remote(), timeout=OPEN_TIMEOUT)
            cold.append((time.perf_counter() - t0) * 1000)
            warm = _answer(actor.embed.remote(work.texts), work.reference, time.perf_counter())
            if not warm["correct"]:
                raise RuntimeError(f"baseline actor answered wrongly before any fault: {warm}")
            healthy = True
            if kills > 0:
                advance(f"baseline kill_actor ({len(kill_trials) + 1}/{cfg.baseline_kill_trials})")
                kill_trials.append(_baseline_kill(actor, work))
                healthy = kill_trials[-1]["answered"]
                kills -= 1
            if others and healthy:
                fault = others.pop(0)
                advance(f"baseline {fault}")
                other_trials.setdefault(fault, []).append(_baseline_other(actor, fault, cfg, work))
        except Exception as exc:     # an actor that would not start: try another, at most 3 times in all
            errors.append(f"{type(exc).__name__}: {str(exc)[:300]}")
            log.warning("baseline actor failed", extra={"error": errors[-1]})
        finally:
            ray.kill(actor, no_restart=True)
    faults: dict[str, Any] = {}
    if kill_trials:
        faults["kill_actor"] = {
            "measure": "SIGKILL of the actor process from the driver, then a call issued right after: time to "
                       "its correct answer (Ray restarts the actor and re-runs __init__)",
            "answered": sum(t["answered"] for t in kill_trials), "trials": kill_trials,
            "time_to_result": summary_ms([t["time_to_result_ms"] for t in kill_trials if t["answered"]]),
            "verdict": "answered" if all(t["answered"] for t in kill_trials) else "not always answered",
        }
    for fault, trials in other_trials.items():
        answered = [t for t in trials if t["answered"]]
        faults[fault] = {
            "measure": f"fault injected, then calls until a correct answer or {cfg.zombie_wait_s:g} s",
            "answered": len(answered), "trials": trials,
            "time_to_result": summary_ms([t["time_to_result_ms"] for t in answered]),
            "verdict": trials[0]["verdict"] if len({t["verdict"] for t in trials}) == 1 else "mixed",
        }
    return {"actor": "plain Ray actor owning BrowserCore + MiniLM (loaded in __init__), max_restarts=1, "
                     "max_task_retries=1, num_cpus=0",
            "cold_start": summary_ms(cold), "faults": faults, "errors": errors}


def _watchful_trial(actor: Any, fault: str, cfg: Config, work: Workload) -> dict[str, Any]:
    """The fault, then a call timed to its correct answer (Ray restarts the actor and re-runs the call)."""
    import ray

    pid = ray.get(actor.pid.remote(), timeout=OPEN_TIMEOUT)
    t0 = time.perf_counter()
    inject_error = None
    if fault == "kill_actor":
        os.kill(pid, signal.SIGKILL)
    else:
        try:     # not retried: run again on the restarted actor, it would break the new browser too
            ray.get(actor.inject.options(max_task_retries=0).remote(fault, cfg.memory_limit_mb // 2 + 256),
                    timeout=60)
        except ray.exceptions.RayActorError:
            pass     # the actor ended itself on the fault's signal while the injection returned
        except Exception as exc:
            inject_error = f"{type(exc).__name__}: {str(exc)[:300]}"
    answer = _answer(actor.embed.remote(work.texts), work.reference, t0, timeout=WATCHFUL_WAIT_S)
    new_pid = ray.get(actor.pid.remote(), timeout=OPEN_TIMEOUT) if answer["correct"] else None
    return {"fault": fault, "answered": answer["correct"],
            "time_to_result_ms": answer["ms"] if answer["correct"] else None, "error": answer["error"],
            "inject_error": inject_error, "restarted": new_pid is not None and new_pid != pid}


def run_watchful_baseline(cfg: Config, work: Workload, advance: Callable[[str], None]) -> dict[str, Any]:
    """The careful Ray actor (``WatchfulBrowserActor``) through every fault, ``baseline_kill_trials`` times
    each, one actor for all of them (it restarts as often as it must)."""
    import ray

    Watchful = ray.remote(max_restarts=-1, max_task_retries=-1, num_cpus=0)(WatchfulBrowserActor)
    faults: dict[str, Any] = {}
    errors: list[str] = []
    cold: list[float] = []
    t0 = time.perf_counter()
    actor = Watchful.remote(cfg.request_timeout)
    try:
        ray.get(actor.pid.remote(), timeout=OPEN_TIMEOUT)
        cold.append((time.perf_counter() - t0) * 1000)
        for fault in cfg.faults:
            trials = []
            for i in range(cfg.baseline_kill_trials):
                advance(f"careful Ray actor {fault} ({i + 1}/{cfg.baseline_kill_trials})")
                warm = _answer(actor.embed.remote(work.texts), work.reference, time.perf_counter(),
                               timeout=WATCHFUL_WAIT_S)
                if not warm["correct"]:
                    raise RuntimeError(f"the careful Ray actor answered wrongly before {fault}: {warm}")
                trials.append(_watchful_trial(actor, fault, cfg, work))
            answered = [t for t in trials if t["answered"]]
            faults[fault] = {
                "measure": f"fault injected, then a call timed to its correct answer (at most {WATCHFUL_WAIT_S:g} s)",
                "answered": len(answered), "trials": trials,
                "time_to_result": summary_ms([t["time_to_result_ms"] for t in answered]),
                "verdict": "answered" if len(answered) == len(trials) else
                           f"never (no correct answer within {WATCHFUL_WAIT_S:g} s)" if not answered else
                           "not always answered",
            }
    except Exception as exc:
        errors.append(f"{type(exc).__name__}: {str(exc)[:300]}")
        log.warning("careful baseline actor failed", extra={"error": errors[-1]})
    finally:
        ray.kill(actor, no_restart=True)
    return {"actor": "careful Ray actor: the plain one, plus it ends its process on its browser's failure signals "
                     f"or a {cfg.request_timeout:g} s call deadline, so Ray restarts it (max_restarts=-1, "
                     "max_task_retries=-1, model reloaded in __init__)",
            "cold_start": summary_ms(cold), "faults": faults, "errors": errors}


def _baseline_ratios(cases: list[dict[str, Any]], baseline: dict[str, Any],
                     key: str = "vs_baseline") -> None:
    for case in cases:
        base = baseline["faults"].get(case["fault"])
        ttr = case["summary"]["time_to_result"]
        if base is None:
            case[key] = None
        elif base["verdict"] != "answered" or base["answered"] < len(base["trials"]):
            # Never answered (zombie, hang), or was never broken: no ratio, the verdict instead.
            case[key] = {"baseline": base["verdict"], "ratio_median": None}
        elif ttr is None:
            case[key] = {"baseline": "answered", "ratio_median": None}
        else:
            case[key] = {
                "baseline": "answered",
                "ratio_median": ratio(ttr["median_ms"], base["time_to_result"]["median_ms"]),
                "ratio_p95": ratio(ttr["p95_ms"], base["time_to_result"]["p95_ms"]),
                "times_faster_median": ratio(base["time_to_result"]["median_ms"], ttr["median_ms"]),
            }
