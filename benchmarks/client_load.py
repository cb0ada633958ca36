"""Client load on a pool, shared by the throughput benchmark's cells and its kill runs: client threads sending
MiniLM requests in a loop (every answer checked against the numpy reference, timed and kept), and the warm-up that
brings a pool's pages to V8's optimising tier before anything is measured."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MODEL = "all-minilm-l6-v2"
TOLERANCE = 1e-4                     # max abs difference from the float64 numpy reference, per element
TEXTS = [f"request {i}: {topic} under load, sentence {i % 7}" for i, topic in enumerate(
    ["browsers", "pools", "actors", "logs", "batches", "recovery", "shards", "tokens"] * 16)]


@dataclass
class Load:
    """Client threads sending requests in a loop; every answer checked, timed and kept."""

    pool: Any
    clients: int
    rows: int
    reference: dict[str, np.ndarray]
    done: list[tuple[float, float]] = field(default_factory=list)      # (answered at, latency s)
    wrong: int = 0
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._client, args=(c,), daemon=True) for c in range(self.clients)]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def _client(self, c: int) -> None:
        import ray

        n = 0
        while not self._stop.is_set():
            first = (c * 31 + n * self.rows) % len(TEXTS)
            texts = [TEXTS[(first + i) % len(TEXTS)] for i in range(self.rows)]
            n += 1
            t0 = time.perf_counter()
            try:
                out = ray.get(self.pool.infer.remote(MODEL, {"texts": texts}))
            except Exception as exc:          # counted: a request that fails is reported, never dropped
                self.errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
                continue
            t1 = time.perf_counter()
            expected = np.stack([self.reference[t] for t in texts])
            if out["embedding"].shape != expected.shape or np.abs(out["embedding"] - expected).max() > TOLERANCE:
                self.wrong += 1
            self.done.append((t1, t1 - t0))


def warm(pool: Any, browsers: int, seconds: float, standby: int = 0) -> None:
    """Launch the browsers (and ``standby`` spares), wait until every one holds the model, then load the
    serving pages for ``seconds``: V8 first runs the runtime's WebAssembly on baseline code and
    recompiles hot functions while serving (measured here: a new page's single-sentence run takes 30-40
    ms for its first ~40 runs, 13-14 ms after ~80), and that work would otherwise be counted as the pool's.
    """
    import ray

    from events.state import browsers_alive

    ray.get([pool.infer.remote(MODEL, {"text": TEXTS[i]}) for i in range(4 * browsers)])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = ray.get(pool.get_state.remote())
        alive = browsers_alive(state)
        holding = {b for b, m, _ in state.models if m == MODEL}
        if len(alive) >= browsers + standby and all(b.browser_id in holding for b in alive):
            break
        time.sleep(0.2)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ray.get([pool.infer.remote(MODEL, {"texts": TEXTS[i:i + 8]}) for i in range(0, 8 * browsers, 8)])
