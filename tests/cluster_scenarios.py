"""Multi-node scenarios on a real Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head and
four worker nodes, each its own raylet and object store, advertising ``browser_slots``).

Run by tests/test_cluster.py in a subprocess: one process can join only one Ray cluster, and the test
session already has its own. It writes what it observed as JSON; the test asserts on that. Nothing is
judged here, so a scenario that goes wrong still leaves its observations (and its error) to read.

1. placement: a detached, named pool at level high; browsers spread over nodes, the standby on a node
   with no serving browser; model bytes reach every node through the object store.
2. node loss under load (the documented path: Ray's default settings, the pool on the head): 24 requests
   are in flight when the node of a serving browser vanishes (frozen: calls to it hang, as across a lost
   network); the pool's probes find the silent browsers before Ray declares the node dead; every answer is
   checked against the reference.
3. a sharded generation loses the node of one shard mid-generation (its processes killed: with them frozen,
   one run in three hung; see the closing note of 2026-12-04); the tokens are compared with CPU onnxruntime's.
4. a second driver reattaches to the detached pool by name, sees its state and is served; a third
   submits a request and dies at once, and the pool still completes it (the log says so).
5. a StateLog on a worker node loses its node; Ray restarts it on another one from the shared
   location, and every acknowledged event is still there, once.
6. a pool that is not pinned (it runs on a worker) loses its own node under load: Ray restarts it
   elsewhere, it rebuilds from its log, and every request in flight is answered.
   5 and 6 lose their nodes at the same moment (``vanish_together``): both wait for Ray's verdict on them.

Usage: python tests/cluster_scenarios.py OUT.json [SCENARIO ...]   (all of them unless named)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from webpool.localray import RAY_SYSTEM_CONFIG, configure_auth_env  # noqa: E402

configure_auth_env()     # before ray is imported: every node and driver shares this token

import numpy as np  # noqa: E402
import ray  # noqa: E402
import ray._private.utils  # noqa: E402
from procs import alive  # noqa: E402  (tests/procs.py: this script runs from tests/)
from ray.cluster_utils import Cluster  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

from events.state import SessionTokens, browsers_alive  # noqa: E402
from sharding.models import llama, llama_onnx, minilm  # noqa: E402
from webpool import ResourcePool  # noqa: E402

NAMESPACE = "webpool-cluster"
POOL_NAME = "webpool-cluster-pool"
EMBED = "all-minilm-l6-v2"
# tiny-llama (checked against CPU onnxruntime like SmolLM2, whose shard kills test_sharding.py covers): here the
# node loss is under test, and SmolLM2's shard sessions took ~25 s of this 2-core machine. 96 tokens (no end of
# text among them) keep the generation running well past the node's loss after its fourth token.
GENERATE = "tiny-llama"
PROMPT = "The capital of France is"
NEW_TOKENS = 96
WORKER_NODES = 4
SLOTS_PER_NODE = 2
TOLERANCE = 1e-4
MB = 1 << 20


def _wait(predicate, timeout: float, what: str, interval: float = 0.1, allow_timeout: bool = False):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    if allow_timeout:
        return None
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def _state(pool):
    return ray.get(pool.get_state.remote(), timeout=60)


def _browsers(pool) -> list[dict[str, Any]]:
    return [{"browser_id": b.browser_id, "node_id": b.node_id, "standby": b.standby}
            for b in browsers_alive(_state(pool))]


def _events(pool) -> list[dict[str, Any]]:
    return ray.get(pool.recent_events.remote(_state(pool).last_seq + 10), timeout=60)



def _node_of(cluster: Cluster, node_id: str):
    return next(n for n in cluster.worker_nodes if n.node_id == node_id)


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return found


FROZEN: list[int] = []       # processes of frozen nodes, killed at the end (by PID)


def _vanish(cluster: Cluster, node, freeze: bool = False) -> None:
    """The node's machine vanishes without notice: its raylet dies and every process it started (its Ray
    workers and agents) dies with it, or, with ``freeze``, stops (SIGSTOP) as on a machine cut off from the
    network: nothing answers and nothing closes a connection, so a call to it hangs rather than fails.
    ``remove_node`` alone kills only the raylet, and on this one machine a worker can live on for seconds
    after it (answering calls, as it was seen to). The browsers the workers started are left to die with
    their worker (PR_SET_PDEATHSIG): that they do is part of what the scenarios check."""
    raylet = node.all_processes["raylet"][0].process.pid
    doomed = _children(raylet)
    cluster.remove_node(node, allow_graceful=False)
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGSTOP if freeze else signal.SIGKILL)
        except ProcessLookupError:
            pass
    if freeze:
        FROZEN.extend(doomed)


def _thaw_and_kill() -> None:
    for pid in FROZEN:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    FROZEN.clear()


def _browser_pids(pool) -> dict[str, list[int]]:
    return {b: list(r.get("pids", {}).values()) for b, r in ray.get(pool.health.remote(), timeout=60).items()}


def placement(pool, out: dict[str, Any]) -> None:
    texts = [f"placement sentence {i}" for i in range(8)]
    reference = minilm.reference_embed(texts)
    # Eight requests of 16 texts at once (two to a batch): the first browser is busy, so the pool grows to
    # max_connections, in the background; bursts go on until it has (a burst that one page absorbed alone
    # leaves the pool as it was).
    correct = True
    for _ in range(10):
        outs = ray.get([pool.infer.remote(EMBED, {"texts": [t] * 16}) for t in texts], timeout=600)
        correct &= all(np.abs(o["embedding"] - r).max() <= TOLERANCE for o, r in zip(outs, reference, strict=True))
        if _wait(lambda: len([b for b in _browsers(pool) if not b["standby"]]) >= 2 or None, 60,
                 "the pool to grow", allow_timeout=True):
            break
    out["placement_correct"] = correct
    _wait(lambda: sum(b["standby"] for b in _browsers(pool)) >= 1 and not _state(pool).recoveries, 300,
          "a warm standby")
    out["placement_browsers"] = _browsers(pool)
    out["pool_node"] = ray.get(pool.node_id.remote(), timeout=60)
    out["pool_log_node"] = ray.get(ray.get_actor(f"{POOL_NAME}-log").info.remote(), timeout=60)["node_id"]


def node_loss_under_load(cluster: Cluster, pool, out: dict[str, Any]) -> None:
    """The documented path at Ray's default settings: 12 requests answered, then 24 sent at once, and the node
    of a serving browser removed without notice while they are in flight. Every answer is checked against
    the numpy reference; when each came, and when Ray itself declared the node dead, is recorded."""
    texts = [f"request {i} while a node goes away" for i in range(36)]
    reference = minilm.reference_embed(texts)
    answers: list[dict[str, Any]] = []
    lock = threading.Lock()

    def request(i: int) -> None:
        t0, sent_ts = time.perf_counter(), time.time()
        try:
            o = ray.get(pool.infer.remote(EMBED, {"text": texts[i]}), timeout=300)
            row = {"i": i, "correct": bool(np.abs(o["embedding"] - reference[i]).max() <= TOLERANCE),
                   "browser_id": o["browser_id"], "recovered": bool(o.get("recovered"))}
        except Exception as exc:
            row = {"i": i, "correct": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        row["ms"] = (time.perf_counter() - t0) * 1000
        row["sent_ts"], row["done_ts"] = sent_ts, time.time()
        with lock:
            answers.append(row)

    serving = [b for b in _browsers(pool) if not b["standby"]]
    victim_node = serving[0]["node_id"]
    out["node_loss_victim_node"] = victim_node
    out["node_loss_victim_browsers"] = [b["browser_id"] for b in _browsers(pool) if b["node_id"] == victim_node]
    pids = _browser_pids(pool)
    victim_pids = [p for b in out["node_loss_victim_browsers"] for p in pids.get(b, [])]
    for i in range(12):
        request(i)
    started = _state(pool).metrics.get("operations_started", 0)
    in_flight = [threading.Thread(target=request, args=(i,)) for i in range(12, 36)]
    for t in in_flight:
        t.start()
    # Started, not open: a poll that came after the last of them had ended would wait for open operations in
    # vain (a vanished-node trial timed out so, once in ten, at load 11). Had they all ended, the test says so.
    _wait(lambda: (state := _state(pool)).operations or state.metrics.get("operations_started", 0) > started, 60,
          "the requests to start")
    seq0 = _state(pool).last_seq
    t_removed = time.time()
    _vanish(cluster, _node_of(cluster, victim_node), freeze=True)
    out["node_removed_after_answers"] = len(answers)
    out["node_removed_ts"] = t_removed
    # What the probes saw, four times a second until the victims are failed (for reading when it goes wrong).
    samples = out["node_loss_probes"] = []
    while time.time() - t_removed < 30 and any(
            _state(pool).browsers[b].status in ("launched", "connected", "disconnected")
            for b in out["node_loss_victim_browsers"]):
        samples.append({"after_s": round(time.time() - t_removed, 2)} | ray.get(pool.probes.remote(), timeout=60))
        time.sleep(0.25)
    for t in in_flight:
        t.join(600)
    out["node_loss_answers"] = sorted(answers, key=lambda a: a["i"])
    # Ray's own verdict on the node, for comparison (its default health checks take ~13 s here).
    _wait(lambda: not any(n["NodeID"] == victim_node and n["Alive"] for n in ray.nodes()), 120,
          "Ray to declare the node dead")
    out["node_declared_dead_s"] = time.time() - t_removed
    _wait(lambda: all(_state(pool).browsers[b].status not in ("launched", "connected", "disconnected")
                      for b in out["node_loss_victim_browsers"]), 120, "the lost node's browsers to be failed")
    _wait(lambda: not _state(pool).recoveries, 300, "recoveries to finish")
    out["node_loss_browsers_after"] = _browsers(pool)
    # The frozen machine goes for good: its workers die, and their browsers must die with them.
    _thaw_and_kill()
    _wait(lambda: not any(alive(p) for p in victim_pids), 30, "the lost node's browser processes to exit",
          allow_timeout=True)
    out["node_loss_victim_pids_alive"] = [p for p in victim_pids if alive(p)]
    events = _events(pool)
    out["node_loss_failed"] = [e["data"] | {"seq": e["seq"], "after_s": e["timestamp"] - t_removed}
                               for e in events if e["action"] == "BrowserFailed" and e["seq"] > seq0]
    out["node_loss_recoveries"] = [e["data"] for e in events if e["action"] == "RecoveryCompleted"]
    out["node_loss_trace"] = _trace([e for e in events if e["seq"] > seq0], t_removed)


def _trace(events: list[dict[str, Any]], t0: float) -> list[str]:
    """What the pool did, one line per event, in ms from ``t0`` (for reading when something fails)."""
    keys = ("category", "error", "strategy", "step", "success", "replacement", "standby", "model", "kind")
    return [f"{(e['timestamp'] - t0) * 1000:+.0f}ms {e['action']} {e['subject']} "
            + " ".join(f"{k}={str(e['data'][k])[:80]}" for k in keys if e["data"].get(k) is not None)
            for e in events]


def sharded_generation_loses_a_node(cluster: Cluster, pool, expected: list[int], out: dict[str, Any]) -> None:
    ref = pool.generate.remote(GENERATE, PROMPT, max_new_tokens=NEW_TOKENS, shards=2)

    def session_with_tokens():
        if ray.wait([ref], timeout=0)[0]:
            ray.get(ref)            # it ended before 4 tokens: raise its error here, rather than wait
            raise RuntimeError("the generation ended before it reached 4 tokens")
        watch.add(ray.get(pool.events_since.remote(watch.last_seq, 1.0)))    # follows the pool's log
        return watch.reached(4)

    watch = SessionTokens()
    session = _wait(session_with_tokens, 600, "a generation to reach 4 tokens", interval=0.0)
    plan = watch.plans[session]
    shard_browser = plan["shards"][1]["browser_id"]
    node = _state(pool).browsers[shard_browser].node_id
    out["shard_nodes"] = [_state(pool).browsers[s["browser_id"]].node_id for s in plan["shards"]]
    out["shard_victim"] = {"browser_id": shard_browser, "node_id": node, "tokens_before": watch.tokens[session]}
    coordinator = ray.get(pool.coordinator.remote(GENERATE), timeout=60)
    out["shard_coordinator_node"] = ray.get(coordinator.node_id.remote(), timeout=60)
    seq0, t_removed = _state(pool).last_seq, time.time()
    _vanish(cluster, _node_of(cluster, node))
    try:
        result = ray.get(ref, timeout=600)
        out["shard_tokens"] = result["token_ids"]
        out["shard_replays"] = result["metrics"]["replays"]
        out["shard_result"] = {"metrics": result["metrics"], "recovered": result.get("recovered", False),
                               "original_error": result.get("original_error"),
                               "recovery_attempts": result.get("recovery_attempts", 0)}
    except Exception as exc:
        out["shard_error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
    out["shard_expected"] = expected
    events = [e for e in _events(pool) if e["seq"] > seq0]
    out["shard_failed"] = [e["data"] | {"after_s": e["timestamp"] - t_removed} for e in events
                           if e["action"] == "BrowserFailed" and e["subject"] == shard_browser]
    out["shard_trace"] = _trace(events, t_removed)


def state_log_moves(cluster: Cluster, temp: Path, out: dict[str, Any]) -> Moving:
    """A StateLog on a worker node, over a location every node reaches (here: this machine's disk, as a
    shared file system or pyarrow URI would be): its node is removed; Ray restarts it on another node
    from the same location, and every acknowledged event is there."""
    from actors.state_log import get_or_create_state_log, new_batch_id
    from events import schema as ev

    # The affinity is soft (so that Ray may restart the log elsewhere), and Ray does not always honour it:
    # the node that goes is wherever the log runs; one that landed on the head (which cannot go) is
    # closed and created again, on the next worker.
    node, tries = None, []
    for attempt, wanted in enumerate(sorted(cluster.worker_nodes, key=lambda n: n.node_id) * 2):
        log = get_or_create_state_log(f"moving-log-{attempt}", str(temp / "shared-log"), NAMESPACE,
                                      node_id=wanted.node_id)
        before = ray.get(log.info.remote(), timeout=60)
        tries.append({"wanted": wanted.node_id, "got": before["node_id"]})
        node = next((n for n in cluster.worker_nodes if n.node_id == before["node_id"]), None)
        if node is not None:
            break
        ray.get(log.close.remote(), timeout=60)
        ray.kill(log, no_restart=True)
    out["log_placement_tries"] = tries
    if node is None:
        raise RuntimeError(f"the StateLog never ran on a worker node: {tries}")
    acked = [ray.get(log.append_batch.remote([ev.BrowserConnected(browser_id=f"b{i}")], new_batch_id()),
                     timeout=60)[0].seq for i in range(20)]
    yield node
    # A worker can answer for a moment after its raylet is killed: wait until Ray has declared the node
    # dead, so that what follows really goes to a restarted StateLog.
    _wait(lambda: not any(n["NodeID"] == node.node_id and n["Alive"] for n in ray.nodes()), 120,
          "Ray to declare the node dead")
    # Ray retries the call until the actor is back (max_task_retries=-1); the batch id keeps it single.
    acked += [ray.get(log.append_batch.remote([ev.BrowserConnected(browser_id=f"c{i}")], new_batch_id()),
                      timeout=120)[0].seq for i in range(20)]
    after = ray.get(log.info.remote(), timeout=60)
    records = ray.get(log.read.remote(1), timeout=60)
    out["log_nodes"] = {"before": before["node_id"], "removed": node.node_id, "after": after["node_id"]}
    out["log_restarted"] = after["restarted"]
    out["log_acked"] = acked
    out["log_read"] = [(r.seq, r.event.browser_id) for r in records]
    ray.kill(log, no_restart=True)


def unpinned_pool_loses_its_node(cluster: Cluster, temp: Path, out: dict[str, Any]) -> Moving:
    """A pool left where Ray puts it (a soft preference for a worker node, as any unpinned actor may land
    there) loses its node under load: Ray restarts it on another node once it declares the node dead, the
    new incarnation rebuilds from its log (on storage every node reaches) and every request that was in
    flight is answered, correctly; when each answer came is recorded."""
    name = "webpool-unpinned-pool"
    texts = [f"unpinned request {i}: the pool's own node goes away" for i in range(12)]
    reference = minilm.reference_embed(texts)
    # Two fresh workers (the scenarios before took nodes away): the pool's, and room for browsers after it.
    # Slots to spare: the first pool's browsers (shards and their replacements among them) hold the others.
    fresh = [cluster.add_node(num_cpus=1, resources={"browser_slots": 2 * SLOTS_PER_NODE}, temp_dir=str(temp),
                              object_store_memory=600 * MB) for _ in range(2)]
    cluster.wait_for_nodes()
    # The affinity is soft (Ray may restart the pool elsewhere) and not always honoured: a pool that lands
    # on the head (which cannot go) is killed and created again.
    pool, victim, tries = None, None, []
    for wanted in fresh * 3:
        pool = ResourcePool.options(name=name, scheduling_strategy=NodeAffinitySchedulingStrategy(
            wanted.node_id, soft=True)).remote(
            max_connections=2, event_log=str(temp / "unpinned-events"), name=name,
            fault_tolerance={"level": "medium", "recovery_strategy": "progressive"})
        node = ray.get(pool.node_id.remote(), timeout=60)
        tries.append({"wanted": wanted.node_id, "got": node})
        victim = next((n for n in cluster.worker_nodes if n.node_id == node), None)
        if victim is not None:
            break
        ray.kill(pool, no_restart=True)
        _wait(lambda: name not in ray.util.list_named_actors(), 60, "the misplaced pool's name to free up")
    out["unpinned_tries"] = tries
    if victim is None:
        raise RuntimeError(f"the pool never ran on a worker node: {tries}")
    try:
        ray.get(pool.infer.remote(EMBED, {"text": "warm up"}), timeout=300)
        out["unpinned_node_before"] = victim.node_id
        pool_pid = ray.get(pool.pid.remote(), timeout=60)
        refs = [pool.infer.remote(EMBED, {"text": t}) for t in texts]
        _wait(lambda: _state(pool).operations, 60, "the requests to start")
        browsers = _browsers(pool)
        t_removed, gone = yield victim
        # Browsers on the nodes that stay outlive the pool's: the new incarnation must adopt them, not retire them.
        out["unpinned_browsers_elsewhere"] = sorted(b["browser_id"] for b in browsers if b["node_id"] not in gone)
        # The pool's own process went with its node (a SIGKILL lands within moments, not at once).
        out["unpinned_pool_pid_gone"] = _wait(lambda: not alive(pool_pid), 10, "the pool's process to exit",
                                              allow_timeout=True) is not None
        answers = []
        for i, ref in enumerate(refs):
            try:
                o = ray.get(ref, timeout=300)
                answers.append({"i": i, "correct": bool(np.abs(o["embedding"] - reference[i]).max() <= TOLERANCE),
                                "after_s": time.time() - t_removed})
            except Exception as exc:
                answers.append({"i": i, "correct": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                                "after_s": time.time() - t_removed})
        out["unpinned_answers"] = answers
        out["unpinned_node_after"] = ray.get(pool.node_id.remote(), timeout=60)
        events = _events(pool)
        # The new incarnation rebuilt from its log (ended_by_restart): each browser of its predecessor is either
        # adopted (alive on another node: connected anew) or retired (gone with the node); the operations are
        # ended too if any was still running (the last batch may have finished before the process died).
        after = [e for e in events if e["timestamp"] >= t_removed]
        out["unpinned_restarted"] = any(e["action"] == "BrowserConnected" or (
            e["action"] == "BrowserRetired" and e["data"]["reason"] == "pool restarted") for e in after)
        out["unpinned_adopted"] = sorted(e["subject"] for e in after if e["action"] == "BrowserConnected")
        out["unpinned_ops_ended_by_restart"] = sum(e["action"] == "OperationFailed"
                                                   and e["data"]["error"] == "the pool restarted while it ran"
                                                   for e in events)
        out["unpinned_trace"] = _trace([e for e in events if e["timestamp"] >= t_removed], t_removed)
        ray.get(pool.shutdown.remote(), timeout=120)
    finally:
        ray.kill(pool, no_restart=True)


# A scenario whose node goes while Ray is to restart its actors elsewhere: it yields that node once set up, and
# is resumed with (when it went, the ids of every node that went with it).
Moving = Generator[Any, tuple[float, set[str]], None]


def vanish_together(cluster: Cluster, scenarios: dict[str, Callable[[], Moving]], out: dict[str, Any]) -> None:
    """Set each scenario up, then make all their nodes vanish at once and let each see what followed: Ray
    declares a vanished node dead only after its health checks fail (~13 s at its defaults, the scenarios'
    setting), and these scenarios need that verdict, so they wait for it together, not one after another."""
    running, nodes = {}, {}
    for name, scenario in scenarios.items():
        try:
            running[name] = scenario()
            nodes[name] = next(running[name])
        except Exception:
            out["errors"][name] = traceback.format_exc()[-3000:]
            running.pop(name, None)
    gone = {node.node_id: node for node in nodes.values()}
    t_removed = time.time()
    for node in gone.values():
        _vanish(cluster, node)
    for name, scenario in running.items():
        try:
            scenario.send((t_removed, set(gone)))
        except StopIteration:
            continue
        except Exception:
            out["errors"][name] = traceback.format_exc()[-3000:]
        else:
            out["errors"][name] = "the scenario yielded a second node"
        scenario.close()


DRIVER = """
import sys
sys.path.insert(0, {root!r})
import ray, json
ray.init(address={address!r}, namespace={namespace!r}, log_to_driver=False)
pool = ray.get_actor({name!r})
state = ray.get(pool.get_state.remote())
if {die!r}:
    import os, time
    started = state.metrics.get("operations_started", 0)
    pool.infer.remote({model!r}, {{"text": "submitted by a driver that dies at once"}})
    # Die once the pool has started the call (it has left this process), not after a guessed delay.
    deadline = time.monotonic() + 120
    while ray.get(pool.get_state.remote()).metrics.get("operations_started", 0) <= started:
        if time.monotonic() > deadline:
            sys.exit("the pool never started the dying driver's request")
        time.sleep(0.01)
    os._exit(0)
