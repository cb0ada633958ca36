"""Placement and backend choice: pure decisions, no Ray, no browser."""

from __future__ import annotations

from actors.decisions import placement
from actors.decisions.placement import BrowserView, Placement, choose_backend, place


def view(bid: str, models=(), in_flight: int = 0, browser_type: str = "chromium") -> BrowserView:
    return BrowserView(bid, browser_type, frozenset(models), in_flight)


def test_idle_holder_is_used():
    assert place("m", [view("a", ["m"]), view("b")], 4, "chromium") == Placement("use", "a")


def test_busy_holder_makes_the_pool_grow_then_is_used_at_capacity():
    busy = [view("a", ["m"], in_flight=2)]
    assert place("m", busy, 4, "chromium") == Placement("launch", None)
    assert place("m", busy, 1, "chromium") == Placement("use", "a")


def test_browsers_starting_count_towards_capacity_and_a_busy_holder_serves_meanwhile():
    busy = [view("a", ["m"], in_flight=2)]
    assert place("m", busy, 3, "chromium", launching=1) == Placement("launch", None)
    assert place("m", busy, 3, "chromium", launching=1, grow_meanwhile=True) == Placement("launch", "a")
    assert place("m", busy, 2, "chromium", launching=1) == Placement("use", "a")       # full once it is up
    assert place("m", [view("b")], 3, "chromium", grow_meanwhile=True) == Placement("launch", None)   # no holder
    assert place("m", [], 1, "chromium", launching=1) == Placement("wait", None)
    assert place("m", [], 4, "chromium", launching=1, grow_meanwhile=True) == Placement("wait", None)   # first one
    assert place("m", [], 4, "chromium") == Placement("launch", None)


def test_least_busy_holder_wins():
    browsers = [view("a", ["m"], 1), view("b", ["m"], 0)]
    assert place("m", browsers, 2, "chromium") == Placement("use", "b")


def test_at_capacity_without_holder_loads_on_least_busy_emptiest():
    browsers = [view("a", ["x", "y"], 0), view("b", ["x"], 0), view("c", [], 3)]
    assert place("m", browsers, 3, "chromium") == Placement("load", "b")


def test_avoid_excludes_browsers_holding_other_shards():
    browsers = [view("a", ["m"]), view("b")]
    assert place("m", browsers, 2, "chromium", avoid=frozenset({"a"})) == Placement("load", "b")


def test_other_browser_types_are_not_used_for_a_preference():
    assert place("m", [view("a", ["m"], browser_type="edge")], 2, "chromium") == Placement("launch", None)


def test_backend_choice_prefers_hardware_webgpu_only():
    assert choose_backend(["wasm", "webgpu"], {"webgpu": {"architecture": "swiftshader"}}) == "wasm"
    assert choose_backend(["wasm", "webgpu"], {"webgpu": {"architecture": "hopper"}}) == "webgpu"
    assert choose_backend(["wasm"], {}) == "wasm"
    assert choose_backend(["wasm", "webgpu"], {}, requested="webgpu") == "webgpu"


def _node(node_id: str, serving: int = 0, standby: int = 0, slots: float | None = 4) -> placement.NodeView:
    return placement.NodeView(node_id, slots, serving, standby)


def test_one_node_leaves_the_choice_to_ray():
    assert placement.choose_node([], standby=False) is None
    assert placement.choose_node([_node("a")], standby=False) is None
    # Only one node advertises browser slots: it is the only eligible one.
    assert placement.choose_node([_node("a"), _node("head", slots=None)], standby=True) is None


def test_browsers_spread_over_nodes():
    nodes = [_node("a", serving=2), _node("b", serving=1), _node("c", serving=1, standby=1)]
    assert placement.choose_node(nodes, standby=False) == "b"
    # Without any browser_slots advertised, every node is eligible.
    bare = [_node("a", serving=1, slots=None), _node("b", slots=None)]
    assert placement.choose_node(bare, standby=False) == "b"


def test_a_standby_sits_away_from_the_browsers_it_protects():
    nodes = [_node("a", serving=1), _node("b", serving=0, standby=2)]
    assert placement.choose_node(nodes, standby=True) == "b"       # more browsers there, but none serving
    assert placement.choose_node(nodes, standby=False) == "a"      # 1 browser vs 2


def test_shards_of_one_model_prefer_distinct_nodes():
    nodes = [_node("a"), _node("b", serving=2)]
    assert placement.choose_node(nodes, standby=False, avoid_nodes=frozenset({"a"})) == "b"
    assert placement.choose_node(nodes, standby=False, avoid_nodes=frozenset({"a", "b"})) == "a"


def test_full_nodes_are_used_only_when_all_are_full():
    nodes = [_node("a", serving=1, slots=1), _node("b", serving=3, slots=4)]
    assert placement.choose_node(nodes, standby=False) == "b"
    full = [_node("a", serving=1, slots=1), _node("b", serving=2, slots=2)]
    assert placement.choose_node(full, standby=False) == "a"
