"""The pool's side of its event log: the projection it decides from, and the one way to change it.

Guarantees:
- ``state`` is the projection (``events.fold.apply``) of the log's acknowledged events, applied
  strictly in ``seq`` order; nothing else changes it.
- ``record`` returns once its events, and every event before them, are applied to ``state``.
- A retried append is written once (a batch id per append; see actors/state_log.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import ray

from actors.constants import RECORD_GAP_WAIT, STATE_LOG_OPEN_WAIT
from actors.metrics import PoolMetrics
from actors.state_log import get_or_create_state_log, new_batch_id
from events import schema as ev
from events.fold import apply
from events.state import PoolState

log = logging.getLogger(__name__)


class PoolLog:
    """One pool's connection to its StateLog actor, and the projection it keeps in step with it."""

    def __init__(self, name: str, location: str) -> None:
        self.name = name
        self.location = location
        self.state = PoolState()
        self._handle: Any = None
        self._pending: dict[int, ev.Recorded] = {}     # acknowledged records not yet applied (out of order)
        self._applied = asyncio.Condition()
        self._metrics: PoolMetrics | None = None
        self._watchers: list[Callable[[ev.Recorded], None]] = []

    @property
    def opened(self) -> bool:
        return self._handle is not None

    async def open(self) -> None:
        """Find or start the StateLog next to the caller (a local log directory is on this node's disk) and
        take its projection as the starting state."""
        context = ray.get_runtime_context()
        deadline = time.monotonic() + STATE_LOG_OPEN_WAIT
        while True:
            try:
                # Pinned to this node: the log is the pool's child and dies with it (a restarted pool starts
                # its own), and on another node it would fail with that node, stalling every record until
                # Ray declares the node dead (~15 s at Ray's default settings; seen in the node-loss scenario).
                handle = await asyncio.to_thread(get_or_create_state_log, f"{self.name}-log", self.location,
                                                 context.namespace, node_id=context.get_node_id(), pinned=True)
                self.state = await handle.state.remote()
                break
            except ray.exceptions.RayActorError:
                # A restarted pool can still find its predecessor's StateLog under the name while Ray
                # tears it down (it died with its owner); the name frees up in a moment.
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        self._handle = handle
        self._metrics = PoolMetrics(self.name)

    def refresh_metrics(self) -> None:
        """Set the pool's gauges again from its state (``PoolMetrics.refresh``)."""
        if self._metrics is not None:
            try:
                self._metrics.refresh(self.state)
            except Exception as exc:     # metrics are a view: they never stop the pool
                log.warning("metrics refresh failed", extra={"error": str(exc)})

    def watch(self, callback: Callable[[ev.Recorded], None]) -> None:
        """Call ``callback(record)`` after each record is applied (the reconcile loop wakes on some kinds)."""
        self._watchers.append(callback)

    async def record(self, *events: ev.Event) -> list[ev.Recorded]:
        """Append events; returns once they (and every earlier event) are applied to ``state``.

        Concurrent callers append concurrently and acknowledgements can arrive out of order, so records
        are applied strictly in ``seq`` order; a gap that does not fill (a lost reply) is read back from
        the log after RECORD_GAP_WAIT.
        """
        # The batch id makes Ray's at-least-once retry of this append write it once. The reply can end with
        # records the log appended by itself (an automatic snapshot's marker): applied too, not returned.
        records = await self._handle.append_batch.remote(list(events), new_batch_id())
        await self.take(records)
        return records[:len(events)]

    async def take(self, records: list[ev.Recorded]) -> None:
        """Apply ``records`` (acknowledged by the log) and every one before them, in seq order."""
        if not records:
            return
        for rec in records:
            self._pending[rec.seq] = rec
        target = records[-1].seq
        async with self._applied:
            self._apply_pending()
            while self.state.last_seq < target:
                try:
                    await asyncio.wait_for(self._applied.wait(), RECORD_GAP_WAIT)
                except asyncio.TimeoutError:
                    for rec in await self._handle.read.remote(self.state.last_seq + 1, target):
                        self._pending.setdefault(rec.seq, rec)
                self._apply_pending()

    def _apply_pending(self) -> None:
        advanced = False
        while (rec := self._pending.pop(self.state.last_seq + 1, None)) is not None:
            before, self.state = self.state, apply(self.state, rec)
            advanced = True
            if self._metrics is not None:
                try:
                    self._metrics.observe(before, rec, self.state)
                except Exception as exc:     # metrics are a view: they never stop the pool
                    log.warning("metrics update failed", extra={"kind": rec.kind, "error": str(exc)})
            for watcher in self._watchers:
                watcher(rec)
        if advanced:
            self._applied.notify_all()

    async def checkpoint(self) -> int:
        """Snapshot the projection in the log; the SnapshotWritten the log appends itself is taken at once
        (left pending, the next record would wait RECORD_GAP_WAIT for it as for a lost acknowledgement)."""
        seq = await self._handle.snapshot.remote()
        await self.take(await self._handle.read.remote(seq + 1, seq + 1))
        return seq

    async def recent(self, n: int) -> list[dict[str, Any]]:
        return await self._handle.recent.remote(n)

    async def follow(self, start_seq: int, timeout: float) -> list[dict[str, Any]]:
        return await self._handle.follow.remote(start_seq, timeout)
