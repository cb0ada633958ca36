"""BrowserActor: a BrowserCore (actors/browser.py) as a Ray actor, with the probe the pool pings and the
faults it can be asked to suffer (actors/faults.py).

A pool's browser actors are detached (actors/fleet.py): they outlive a crash of the pool's process, so the
incarnation Ray starts next adopts them. They do not outlive the pool itself: each keeps a call to the
pool's ``until_closed`` open from its creation on (started or not), and once that fails because the pool is
dead for good (killed, its driver gone), the browser closes and its process exits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

import ray

from actors.browser import BrowserCore
from actors.faults import inject_fault

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0, max_concurrency=64)
class BrowserActor(BrowserCore):
    """Ray actor around BrowserCore. Methods are async; Ray runs them on the actor's event loop."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pool_watch: asyncio.Future | None = None
        try:
            asyncio.get_running_loop()        # Ray runs an async actor's constructor on the actor's loop
        except RuntimeError:
            return                            # else the watch begins with start()
        self._watch_pool()

    async def start(self, background_s: float = 0.0) -> dict[str, Any]:
        info = await super().start(background_s)
        self._watch_pool()
        return info

    def _watch_pool(self) -> None:
        """From now on, close and exit once the pool is dead for good. From the constructor on: an actor the
        pool creates ahead of need (``Fleet.prepare``) may wait a while to be started, or never be."""
        pool = self.signal.reporter
        if pool is not None and self._pool_watch is None:
            self._pool_watch = asyncio.ensure_future(self._end_with_pool(pool))

    async def _end_with_pool(self, pool: Any) -> None:
        while True:
            try:
                await pool.until_closed.remote()
                return                                   # shut down: the pool closes this browser itself
            except ray.exceptions.ActorDiedError:
                break
            except Exception as exc:                     # not a verdict on the pool: ask again
                log.info("waiting on the pool failed", extra={"browser_id": self.browser_id, "error": str(exc)})
                await asyncio.sleep(1.0)
        log.warning("the pool is gone for good: closing", extra={"browser_id": self.browser_id})
        await self.close()
        os._exit(0)

    async def ping(self) -> str:
        return self.browser_id

    async def inject_fault(self, kind: str, **options: Any) -> dict[str, Any]:
        if kind == "kill_actor":     # SIGKILL of this actor's own process: the browser goes with it (PDEATHSIG)
            os.kill(os.getpid(), signal.SIGKILL)
        return await inject_fault(self, kind, **options)
