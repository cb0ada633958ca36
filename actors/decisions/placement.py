"""Pure placement decisions: which browser serves a model, and on which backend.

Inputs are plain snapshots (the projection of the event log plus live in-flight counts); outputs
are decisions the pool carries out and records as events. No Ray, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from actors.constants import BUSY_THRESHOLD

# Software WebGPU adapters (SwiftShader) are correct but ~100x slower than wasm (docs/facts.md).
SOFTWARE_ADAPTERS = ("swiftshader", "llvmpipe", "lavapipe")


def choose_backend(backends: list[str], detail: dict, requested: str = "auto") -> str:
    """The backend to load models on: the requested one, or for ``auto`` the fastest expected.

    A hardware WebGPU adapter beats wasm; a software one does not.
    """
    if requested != "auto":
        return requested
    adapter = (detail.get("webgpu") or {}).get("architecture", "")
    if "webgpu" in backends and adapter and not any(s in adapter.lower() for s in SOFTWARE_ADAPTERS):
        return "webgpu"
    return "wasm"


@dataclass(frozen=True)
class BrowserView:
    """What placement needs to know about one live browser."""

    browser_id: str
    browser_type: str
    models: frozenset[str]      # artifact keys loaded
    in_flight: int              # operations running on it now
    cost: float | None = None   # expected ms per request of this model here (actors.adaptive); None: unknown


@dataclass(frozen=True)
class Placement:
    action: Literal["use", "load", "launch", "wait"]
    # use/load: the browser. launch: the holder that takes the request while the new browser starts
    # (None: the request waits for the new one). wait: None.
    browser_id: str | None



def place(key: str, browsers: list[BrowserView], max_connections: int, browser_type: str,
          avoid: frozenset[str] = frozenset(), busy_at: int = BUSY_THRESHOLD, launching: int = 0,
          grow_meanwhile: bool = False) -> Placement:
    """Where to run artifact ``key``; ``launching`` browsers are starting and count towards ``max_connections``.

    1. a browser of the wanted type that already holds it and is not busy (fewer than ``busy_at`` runs on
       it; a batch of requests, which should not queue behind another, uses 1): of those, the one expected
       to answer first ((in flight + 1) x its expected cost), least busy first when nothing is known. A
       free holder is always used before a busy one: a cost is known only from work, so a browser that an
       old estimate makes look over twice as slow as a busy peer would otherwise get no batch, and no newer
       estimate, for as long as that peer stays busy (a throughput run on 2026-12-07 ran three cells of
       8-row batches, 33 s, on one page while the other idled: what this rule allowed); one that really is
       far slower is drained (``adaptive.degraded_browsers``). A browser whose cost is still
       unknown (new, or a standby just promoted) is expected to cost what its peers holding the model do,
       and wins a tie, so that its cost gets known; it is not sent everything meanwhile (it was, when an
       unknown cost counted as none: after a failover under load the promoted standby took every request
       while the surviving browser idled, and the answers per second halved for ~1 s);
    2. else a new browser, while the pool is below ``max_connections``. With ``grow_meanwhile`` the busy
       holder takes this request (a page queues its runs: ~0.1-1 s) while the new browser starts (~3-8 s);
       else, or with no holder, the request waits for the new browser;
    3. else the holder expected to answer first;
    4. else load it onto the least busy browser holding the fewest models.
    With no browser at all but one starting, the request waits for it ("wait"): more are launched only
    once browsers serve and are busy.
    ``avoid`` excludes browsers (e.g. ones already holding another shard of the same request).
    """
    candidates = [b for b in browsers if b.browser_id not in avoid]
    holding = [b for b in candidates if key in b.models and b.browser_type == browser_type]
    known = sorted(b.cost for b in holding if b.cost is not None)
    peers_cost = known[len(known) // 2] if known else 0.0

    def expected_wait(b: BrowserView) -> tuple[float, int, bool, str]:
        cost = peers_cost if b.cost is None else b.cost
        return (b.in_flight + 1) * cost, b.in_flight, b.cost is not None, b.browser_id

    free = [b for b in holding if b.in_flight < busy_at]
    if free:
        return Placement("use", min(free, key=expected_wait).browser_id)
    best = min(holding, key=expected_wait) if holding else None
    if not browsers and launching:
        return Placement("wait", None)      # growth is judged on busy browsers: none serves yet
    if len(browsers) + launching < max_connections:
        return Placement("launch", best.browser_id if grow_meanwhile and best is not None else None)
    if best is not None:
        return Placement("use", best.browser_id)
    if not candidates:
        candidates = browsers
    if not candidates:
        raise ValueError("max_connections must be at least 1")
    same_type = [b for b in candidates if b.browser_type == browser_type] or candidates
    best = min(same_type, key=lambda b: (b.in_flight, len(b.models), b.browser_id))
    return Placement("load", best.browser_id)


# ----- nodes (a Ray cluster) -------------------------------------------------------------------
BROWSER_SLOTS = "browser_slots"     # the custom resource a node advertises per browser it can host


@dataclass(frozen=True)
class NodeView:
    """What node placement needs to know about one live Ray node."""

    node_id: str
    browser_slots: float | None     # None: the node advertises no browser_slots resource
    serving: int                    # live browsers taking traffic on it
    standby: int                    # live standby browsers on it


def eligible_nodes(nodes: list[NodeView]) -> list[NodeView]:
    """Nodes that may host browsers: those advertising ``browser_slots`` when any does, else all."""
    advertised = [n for n in nodes if n.browser_slots is not None]
    return advertised or nodes


def choose_node(nodes: list[NodeView], standby: bool, avoid_nodes: frozenset[str] = frozenset()) -> str | None:
    """The node a new browser should start on; None leaves it to Ray (one node: nothing to choose).

    Browsers spread: the node with the fewest live browsers wins. A standby goes where the fewest
    serving browsers are, so that the loss of one node does not take a browser and its spare together.
    ``avoid_nodes`` (e.g. the nodes of the other shards of one model) lose ties they would otherwise win.
    Full nodes (as many browsers as slots) are used only when every node is full.
    """
    candidates = eligible_nodes(nodes)
    if len(candidates) <= 1:
        return None
    free = [n for n in candidates if n.browser_slots is None or n.serving + n.standby < n.browser_slots]
    candidates = free or candidates
    if standby:
        best = min(candidates, key=lambda n: (n.serving, n.standby, n.node_id))
    else:
        best = min(candidates, key=lambda n: (n.node_id in avoid_nodes, n.serving + n.standby, n.node_id))
    return best.node_id
