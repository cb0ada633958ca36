"""Calls to actors that can be cut off: when the pool finds an actor silent (its node gone), every call
awaiting that actor ends at once with the failure, instead of waiting for Ray's verdict on the node (~15 s
at Ray's default settings). The fleet holds one for the pool's calls to browsers; each shard coordinator
holds one for its calls to the shards' browsers, and the pool tells it whom to cut off.
"""

from __future__ import annotations

import asyncio
from typing import Any


def _retrieved(future: asyncio.Future) -> None:
    """Retrieve a dropped call's outcome, so a late failure is not reported as never retrieved."""
    if not future.cancelled():
        future.exception()


class CutOffs:
    """Per key (a browser id): a future that is resolved, with the failure, when the key is cut off."""

    def __init__(self) -> None:
        self._cut: dict[str, asyncio.Future] = {}

    def _future(self, key: str) -> asyncio.Future:
        return self._cut.setdefault(key, asyncio.get_running_loop().create_future())

    async def call(self, key: str, ref: Any) -> Any:
        """Await ``ref`` (an ObjectRef or awaitable of a call to ``key``'s actor) unless ``key`` is cut off
        first: then the failure it was cut off with is raised at once, and the call's late end is dropped."""
        cut = self._future(key)
        answer = asyncio.ensure_future(ref)
        try:
            await asyncio.wait({answer, cut}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:           # this wait was cancelled: the call's end is dropped
            answer.add_done_callback(_retrieved)
            raise
        if answer.done():
            return answer.result()
        answer.add_done_callback(_retrieved)        # cut off: the call's late end is dropped
        raise cut.exception()

    def cut(self, key: str, failure: BaseException) -> None:
        """End every call awaiting ``key``, now and later, with ``failure`` (once; later cuts change nothing)."""
        cut = self._future(key)
        if not cut.done():
            cut.set_exception(failure)
            cut.exception()          # retrieved: a cut nobody was waiting on is not an unhandled error

    def is_cut(self, key: str) -> bool:
        return key in self._cut and self._cut[key].done()

    def reset(self, key: str) -> None:
        """``key`` names a new actor now (a restart under the same id): its calls are not cut off."""
        if self.is_cut(key):
            del self._cut[key]

    def forget(self, key: str) -> None:
        self._cut.pop(key, None)
