"""How many WebAssembly threads a page runs its models with (onnxruntime-web's ``numThreads``).

A page's threads share the machine with the other pages on it and with the pool's own processes (the pool,
its log, the browser actors, Playwright's drivers), which under a load of small requests take about half of
this 2-core machine's CPU (docs/facts.md, "Where a request's CPU goes under load"). So one core is left to
them and the rest is shared between the pages a node may hold, at most ``WASM_THREADS_MAX`` (where
onnxruntime-web's own default stops too). On 2 cores that is one thread, which is what was measured best
here: a page with two threads computed 1.2x as fast alone at batch 1 and 1.8x at batch 32, yet a one-browser
pool with two lost a third of its throughput at 4 clients and gained only at 64 (docs/facts.md, "Two wasm
threads in a one-browser pool"). Machines with more cores were not measured: the rule's share for them is
the reasoning above.
"""

from __future__ import annotations

from actors.constants import WASM_THREADS_MAX


def wasm_threads(cores: int, pages: int) -> int:
    """Threads per page on a node with ``cores`` cores that may run ``pages`` pages: ``cores - 1`` shared
    by the pages, at least 1 and at most ``WASM_THREADS_MAX``."""
    if cores < 1 or pages < 1:
        raise ValueError(f"cores and pages must be >= 1, got {cores} and {pages}")
    return max(1, min(WASM_THREADS_MAX, (cores - 1) // pages))
