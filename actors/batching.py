"""Batcher: concurrent requests for one model gathered into one page run (dynamic batching).

A page runs one inference at a time, and most of a small request's time in it is per-run overhead,
so requests that queue behind a busy browser are better run together. Requests join a queue per
model; a batch starts when a slot is free (at most ``slots()`` batches of a model are in flight at
once: the pool gives one or two per browser it may use, two while the machine has a core to spare for the
next batch's way to a page while one runs: actors/decisions/batching.py ``batches_per_browser``)
and either the queue fills ``max_rows`` rows or its oldest request has waited ``wait_s``
(actors/decisions/batching.py decides both).

Guarantees:
- Each request is in exactly one batch per ``submit``; its caller gets the result the run gave for
  it (its own rows), or the error of its batch's run.
- A batch holds at most ``max_rows`` rows, except a request larger than that, which runs alone.
- A batch whose run raises InputError is run again one request at a time: the error reaches only the
  request that caused it, and the others get their answers.
- Requests start in arrival order; none waits behind one that came later.

``AnswerRate`` is the other observation of the queue's flow: the rows answered per busy second, which a
client refused at the pool's door is told to wait by (with the pages' own rate; actors/pool.py ``_admission``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from actors.constants import ANSWER_RATE_WINDOW_S
from actors.decisions import batching
from events.errors import InputError

RunBatch = Callable[[Sequence[Any]], Awaitable[list[Any]]]


@dataclasses.dataclass(eq=False)
class _Job:
    payload: Any
    rows: int
    arrived: float
    answer: asyncio.Future


class Batcher:
    def __init__(self, run: RunBatch, slots: Callable[[], int], max_rows: int, wait_s: float,
                 spawn: Callable[[Awaitable[Any]], asyncio.Future]) -> None:
        """``run(payloads)`` runs one batch and returns one result per payload, in order."""
        self._run = run
        self._slots = slots
        self.max_rows = max_rows
        self.wait_s = wait_s
        self._spawn = spawn
        self._queues: dict[str, deque[_Job]] = {}
        self._running: dict[str, int] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._dispatchers: dict[str, asyncio.Future] = {}

    def queued_rows(self) -> int:
        return sum(j.rows for q in self._queues.values() for j in q)

    async def submit(self, key: str, payload: Any, rows: int) -> Any:
        """Run ``payload`` (``rows`` rows of model ``key``) in a batch; its result, or its batch's error."""
        job = _Job(payload, rows, time.monotonic(), asyncio.get_running_loop().create_future())
        self._queues.setdefault(key, deque()).append(job)
        self._changed.setdefault(key, asyncio.Event()).set()
        if key not in self._dispatchers:
            self._dispatchers[key] = self._spawn(self._dispatch(key))
        return await job.answer

    async def _dispatch(self, key: str) -> None:
        """Start batches of ``key`` while any are queued (started again by the next ``submit``)."""
        queue, changed = self._queues[key], self._changed[key]
        try:
            while queue:
                while queue and queue[0].answer.done():      # its caller went away (pool shutting down)
                    queue.popleft()
                if not queue:
                    break
                wait: float | None = None                     # no slot free: until a batch ends
                free = max(1, self._slots()) - self._running.get(key, 0)
                if free > 0:
                    wait = batching.delay(sum(j.rows for j in queue), time.monotonic() - queue[0].arrived,
                                          self.max_rows, self.wait_s)
                    if wait <= 0:
                        n = batching.take([j.rows for j in queue], self.max_rows, free)
                        batch = [queue.popleft() for _ in range(n)]
                        self._running[key] = self._running.get(key, 0) + 1
                        self._spawn(self._run_batch(key, batch))
                        continue
                changed.clear()
                try:
                    await asyncio.wait_for(changed.wait(), wait)
                except asyncio.TimeoutError:
                    pass
        finally:
            del self._dispatchers[key]

    async def _run_batch(self, key: str, batch: list[_Job]) -> None:
        try:
            try:
                results = await self._run([j.payload for j in batch])
            except InputError:
                if len(batch) == 1:
                    raise
                for job in batch:           # whose input was it? each alone: only that one gets the error
                    await self._run_batch_of_one(job)
                return
            for job, result in zip(batch, results, strict=True):
                if not job.answer.done():
                    job.answer.set_result(result)
        except BaseException as exc:
            for job in batch:
                if not job.answer.done():
                    job.answer.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._running[key] -= 1
            self._changed[key].set()

    async def _run_batch_of_one(self, job: _Job) -> None:
        try:
            [result] = await self._run([job.payload])
        except Exception as exc:
            if not job.answer.done():
                job.answer.set_exception(exc)
        else:
            if not job.answer.done():
                job.answer.set_result(result)


class AnswerRate:
    """Rows answered per second of the time the pool had work (a request admitted), over the last
    ``ANSWER_RATE_WINDOW_S``: what a refused client's retry hint is computed from (an observation of this
    process, like the admitted counts; not pool state). Idle time is left out: a burst after a quiet spell
    would otherwise be promised the quiet spell's rate (100 rows answered in 0.5 s, then 4 s idle, read as
    22 rows/s instead of 200)."""

    def __init__(self) -> None:
        self._answers: deque[tuple[float, int]] = deque()
        self._busy: deque[tuple[float, float]] = deque()     # ended busy stretches
        self._busy_since: float | None = None

    def work_began(self) -> None:
        """The first request was admitted into an idle pool."""
        self._busy_since = time.monotonic()

    def work_ended(self) -> None:
        """The last admitted request left."""
        if self._busy_since is not None:
            self._busy.append((self._busy_since, time.monotonic()))
            self._busy_since = None

    def add(self, rows: int) -> None:
        self._answers.append((time.monotonic(), rows))

    def rows_per_s(self) -> float | None:
        now = time.monotonic()
        start = now - ANSWER_RATE_WINDOW_S
        while self._answers and self._answers[0][0] < start:
            self._answers.popleft()
        while self._busy and self._busy[0][1] < start:
            self._busy.popleft()
        if not self._answers:
            return None
        stretches = [*self._busy, *([(self._busy_since, now)] if self._busy_since is not None else [])]
        busy_s = sum(end - max(begin, start) for begin, end in stretches)
        return sum(rows for _, rows in self._answers) / max(busy_s, 0.1)
