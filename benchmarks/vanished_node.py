"""The recovery benchmark's vanished node: a node removed under load on a multi-node cluster of its own, run
by the cluster tests' scenario script (``run_vanished_node``), and its trials read and summed up."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson

from benchmarks.recovery_common import _fmt
from benchmarks.results import summary_ms

# The vanished node is measured on a real multi-node cluster on this machine, by the cluster tests' own
# scenario script (a process of its own: one process joins one Ray cluster).
CLUSTER_SCENARIOS = Path(__file__).resolve().parent.parent / "tests" / "cluster_scenarios.py"
VANISHED_NODE_SETUP = ("ray.cluster_utils.Cluster of a head and four workers on this machine, Ray's default settings; "
                       "pool at level high (progressive, 1 standby) pinned to the head; the node of a serving browser "
                       "removed without notice, its processes frozen (calls to it hang, as across a lost network), "
                       "with 24 requests in flight (12 answered before)")


def vanished_node_trial(observed: dict[str, Any]) -> dict[str, Any]:
    """One node-loss run, from the cluster scenario's observations: every answer's correctness, the time to
    result of the requests in flight when the node went (sent before, answered after its removal), when the
    lost browsers were failed and by what (the pool's probes, or Ray's verdict on the node), and when Ray
    declared the node dead."""
    removed = observed.get("node_removed_ts")
    answers = observed.get("node_loss_answers") or []
    met = [a for a in answers if removed is not None and a.get("sent_ts", removed) < removed < a.get("done_ts", 0)]
    victims = set(observed.get("node_loss_victim_browsers") or [])
    failed = [f for f in observed.get("node_loss_failed") or [] if f["browser_id"] in victims]
    return {
        "requests": len(answers), "all_correct": bool(answers) and all(a["correct"] for a in answers),
        "in_flight_ms": [(a["done_ts"] - removed) * 1000 for a in met if a["correct"]],
        "failed_after_s": min((f["after_s"] for f in failed), default=None),
        "found_by": sorted({"probe" if "no probe" in f["error"] else "node verdict" if "left the cluster" in f["error"]
                            else "a call" for f in failed}),
        "ray_declared_dead_s": observed.get("node_declared_dead_s"),
        "error": (observed.get("errors") or {}).get("node_loss") or (observed.get("errors") or {}).get("placement"),
    }


def vanished_node_result(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """The node-loss trials together; none dropped (a trial that failed is counted and its error kept)."""
    ok = [t for t in trials if not t["error"]]
    return {
        "setup": VANISHED_NODE_SETUP, "trials": len(trials), "trials_failed": len(trials) - len(ok),
        "errors": [t["error"][-300:] for t in trials if t["error"]],
        "requests": sum(t["requests"] for t in ok), "all_correct": bool(ok) and all(t["all_correct"] for t in ok),
        "in_flight_at_loss": sum(len(t["in_flight_ms"]) for t in ok),
        "time_to_result": summary_ms([ms for t in ok for ms in t["in_flight_ms"]]),
        "last_answer": summary_ms([max(t["in_flight_ms"]) for t in ok if t["in_flight_ms"]]),
        "failed_after": summary_ms([t["failed_after_s"] * 1000 for t in ok if t["failed_after_s"] is not None]),
        "found_by": {k: sum(k in t["found_by"] for t in ok) for k in ("probe", "node verdict", "a call")},
        "ray_declared_dead": summary_ms([t["ray_declared_dead_s"] * 1000 for t in ok
                                         if t["ray_declared_dead_s"] is not None]),
        "per_trial": trials,
    }


def vanished_node_line(v: dict[str, Any]) -> str:
    return (f"A node vanishing under load ({v['setup']}; {v['trials']} trials, {v['trials_failed']} failed): "
            f"{v['requests']} requests, all correct: {'yes' if v['all_correct'] else 'NO'}; the lost browser was "
            f"failed {_fmt(v['failed_after'])} ms (p50 / p95) after the removal (found by the probes in "
            f"{v['found_by']['probe']} of {v['trials'] - v['trials_failed']} trials), while Ray declared the node "
            f"dead after {_fmt(v['ray_declared_dead'])} ms; the {v['in_flight_at_loss']} requests in flight were "
            f"answered {_fmt(v['time_to_result'])} ms after the removal, the last of each trial "
            f"{_fmt(v['last_answer'])} ms.")


def run_vanished_node(temp: Path, trials: int = 1) -> dict[str, Any]:
    """``trials`` runs of the cluster scenarios' node loss, each on a fresh cluster; with the run's date and
    machine (load before and after), as this part may run alone (``--vanished-node-only``)."""
    import subprocess
    import sys

    from benchmarks.results import ended, machine, utc_now

    began, host = utc_now(), machine()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    results = []
    for i in range(trials):
        out = temp / f"cluster-{i}.json"
        done = subprocess.run([sys.executable, str(CLUSTER_SCENARIOS), str(out), "placement", "node_loss"],
                              capture_output=True, text=True, timeout=1500, env=env)
        if not out.exists():
            error = f"the cluster scenarios wrote nothing (rc {done.returncode}): {done.stderr[-500:]}"
            results.append({"requests": 0, "all_correct": False, "in_flight_ms": [], "failed_after_s": None,
                            "found_by": [], "ray_declared_dead_s": None, "error": error})
        else:
            results.append(vanished_node_trial(orjson.loads(out.read_bytes())))
    return vanished_node_result(results) | {"date": began, "machine": ended(host)}