out = ray.get(pool.infer.remote({model!r}, {{"text": "from a second driver"}}))
# To a file, not stdout: Ray's own processes may write to the driver's stdout (in CI, once, the last line
# there started with "[" and was not ours).
with open({result!r}, "w") as f:
    json.dump({{"browsers": len([b for b in state.browsers.values() if b.status not in ("retired",)]),
               "last_seq": state.last_seq, "embedding": out["embedding"].tolist()}}, f)
"""


def reattach(cluster: Cluster, pool, temp: Path, out: dict[str, Any]) -> None:
    result = temp / "second_driver.json"

    def driver(die: bool) -> subprocess.CompletedProcess:
        code = DRIVER.format(root=str(ROOT), address=cluster.address, namespace=NAMESPACE, name=POOL_NAME,
                             model=EMBED, die=die, result=str(result))
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              env=os.environ.copy())

    seq_before = _state(pool).last_seq
    second = driver(die=False)
    out["reattach_rc"] = second.returncode
    out["reattach_stderr"] = second.stderr[-2000:] if second.returncode else ""
    if second.returncode == 0:
        if not result.exists():
            raise RuntimeError(f"the second driver exited 0 without writing {result}; its stdout:\n"
                               f"{second.stdout[-2000:]}\nits stderr:\n{second.stderr[-2000:]}")
        seen = json.loads(result.read_text())
        ref = minilm.reference_embed(["from a second driver"])[0]
        out["reattach_seen_seq"] = seen["last_seq"]
        out["reattach_seq_before"] = seq_before
        out["reattach_correct"] = bool(np.abs(np.asarray(seen["embedding"]) - ref).max() <= TOLERANCE)
    started_before = {e["data"]["op_id"] for e in _events(pool) if e["action"] == "OperationStarted"}
    third = driver(die=True)
    out["dying_driver_rc"] = third.returncode
    _wait(lambda: not _state(pool).operations and len(
        {e["data"]["op_id"] for e in _events(pool) if e["action"] == "OperationStarted"} - started_before) >= 1,
        300, "the dead driver's request to be run")
    events = _events(pool)
    new_ops = {e["data"]["op_id"] for e in events if e["action"] == "OperationStarted"} - started_before
    completed = {e["data"]["op_id"] for e in events if e["action"] == "OperationCompleted"}
    out["dying_driver_ops"] = sorted(new_ops)
    out["dying_driver_ops_completed"] = sorted(new_ops & completed)


def main(out_path: Path, only: frozenset[str] = frozenset()) -> int:
    """Run the scenarios (``only`` those named, when given: a developer's shortcut) and write what they saw."""
    # Cluster() writes its address to /tmp/ray/ray_current_cluster for address-less ray.init() calls;
    # every driver here is given the address, and nothing of ours goes outside our temp dir.
    ray._private.utils.write_ray_address = lambda *_args, **_kwargs: None
    temp = Path(tempfile.mkdtemp(prefix="wpclu-", dir="/tmp"))     # short: Ray's socket paths have a length limit
    out: dict[str, Any] = {"scenarios": [], "errors": {}}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "temp_dir": str(temp), "include_dashboard": False, "object_store_memory": 600 * MB,
        "_system_config": RAY_SYSTEM_CONFIG})     # worker nodes read it from the head
    pool = None
    try:
        for _ in range(WORKER_NODES):
            cluster.add_node(num_cpus=1, resources={"browser_slots": SLOTS_PER_NODE}, temp_dir=str(temp),
                             object_store_memory=600 * MB)
        ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
        out["nodes"] = [n.node_id for n in cluster.worker_nodes]
        out["head_node"] = cluster.head_node.node_id
        # The pool and its log sit on the head (it has no browser slots); browsers go to worker nodes.
        on_head = NodeAffinitySchedulingStrategy(cluster.head_node.node_id, soft=False)
        pool = ResourcePool.options(name=POOL_NAME, lifetime="detached", scheduling_strategy=on_head).remote(
            max_connections=2, event_log=str(temp / "events"), name=POOL_NAME, request_timeout=30.0,
            health_interval=1.0,
            fault_tolerance={"level": "high", "recovery_strategy": "progressive", "standby_browsers": 1})
        model = llama.tiny_llama(seed=0)
        expected = llama_onnx.ort_greedy_generate(llama_onnx.build_shards(model, [(0, model.config.n_layers)]),
                                                  model.encode(PROMPT), NEW_TOKENS)
        if len(expected) != NEW_TOKENS:
            raise RuntimeError(f"the reference ends after {len(expected)} tokens: too soon to lose a node mid-way")
        moving = {"state_log": lambda: state_log_moves(cluster, temp, out),
                  "unpinned": lambda: unpinned_pool_loses_its_node(cluster, temp, out)}
        for name, run in (("placement", lambda: placement(pool, out)),
                          ("node_loss", lambda: node_loss_under_load(cluster, pool, out)),
                          ("sharded", lambda: sharded_generation_loses_a_node(cluster, pool, expected, out)),
                          ("reattach", lambda: reattach(cluster, pool, temp, out)),
                          ("state_log+unpinned", lambda: vanish_together(
                              cluster, {k: v for k, v in moving.items() if not only or k in only}, out))):
            if only and not set(name.split("+")) & only:
                continue
            t0 = time.perf_counter()
            try:
                run()
            except Exception:
                out["errors"][name] = traceback.format_exc()[-3000:]
            out["scenarios"].append({"name": name, "s": round(time.perf_counter() - t0, 1)})
    finally:
        if pool is not None:
            try:
                pids = _browser_pids(pool)
                ray.get(pool.shutdown.remote(), timeout=120)
                ray.kill(pool)
                # Processes take a moment to be reaped after their kill: wait for that, not longer.
                everything = [p for ps in pids.values() for p in ps]
                try:
                    _wait(lambda: not any(alive(p) for p in everything), 30, "browser processes to exit")
                except TimeoutError:
                    pass
                out["pids_after_shutdown"] = [p for p in everything if alive(p)]
            except Exception:
                out["errors"]["shutdown"] = traceback.format_exc()[-2000:]
            ray.kill(pool)
        _thaw_and_kill()
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        out_path.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), frozenset(sys.argv[2:])))
