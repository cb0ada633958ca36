"""BrowserActor: a BrowserCore (actors/browser.py) as a Ray actor, with the probe the pool pings and the
faults it can be asked to suffer (actors/faults.py)."""

from __future__ import annotations

import os
import signal
from typing import Any

import ray

from actors.browser import BrowserCore
from actors.faults import inject_fault


@ray.remote(num_cpus=0, max_concurrency=64)
class BrowserActor(BrowserCore):
    """Ray actor around BrowserCore. Methods are async; Ray runs them on the actor's event loop."""

    async def ping(self) -> str:
        return self.browser_id

    async def inject_fault(self, kind: str, **options: Any) -> dict[str, Any]:
        if kind == "kill_actor":     # SIGKILL of this actor's own process: the browser goes with it (PDEATHSIG)
            os.kill(os.getpid(), signal.SIGKILL)
        return await inject_fault(self, kind, **options)
