"""The WebAssembly threads a page computes with (actors/decisions/threads.py): the pure rule, and how a
browser and the pool's options take it. The live pool's browsers are checked in tests/test_pool.py and the
metric in tests/test_metrics.py."""

from __future__ import annotations

import os

import pytest

from actors.browser import BrowserCore
from actors.constants import WASM_THREADS_MAX
from actors.decisions.threads import wasm_threads
from actors.pool import PoolCore
from events.errors import InputError


@pytest.mark.parametrize(("cores", "pages", "threads"), [
    (1, 1, 1), (2, 1, 1), (2, 2, 1),        # this machine: one thread whatever the pages (measured best here)
    (4, 1, 3), (4, 2, 1), (4, 3, 1),
    (8, 2, 3), (16, 4, 3), (16, 1, WASM_THREADS_MAX), (64, 1, WASM_THREADS_MAX),
])
def test_a_page_gets_the_cores_but_one_shared_by_the_pages_within_bounds(cores, pages, threads):
    assert wasm_threads(cores, pages) == threads


@pytest.mark.parametrize(("cores", "pages"), [(0, 1), (2, 0)])
def test_no_cores_or_no_pages_is_an_error(cores, pages):
    with pytest.raises(ValueError, match="must be >= 1"):
        wasm_threads(cores, pages)


def test_a_browser_chooses_for_its_cores_and_pages_unless_told():
    cores = len(os.sched_getaffinity(0))
    assert BrowserCore("b").num_threads == wasm_threads(cores, 1)
    assert BrowserCore("b", pages_per_node=3).num_threads == wasm_threads(cores, 3)
    assert BrowserCore("b", num_threads=2, pages_per_node=3).num_threads == 2
    # Before the page said it can run threads (cross-origin isolated), its runtime computes with one.
    assert BrowserCore("b", num_threads=2).wasm_threads() == 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_a_bad_thread_count_is_a_typed_error(bad):
    with pytest.raises(InputError) as info:
        PoolCore(num_threads=bad)
    assert info.value.field == "num_threads"
