"""Model bytes in the object store, and their way to the browsers (the fleet's loads use this).

A model's bytes are put once and passed to each browser that loads it; Ray pulls a copy to that browser's
node, and lists the copy as a location of the object. When a node vanishes, Ray keeps listing its copy
until it declares the node dead (~15 s at its default settings), and a pull that picks that copy waits
``object_manager_pull_timeout_ms`` (10 s) before it tries another: a shard's load after a node loss took
9.5 s and 30 s so (docs/facts.md). So:

- ``ModelCopies`` records the nodes each copy was sent to, and ``forget_node`` drops the copies sent to a
  node that may be gone: the next load puts the bytes afresh (one location: the pool's own node, which is
  never forgotten, as a fresh put would land there again and the pool goes with it).
- ``send`` gets the bytes to a browser as a step of its own (``BrowserCore.receive_model``), before any
  page work: a send on its way whose copy is forgotten is cancelled and made again from a fresh copy,
  and what an abandoned send kept after all is discarded (``discard_received``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import ray

from sharding.models.registry import ModelArtifact

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ModelCopy:
    """A model's bytes in the object store, and the nodes they were sent to (each load there pulls a copy).
    ``forgotten`` is set when one of those nodes may be gone: sends on their way stop using this copy."""
    ref: ray.ObjectRef
    nodes: set[str] = dataclasses.field(default_factory=set)
    forgotten: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


class ModelCopies:
    """The pool's copies of model bytes (sha256 -> ModelCopy). ``call(browser_id, ref)`` awaits a call to a
    browser's actor (the fleet's, which a cut-off ends at once); ``is_cut_off(browser_id)`` says whether it was
    cut off; ``spawn`` runs background work."""

    def __init__(self, call: Callable[[str, Any], Awaitable[Any]], is_cut_off: Callable[[str], bool],
                 spawn: Callable[[Awaitable[Any]], asyncio.Future]) -> None:
        self._call = call
        self._is_cut_off = is_cut_off
        self._spawn = spawn
        self.copies: dict[str, ModelCopy] = {}
        self._puts: dict[str, asyncio.Lock] = {}
        self.own_node: str | None = None            # the node this process (the pool) runs on; found on first use

    async def copy(self, art: ModelArtifact) -> ModelCopy:
        """``art``'s copy, put now if there is none (one put per model at a time: after a forget, every send of
        that model on its way wants a fresh copy)."""
        async with self._puts.setdefault(art.sha256, asyncio.Lock()):
            if art.sha256 not in self.copies:
                # Both in a thread: copying hundreds of MB into the object store would stall the loop (probes).
                ref = await asyncio.to_thread(lambda: ray.put(np.fromfile(art.path, np.uint8)))
                self.copies[art.sha256] = ModelCopy(ref)
            return self.copies[art.sha256]

    def forget_node(self, node_id: str) -> None:
        """``node_id`` may be gone: drop the copies sent there (their sends on the way go again)."""
        if not node_id or node_id == self.own_node_id():
            return
        for sha, copy in list(self.copies.items()):
            if node_id in copy.nodes:
                del self.copies[sha]
                copy.forgotten.set()

    def clear(self) -> None:
        self.copies.clear()

    def own_node_id(self) -> str:
        """The Ray node this process (the pool) runs on; "" outside Ray."""
        if self.own_node is None:
            self.own_node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        return self.own_node

    async def send(self, browser_id: str, handle: Any, node_id: str, art: ModelArtifact) -> str:
        """Get ``art``'s bytes to the browser on ``node_id`` (``receive_model``), from a fresh copy whenever the
        copy on its way is forgotten meanwhile. Returns the send's id, which ``load_received`` names."""
        while True:
            copy = await self.copy(art)
            if node_id:
                copy.nodes.add(node_id)
            send_id = uuid.uuid4().hex
            sending = handle.receive_model.remote(send_id, art.key, copy.ref, art.sha256)
            received = asyncio.ensure_future(self._call(browser_id, sending))
            forgotten = asyncio.ensure_future(copy.forgotten.wait())
            try:
                await asyncio.wait({received, forgotten}, return_when=asyncio.FIRST_COMPLETED)
                if self._is_cut_off(browser_id):
                    await received                  # raises the failure it was cut off with
                if received.done():
                    received.result()
                    return send_id
                log.info("model bytes sent again from a fresh copy",
                         extra={"browser_id": browser_id, "model": art.key})
            finally:
                forgotten.cancel()
                if not received.done():             # abandoned (a fresh copy goes), or this load was cancelled
                    received.cancel()
                    self._abandon(handle, sending, send_id)

    def _abandon(self, handle: Any, sending: ray.ObjectRef, send_id: str) -> None:
        """Cancel a send: still waiting for its argument, it never runs. One already running may still keep
        its bytes: they are discarded once it ends."""
        ray.cancel(sending)

        async def discard() -> None:
            try:
                await sending
            except Exception:
                return                              # cancelled, or its actor is gone: nothing was kept
            with contextlib.suppress(Exception):
                await handle.discard_received.remote(send_id)

        self._spawn(discard())
