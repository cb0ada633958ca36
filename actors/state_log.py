"""StateLog: the Ray actor that owns the event store and serves it to the pool.

It is restarted by Ray forever (``max_restarts=-1``); each start reopens the store, which repairs a
torn tail and rebuilds the projection from the newest snapshot plus the events after it, so the
sequence continues where the acknowledged events end.

Calls are retried by Ray after a restart (``max_task_retries=-1``), so a call may run twice. Appends
are made idempotent by a client batch id kept in the log itself: pass ``batch_id=new_batch_id()``
and a retried append returns the records of the first one instead of writing them again. Ray does not
order calls of an async actor, nor any call that is retried; a writer that needs its batches in order
waits for each acknowledgement (or sends one ``append_batch``).

An append returns only once the batch is durable under the store's fsync policy. Appends that arrive
together are committed together (group commit): each call waits in a queue that one committer drains,
writing every waiting batch with one write and one sync decision (``EventStore.append_group``), in the
order the calls arrived; each batch keeps its own checksum and batch id.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors import logs
from events.codec import log_entry
from events.errors import SnapshotError, StoreConfigError
from events.schema import Event, Recorded
from events.state import PoolState
from events.store import EventStore

log = logging.getLogger(__name__)


def new_batch_id() -> str:
    """A fresh id for one append; reuse it when retrying that same append yourself."""
    return uuid.uuid4().hex


@ray.remote(max_restarts=-1, max_task_retries=-1, num_cpus=0)
class StateLog:
    """Serves one EventStore: append, read, projection, snapshots, long-poll subscribe."""

    def __init__(
        self,
        location: str | Path,
        fsync: str = "interval",
        segment_bytes: int = 64 << 20,
        snapshot_every: int | None = 10_000,
        compression: str | None = None,
    ) -> None:
        logs.configure()
        self._started_at = time.time()     # wall clock, so a benchmark can split a restart into its parts
        t0 = time.perf_counter()
        self._store = EventStore.open(location, fsync=fsync, segment_bytes=segment_bytes,
                                      snapshot_every=snapshot_every, compression=compression)
        self._open_s = time.perf_counter() - t0
        self._changed: asyncio.Event | None = None
        # Group commit: appends waiting for the committer, and the committer task while it runs.
        self._queue: list[tuple[list[Event], str | None, asyncio.Future]] = []
        self._committer: asyncio.Task | None = None
        self._appends = self._groups = 0          # since this process started: what group commit saved
        restarted = ray.get_runtime_context().was_current_actor_reconstructed
        log.info("StateLog on %s: %s at seq %d in %.3f s (pid %d)", self._store.location,
                 "restarted" if restarted else "started", self._store.last_seq, self._open_s, os.getpid())

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def append(self, event: Event, batch_id: str | None = None) -> Recorded:
        """Record one event; returns it with its seq."""
        (rec,) = await self.append_batch([event], batch_id)
        return rec

    async def append_batch(self, events: Sequence[Event], batch_id: str | None = None) -> list[Recorded]:
        """Record events as one batch, in the given order; committed with whatever other appends wait.

        Returns the batch's records, followed by any the log appended on its own right after the group (an
        automatic snapshot's SnapshotWritten): a reader that applies records strictly in seq order (the
        pool's PoolLog) then finds no gap it would have to wait out."""
        done = asyncio.get_running_loop().create_future()
        self._queue.append((list(events), batch_id, done))
        if self._committer is None:
            self._committer = asyncio.create_task(self._commit())
        return await done

    async def _commit(self) -> None:
        """Drain the queue: each round writes every waiting append as one group."""
        try:
            while self._queue:
                # One turn of the loop lets appends that have already arrived join this group.
                await asyncio.sleep(0)
                group, self._queue = self._queue, []
                self._groups += 1
                self._appends += len(group)
                try:
                    outcomes = self._store.append_group([(events, batch_id) for events, batch_id, _ in group])
                except Exception as exc:      # the write failed: no append of the group is recorded
                    outcomes = [exc] * len(group)
                else:
                    outcomes = self._with_own_records(outcomes)
                for (_, _, done), outcome in zip(group, outcomes, strict=True):
                    if done.done():
                        continue
                    if isinstance(outcome, BaseException):
                        done.set_exception(outcome)
                    else:
                        done.set_result(outcome)
                self._notify()
        finally:
            self._committer = None

    def _with_own_records(self, outcomes: list) -> list:
        """``outcomes`` with the records the store appended after them by itself (an automatic snapshot's
        marker, written inside the group's append) added to the reply of the group's last batch."""
        written = [rec.seq for outcome in outcomes if not isinstance(outcome, BaseException) for rec in outcome]
        last = max(written, default=None)
        if last is None or self._store.last_seq <= last:
            return outcomes
        own = list(self._store.read(last + 1, self._store.last_seq))
        i = max(i for i, outcome in enumerate(outcomes) if not isinstance(outcome, BaseException))
        return [*outcomes[:i], [*outcomes[i], *own], *outcomes[i + 1:]]

    async def read(self, start_seq: int = 1, end_seq: int | None = None, kinds: Sequence[str] | None = None,
                   subject: str | None = None, limit: int | None = None) -> list[Recorded]:
        """Records in [start_seq, end_seq], optionally only ``kinds`` / ``subject``, at most ``limit``."""
        out = []
        for rec in self._store.read(start_seq, end_seq, kinds, subject):
            out.append(rec)
            if limit is not None and len(out) >= limit:
                break
        return out

    async def wait_for(self, seq: int, timeout: float = 30.0) -> int:
        """Wait until last_seq >= seq or ``timeout`` seconds pass; returns last_seq then."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._store.last_seq < seq:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            if self._changed is None:
                self._changed = asyncio.Event()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                break
        return self._store.last_seq

    async def subscribe(self, start_seq: int, timeout: float = 30.0, limit: int = 10_000,
                        kinds: Sequence[str] | None = None, subject: str | None = None) -> list[Recorded]:
        """Long poll: records from ``start_seq`` on, waiting up to ``timeout`` for the first one.
        Call again with the last returned seq + 1 to follow the log."""
        if await self.wait_for(start_seq, timeout) < start_seq:
            return []
        return await self.read(start_seq, None, kinds, subject, limit)

    async def state(self) -> PoolState:
        """The projection (browsers, models, operations, resources, recoveries, sessions, metrics)."""
        return self._store.state()

    async def snapshot(self) -> int:
        """Write a snapshot of the projection now; returns its seq."""
        state = self._store.state()
        if state.last_seq == 0:
            raise SnapshotError("nothing to snapshot: the log is empty")
        self._store.write_snapshot(state.last_seq, state)
        self._notify()  # the SnapshotWritten event is new
        return state.last_seq

    async def last_seq(self) -> int:
        return self._store.last_seq

    async def recent(self, n: int = 100) -> list[dict[str, Any]]:
        """The newest ``n`` events in the seed's transaction-log shape (timestamp, action, data)."""
        return [log_entry(r) for r in self._store.tail(n)]

    async def follow(self, start_seq: int, timeout: float = 30.0, limit: int = 10_000) -> list[dict[str, Any]]:
        """``subscribe`` in ``recent``'s shape: events from ``start_seq`` on, waiting up to ``timeout`` for the
        first (none came: ``[]``)."""
        return [log_entry(r) for r in await self.subscribe(start_seq, timeout, limit)]

    async def compact(self, archive: bool = False) -> dict[str, int]:
        return self._store.compact(archive=archive)

    async def sync(self) -> int:
        """Make everything appended durable now; returns last_seq."""
        self._store.sync()
        return self._store.last_seq

    async def info(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        return {
            "location": self._store.location,
            "pid": os.getpid(),
            "node_id": ctx.get_node_id(),
            "last_seq": self._store.last_seq,
            "first_seq": self._store.first_seq,
            "open_s": self._open_s,
            "started_at": self._started_at,
            "restarted": ctx.was_current_actor_reconstructed,
            # Append calls and the group commits (one write, one sync decision) that recorded them.
            "appends": self._appends,
            "group_commits": self._groups,
        }

    async def close(self) -> None:
        """Seal and release the store (before ``ray.kill(..., no_restart=True)``)."""
        self._store.close()


def _same_location(a: str, b: str | Path) -> bool:
    if isinstance(b, Path) or "://" not in str(b):
        return a == str(Path(b).absolute())
    return True  # URIs are described differently by the backend; trust the name


def get_or_create_state_log(
    name: str,
    location: str | Path,
    namespace: str | None = None,
    *,
    detached: bool = False,
    node_id: str | None = None,
    pinned: bool = False,
    **store_options: Any,
) -> ray.actor.ActorHandle:
    """The named StateLog in ``namespace``, created on ``location`` if it does not exist yet.

    ``node_id``: the node to create it on (a local-disk ``location`` is on that node's disk); a
    ``pyarrow.fs`` URI reachable from every node lets Ray restart it anywhere. The preference is soft
    (Ray may place or restart it elsewhere, and sometimes does) unless ``pinned``.
    Raises StoreConfigError if an actor of that name already serves another location.
    """
    options: dict[str, Any] = {"name": name, "namespace": namespace, "get_if_exists": True}
    if node_id is not None:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=not pinned)
    if detached:
        options["lifetime"] = "detached"
    handle = StateLog.options(**options).remote(str(location), **store_options)
    served = ray.get(handle.info.remote())["location"]
    if not _same_location(served, location):
        raise StoreConfigError(f"StateLog {name!r} already serves {served}, not {location}")
    return handle


__all__ = ["StateLog", "get_or_create_state_log", "new_batch_id"]
