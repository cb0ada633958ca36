"""``webpool status``: a running pool, asked through Ray, as plain data (``--json``), as tables, or as a
live view (``--watch``) that is redrawn every interval and outlives the pool restarting.

Guarantees: reading status changes nothing but what a health check records (a browser found dead now
is recorded, and recovered by the pool's own policy, before the state is read); a pool that does not
answer within the timeout is shown as such, never as an empty pool.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

from actors.constants import BROWSER_ACTOR_NAMESPACE
from webpool.render import entry_time, table

if TYPE_CHECKING:
    from events.state import PoolState

FAILURE_KINDS = ("BrowserFailed", "OperationFailed")
RECOVERY_KINDS = ("RecoveryCompleted",)
DATA_CHARS = 240  # a table's free-text column; --json prints everything


class PoolNotFoundError(RuntimeError):
    """No Ray cluster to connect to, or no pool actor of that name in it."""


# --- connecting ----------------------------------------------------------------------------------------

def start_hint(name: str, namespace: str) -> str:
    return (f"start a pool from Python with `ray.init(namespace={namespace!r})` and "
            f"`ResourcePool.options(name={name!r}, lifetime='detached').remote()` (see README), "
            "or pass --address/--namespace/--name")


def _unreachable(address: str) -> str | None:
    """Why a ``host:port`` Ray address cannot be reached, or None. Ray itself keeps retrying an
    unreachable address for minutes; one TCP connect says it at once."""
    import socket

    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return None    # "auto", ray:// client addresses, ...: Ray resolves those
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=3).close()
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def connect(address: str, namespace: str) -> tuple[Any, bool]:
    """Ray, connected to ``address``, and whether this call connected it (then the caller shuts it down);
    an already initialised Ray is reused (tests, notebooks)."""
    import ray

    if ray.is_initialized():
        current = ray.get_runtime_context().gcs_address
        if address not in ("auto", current):
            raise PoolNotFoundError(f"this process is already connected to Ray at {current}, not {address}")
        return ray, False
    why = _unreachable(address)
    if why is not None:
        raise PoolNotFoundError(f"cannot connect to Ray at {address!r} ({why}): start Ray with `ray start --head` "
                                "and pass the address it prints, then " + start_hint("webpool", namespace))
    try:
        ray.init(address=address, namespace=namespace, log_to_driver=False, logging_level=logging.WARNING)
    except ConnectionError as exc:
        raise PoolNotFoundError(f"cannot connect to Ray at {address!r} ({str(exc).splitlines()[0]}): start Ray "
                                "with `ray start --head` (a cluster with token authentication also needs its token "
                                "in RAY_AUTH_TOKEN), then " + start_hint("webpool", namespace)) from None
    return ray, True


def find_pool(ray: Any, name: str, namespace: str) -> Any:
    """The pool actor's handle, looked up by name (a restarted pool keeps its name)."""
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        # Pools' browser actors are named too, in a namespace of their own (actors/fleet.py): not what was asked for.
        named = sorted(f"{a['namespace']}/{a['name']}" for a in ray.util.list_named_actors(all_namespaces=True)
                       if a["namespace"] != BROWSER_ACTOR_NAMESPACE)
        found = f"named actors there: {', '.join(named[:10])}" if named else "no named actors there"
        raise PoolNotFoundError(f"no pool named {name!r} in namespace {namespace!r} ({found}); "
                                + start_hint(name, namespace)) from None


def fetch(ray: Any, name: str, namespace: str, events: int, timeout: float) -> dict:
    """One status document of the pool ``name``, read now."""
    pool = find_pool(ray, name, namespace)
    # Health first: a browser found dead now is recorded before the state is read.
    health = ray.get(pool.health.remote(), timeout=timeout)
    state, recent, stats = ray.get([pool.get_state.remote(), pool.recent_events.remote(events),
                                    pool.get_recovery_statistics.remote()], timeout=timeout)
    where = {"name": name, "namespace": namespace, "address": ray.get_runtime_context().gcs_address}
    return document(state, health, recent, stats, where)


# --- the document and its tables ------------------------------------------------------------------------

def document(state: PoolState, health: dict[str, dict], events: list[dict], stats: dict,
             pool: dict[str, str]) -> dict:
    """What ``webpool status`` shows, as plain data (the --json output)."""
    from events.state import models_on

    in_flight = Counter(op.browser_id for op in state.operations.values())
    browsers = []
    for b in sorted(state.browsers.values(), key=lambda b: b.launched_seq):
        browsers.append({
            "browser_id": b.browser_id, "browser_type": b.browser_type, "status": b.status, "standby": b.standby,
            "backend": b.backend or None, "backend_caps": list(b.backend_caps), "failures": b.failures,
            "wasm_threads": b.wasm_threads or None,
            "last_failure": b.last_failure.value if b.last_failure else None, "in_flight": in_flight[b.browser_id],
            "models": [{"model": m.model, "shard": m.shard, "backend": m.backend}
                       for m in models_on(state, b.browser_id)],
        })
    reports = {}
    for browser_id, report in sorted(health.items()):
        if "error" in report:
            reports[browser_id] = {"error": report["error"], "category": report.get("category")}
        else:
            reports[browser_id] = {"memory_mib": report["memory_bytes"] / 2**20, "pids": len(report["pids"]),
                                   "blocked_requests": report["blocked_requests"],
                                   "models": list(report["models"]),
                                   "background_until": report["background_until"]}
    failures = [{"seq": e["seq"], "timestamp": e["timestamp"], "kind": e["action"], "subject": e["subject"],
                 "category": e["data"].get("category"), "error": e["data"].get("error")}
                for e in events if e["action"] in FAILURE_KINDS]
    recoveries = [{"seq": e["seq"], "timestamp": e["timestamp"], "recovery_id": e["subject"],
                   "browser_id": e["data"]["browser_id"], "success": e["data"]["success"],
                   "replacement": e["data"].get("replacement"), "duration_ms": e["data"]["duration_ms"]}
                  for e in events if e["action"] in RECOVERY_KINDS]
    return {**pool, "last_seq": state.last_seq, "browsers": browsers, "health": reports,
            "open_operations": sum(in_flight.values()), "open_recoveries": len(state.recoveries),
            "recent_failures": failures, "recent_recoveries": recoveries, "events_scanned": len(events),
            "recovery_statistics": stats}


