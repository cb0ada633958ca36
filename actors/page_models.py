"""What a browser's page holds of its models, as its browser actor keeps account of it (actors/browser.py).

Three kinds of bytes, each verified against its sha256 once, when it reached the actor:
- ``held``: the models whose session the page holds (kept only where a spare process may load them too,
  actors/spare.py, which needs their bytes);
- ``staged``: models whose bytes the page holds without a session, staged there by the spare the page was;
- ``received``: bytes received for a load that has not been made yet (``BrowserCore.receive_model``; the
  pool may abandon that send and send again from another copy).

A reload of content the page already holds (held or staged, same sha256) is not hashed again: the actor
keeps its own verified copy for it, and the bytes sent along are ignored.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from events.errors import InputError


@dataclass(frozen=True)
class HeldModel:
    """A model the browser's page holds, as a spare needs it: its verified bytes and its backend."""

    data: memoryview
    sha256: str
    backend: str


class PageModels:
    """The account of one browser's page (a new browser process starts a new one: ``new_page``)."""

    def __init__(self, keep_held: bool) -> None:
        self.keep_held = keep_held                       # a spare process is kept: it needs the held bytes
        self.held: dict[str, HeldModel] = {}
        self.staged: dict[str, HeldModel] = {}
        self.received: dict[str, tuple[str, memoryview]] = {}     # send id -> (sha256, bytes)

    async def receive(self, send_id: str, key: str, model_bytes: np.ndarray, sha256: str) -> None:
        """Keep ``model_bytes`` under ``send_id``, verified against ``sha256`` (InputError if they do not
        match), or the page's own verified copy of that content if it holds it already."""
        kept = self.held.get(key) or self.staged.get(key)
        if kept is not None and kept.sha256 == sha256:
            self.received[send_id] = (sha256, kept.data)
            return
        view = memoryview(model_bytes).cast("B")
        # In a thread (hashlib lets go of the GIL): hashing hundreds of MB takes ~1 s here, and the actor's
        # loop must keep answering the pool's probes meanwhile.
        digest = (await asyncio.to_thread(hashlib.sha256, view)).hexdigest()
        if digest != sha256:
            raise InputError("model_bytes", f"model {key}: sha256 {digest[:16]}… does not match expected "
                             f"{sha256[:16]}…")
        self.received[send_id] = (sha256, view)

    def discard_received(self, send_id: str) -> None:
        self.received.pop(send_id, None)

    def take_received(self, send_id: str, key: str, sha256: str) -> memoryview:
        """The bytes ``receive`` kept under ``send_id`` (no longer kept); LookupError if there are none with
        that sha256 (the pool's own mistake, never a caller's)."""
        sha_kept, view = self.received.pop(send_id, (None, None))
        if sha_kept != sha256 or view is None:
            raise LookupError(f"model {key}: no bytes with sha256 {sha256[:16]}… were received as {send_id}")
        return view

    def claim_staged(self, key: str) -> HeldModel | None:
        """The staged bytes of ``key`` a load is about to use (or to replace, if their content differs)."""
        return self.staged.pop(key, None)

    def loaded(self, key: str, data: memoryview, sha256: str, backend: str) -> None:
        if self.keep_held:
            self.held[key] = HeldModel(data, sha256, backend)

    def unloaded(self, key: str) -> None:
        """The page dropped ``key``: its session and its staged bytes alike."""
        self.held.pop(key, None)
        self.staged.pop(key, None)

    def new_page(self, loaded: Collection[str] = (), staged: Collection[str] = ()) -> None:
        """The browser has a new process: its page holds nothing, or, when it was a spare, the keys of this
        browser's models that the spare ``loaded`` or ``staged``."""
        held = self.held
        self.held = {k: m for k, m in held.items() if k in loaded}
        self.staged = {k: m for k, m in held.items() if k in staged}
