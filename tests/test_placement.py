"""Placement and backend choice: pure decisions, no Ray, no browser."""

from __future__ import annotations

from actors.placement import BrowserView, Placement, choose_backend, place


def view(bid: str, models=(), in_flight: int = 0, browser_type: str = "chromium") -> BrowserView:
    return BrowserView(bid, browser_type, frozenset(models), in_flight)


def test_idle_holder_is_used():
    assert place("m", [view("a", ["m"]), view("b")], 4, "chromium") == Placement("use", "a")


def test_busy_holder_makes_the_pool_grow_then_is_used_at_capacity():
    busy = [view("a", ["m"], in_flight=2)]
    assert place("m", busy, 4, "chromium") == Placement("launch", None)
    assert place("m", busy, 1, "chromium") == Placement("use", "a")


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
