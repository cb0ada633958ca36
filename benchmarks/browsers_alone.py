"""The browsers' own ceiling for the throughput benchmark: the pool's pages with nothing in front of them.

In-process ``BrowserCore`` pages (the pool's page runtime, no pool, no Ray) are fed batches back to back with a
second run always queued behind the first, after a warm-up that lets V8 optimise the runtime's WebAssembly:
the most rows per second these browsers compute on this machine, so the most any pool of them can answer.
``benchmarks/throughput.py`` sets each of its targets against it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from typing import Any

import numpy as np

from actors.decisions.threads import wasm_threads
from benchmarks.results import summary

RUNS_IN_FLIGHT_ALONE = 2             # runs queued per page: the page never waits for its next input


async def _pages_alone(model: str, reference: dict[str, np.ndarray], tolerance: float, pages: int, threads: int,
                       batches: list[int], trials: int, trial_s: float, warm_s: float) -> dict[str, Any]:
    """``pages`` browsers with no pool and no Ray in front (in-process ``BrowserCore``, the pool's page runtime),
    each fed batches of ``reference``'s texts back to back with a second run always queued behind the first: the most
    rows per second these browsers compute on this machine, so the most any pool of them can answer. The
    rows are tokenized once, before timing (the pool tokenizes in its own process); every output is checked."""
    from actors.browser import BrowserCore
    from sharding.models import minilm
    from sharding.models.registry import artifacts

    [art] = artifacts(model)
    texts = list(reference)
    data = np.fromfile(art.path, np.uint8)
    cores = [BrowserCore(f"alone-{i}", num_threads=threads) for i in range(pages)]
    wrong = 0

    async def loop(core: BrowserCore, batch_texts: list[str], until: float, done: list[tuple[float, int]]) -> None:
        nonlocal wrong
        feeds = minilm.tokenize(batch_texts)
        expected = np.stack([reference[t] for t in batch_texts])
        while time.perf_counter() < until:
            out = (await core.run(art.key, feeds, fetch=["embedding"]))["outputs"]["embedding"]
            wrong += int(out.shape != expected.shape or np.abs(out - expected).max() > tolerance)
            done.append((time.perf_counter(), len(batch_texts)))

    async def load(batch: int, seconds: float) -> tuple[float, list[tuple[float, int]]]:
        start, done = time.perf_counter(), []
        await asyncio.gather(*(loop(core, [texts[(p * 17 + s * batch + i) % len(texts)] for i in range(batch)],
                                    start + seconds, done)
                               for p, core in enumerate(cores) for s in range(RUNS_IN_FLIGHT_ALONE)))
        return start, done

    try:
        await asyncio.gather(*(core.start() for core in cores))
        for core in cores:
            await core.load_model(art.key, data, art.sha256, "wasm")
        await load(8, warm_s)                       # V8 tiers the runtime's WebAssembly up first
        cells = {}
        for batch in batches:
            start, done = await load(batch, trial_s * (trials + 1))
            windows = [start + trial_s * (i + 1) for i in range(trials + 1)]     # the first window is the ramp
            per_trial = [sum(n for t, n in done if lo <= t < hi) / trial_s for lo, hi in itertools.pairwise(windows)]
            cells[str(batch)] = summary(per_trial) | {
                "rows_per_s": sum(n for t, n in done if windows[0] <= t < windows[-1]) / (trial_s * trials)}
        best = max(cells, key=lambda b: cells[b]["rows_per_s"])
        return {"pages": pages, "threads_per_page": threads, "runs_in_flight_per_page": RUNS_IN_FLIGHT_ALONE,
                "by_batch": cells, "best_batch": int(best), "best_rows_per_s": cells[best]["rows_per_s"],
                "wrong": wrong}
    finally:
        await asyncio.gather(*(core.close() for core in cores), return_exceptions=True)


def pool_threads(browsers: int) -> int:
    """The wasm threads per page of a pool of ``browsers`` browsers on this machine (its default)."""
    return wasm_threads(len(os.sched_getaffinity(0)), browsers)


def browsers_alone(model: str, reference: dict[str, np.ndarray], tolerance: float, browsers_list: list[int],
                   batches: list[int], trials: int, trial_s: float, warm_s: float,
                   thread_per_core: bool = True) -> dict[str, Any]:
    """The browsers' own ceiling (``_pages_alone``) for each browser count the cells use, each page with the
    wasm threads a pool of that many browsers gives it here (``pool_threads``), and (``thread_per_core``) one
    page with a thread per core (do more threads raise it here?)."""
    shapes = [(n, pool_threads(n)) for n in browsers_list]
    cpus = len(os.sched_getaffinity(0))
    if thread_per_core and cpus > pool_threads(1):
        shapes.append((1, cpus))
    out = {}
    for pages, threads in shapes:
        out[f"{pages}_pages_{threads}_threads"] = asyncio.run(
            _pages_alone(model, reference, tolerance, pages, threads, batches, trials, trial_s, warm_s))
        cell = out[f"{pages}_pages_{threads}_threads"]
        print(f"  browsers alone, {pages} page(s) x {threads} thread(s): best {cell['best_rows_per_s']:.1f} rows/s "
              f"(batch {cell['best_batch']}), wrong {cell['wrong']}", flush=True)
    return out