def _models(models: list[dict]) -> str:
    return ", ".join(f"{m['model']}{'[' + m['shard'] + ']' if m['shard'] else ''} ({m['backend']})"
                     for m in models) or "-"


def _priority(background_until: float | None) -> str:
    """A browser whose processes run in the background (a standby until it first serves: actors/priority.py)
    says until when at the latest; the rest run at the normal priority."""
    if background_until is None:
        return "normal"
    return "background to " + datetime.datetime.fromtimestamp(background_until).strftime("%H:%M:%S")


def tables(doc: dict) -> list[RenderableType]:
    """The document as a heading and tables, newest facts first: browsers (with what each reports now),
    recent failures, recent recoveries, recovery statistics."""
    heading = Text(f"pool {doc['name']!r} (namespace {doc['namespace']!r}, Ray at {doc['address']}): event log "
                   f"at seq {doc['last_seq']}; {doc['open_operations']} operations in flight, "
                   f"{doc['open_recoveries']} recoveries under way")
    health = doc["health"]

    def memory(browser_id: str) -> str:
        h = health.get(browser_id)
        return "" if h is None else f"{h['category']}: {h['error']}"[:60] if "error" in h else f"{h['memory_mib']:.0f}"

    return [
        heading,
        table("browsers", ["browser", "type", "status", "standby", "backend", "wasm threads", "in flight",
                           "memory MiB", "failures", "models"],
              [[b["browser_id"], b["browser_type"], b["status"], b["standby"], b["backend"] or "-",
                b["wasm_threads"] or "-", b["in_flight"], memory(b["browser_id"]), b["failures"],
                _models(b["models"])]
               for b in doc["browsers"]], empty="no browsers yet"),
        table("health (live browsers, as they report now)",
              ["browser", "memory MiB", "processes", "blocked requests", "priority", "models / error"],
              [[bid, None, None, None, None, f"{h['category']}: {h['error']}"] if "error" in h else
               [bid, h["memory_mib"], h["pids"], h["blocked_requests"], _priority(h["background_until"]),
                ", ".join(h["models"]) or "-"]
               for bid, h in health.items()], empty="no live browsers"),
        table(f"recent failures (in the last {doc['events_scanned']} events)",
              ["seq", "time", "kind", "subject", "category", "error"],
              [[f["seq"], entry_time(f["timestamp"]), f["kind"], f["subject"], f["category"],
                (f["error"] or "")[:DATA_CHARS]] for f in doc["recent_failures"]]),
        table(f"recent recoveries (in the last {doc['events_scanned']} events)",
              ["seq", "time", "recovery", "browser", "success", "replacement", "ms"],
              [[r["seq"], entry_time(r["timestamp"]), r["recovery_id"], r["browser_id"], r["success"],
                r["replacement"], r["duration_ms"]] for r in doc["recent_recoveries"]]),
        table("recovery statistics", ["statistic", "value"],
              [[k, f"{v:.3f}" if isinstance(v, float) else v] for k, v in doc["recovery_statistics"].items()]),
    ]


# --- the live view -------------------------------------------------------------------------------------

def watch(read: Callable[[], dict], console: Console, interval: float, count: int | None,
          unavailable: tuple[type[BaseException], ...]) -> int:
    """Redraw the status every ``interval`` seconds, ``count`` times (None: until interrupted).

    A pool that does not answer (restarting, its node gone: ``unavailable``) is shown as not answering,
    with the last time it did, and read again at the next tick; the view goes on. On a terminal the
    view is redrawn in place; otherwise (a pipe, a log file) each frame is printed after a rule with
    its time, as ``top -b`` does. Returns the number of frames in which the pool answered.
    """
    answered, frame = 0, 0
    last_seen: float | None = None

    def view() -> RenderableType:
        nonlocal answered, last_seen
        try:
            doc = read()
        except unavailable as exc:
            seen = f"last answered at {entry_time(last_seen)}" if last_seen else "it has not answered yet"
            return Text(f"the pool is not answering ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                        f"{seen}; asking again every {interval:g} s")
        answered += 1
        last_seen = time.time()
        return Group(*tables(doc))

    live = Live(console=console, auto_refresh=False) if console.is_terminal else None
    try:
        if live is not None:
            live.start()
        while count is None or frame < count:
            t0 = time.monotonic()
            rendered = view()
            frame += 1
            if live is not None:
                live.update(rendered, refresh=True)
            else:
                console.rule(f"webpool status, frame {frame}, {entry_time(time.time())}")
                console.print(rendered)
            if count is not None and frame >= count:
                break
            time.sleep(max(0.0, interval - (time.monotonic() - t0)))
    finally:
        if live is not None:
            live.stop()
    return answered
