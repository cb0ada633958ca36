"""ResourcePool: the front door. Places models on browsers, runs requests, records every change.

Guarantees:
- The pool's view of browsers, models and operations is the projection of the event log
  (``events.state``); it changes only by applying events the StateLog has acknowledged.
- Every OperationStarted is followed by exactly one OperationCompleted or OperationFailed.
- A request returns a correct result or raises a typed error (InputError for bad input,
  BrowserFailure / NoBrowserAvailableError otherwise); a bad request never reaches a browser.
- Browsers are the pool's children: ``shutdown`` closes them and removes their files.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from typing import Any

import numpy as np
import ray

from actors import placement, validation
from actors.browser import BrowserActor
from actors.chromium import resolve_browser
from actors.constants import DEFAULT_MAX_CONNECTIONS, DEFAULT_NUM_THREADS
from actors.errors import BrowserFailure, FailureCategory
from actors.state_log import get_or_create_state_log, new_batch_id
from events import schema as ev
from events.state import PoolState, apply, browsers_alive, models_on
from sharding import coordinator
from sharding.models import minilm
from sharding.models.cache import cache_dir
from sharding.models.registry import ModelArtifact, artifact_key, artifacts, llama_model
from sharding.plan import even_layer_ranges

log = logging.getLogger(__name__)

TASK_FAMILIES = ("text_embedding", "text_generation")
RECORD_GAP_WAIT = 5.0   # seconds before a gap in acknowledged seqs is read back from the log


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.tobytes() if isinstance(part, np.ndarray) else repr(part).encode())
    return h.hexdigest()[:16]


class PoolCore:
    def __init__(self, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 browser_preferences: dict[str, str] | None = None,
                 fault_tolerance: dict[str, Any] | None = None,
                 backend: str = "auto", num_threads: int = DEFAULT_NUM_THREADS,
                 event_log: str | None = None, name: str | None = None) -> None:
        if not isinstance(max_connections, int) or max_connections < 1:
            raise ValueError(f"max_connections must be a positive int, got {max_connections!r}")
        self.max_connections = max_connections
        self.browser_preferences = {t: "chromium" for t in TASK_FAMILIES} | dict(browser_preferences or {})
        self.fault_tolerance = dict(fault_tolerance or {"level": "none"})
        self.backend = backend
        self.num_threads = num_threads
        self.name = name or f"webpool-{uuid.uuid4().hex[:8]}"
        self.event_log_location = event_log
        self.state = PoolState()
        self._log: Any = None
        self._handles: dict[str, Any] = {}              # browser_id -> BrowserActor handle (I/O, not state)
        self._backend_of: dict[str, str] = {}           # browser_id -> backend chosen for it
        self._model_refs: dict[str, ray.ObjectRef] = {}  # sha256 -> model bytes in the object store
        self._artifacts: dict[tuple, list[ModelArtifact]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._resolved_types: dict[str, str] = {}
        self._in_flight: dict[str, int] = {}
        self._pending: dict[int, Any] = {}              # acknowledged records not yet applied (out of order)
        self._applied = asyncio.Condition()

    # ----- events -------------------------------------------------------------------------------
    async def _ensure_log(self) -> None:
        if self._log is not None:
            return
        async with self._lock("log"):
            if self._log is not None:
                return
            location = self.event_log_location or str(cache_dir() / "events" / self.name)
            handle = await asyncio.to_thread(get_or_create_state_log, f"{self.name}-log", location,
                                             ray.get_runtime_context().namespace)
            self.state = await handle.state.remote()
            self._log = handle
            # Browsers recorded by an earlier incarnation of this pool died with it (they are its
            # children): say so in the log rather than pretend they are still there.
            stale = self._live_ids()
            if stale:
                await self._record(*(ev.BrowserRetired(b, "pool restarted") for b in stale))

    async def _record(self, *events: ev.Event) -> None:
        """Append events; returns once they (and every earlier event) are applied to ``self.state``.

        Concurrent requests append concurrently and acknowledgements can arrive out of order, so
        records are applied strictly in ``seq`` order; a gap that does not fill (a lost reply) is
        read back from the log.
        """
        # The batch id makes Ray's at-least-once retry of this append write it once.
        records = await self._log.append_batch.remote(list(events), new_batch_id())
        for rec in records:
            self._pending[rec.seq] = rec
        target = records[-1].seq
        async with self._applied:
            self._apply_pending()
            while self.state.last_seq < target:
                try:
                    await asyncio.wait_for(self._applied.wait(), RECORD_GAP_WAIT)
                except asyncio.TimeoutError:
                    missing = await self._log.read.remote(self.state.last_seq + 1, target)
                    for rec in missing:
                        self._pending.setdefault(rec.seq, rec)
                self._apply_pending()

    def _apply_pending(self) -> None:
        advanced = False
        while (rec := self._pending.pop(self.state.last_seq + 1, None)) is not None:
            self.state = apply(self.state, rec)
            advanced = True
        if advanced:
            self._applied.notify_all()

    def _lock(self, key: str) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    # ----- browsers -----------------------------------------------------------------------------
    def _browser_type(self, task: str) -> str:
        preferred = self.browser_preferences.get(task, "chromium")
        if preferred not in self._resolved_types:
            self._resolved_types[preferred] = resolve_browser(preferred).browser_type
        return self._resolved_types[preferred]

    async def _launch(self, browser_type: str) -> str:
        browser_id = f"browser-{uuid.uuid4().hex[:8]}"
        handle = BrowserActor.options(name=None).remote(browser_id, browser_type, self.num_threads)
        try:
            info = await handle.start.remote()
        except Exception:
            ray.kill(handle)
            raise
        self._handles[browser_id] = handle
        self._backend_of[browser_id] = placement.choose_backend(info["backends"], info["detail"], self.backend)
        await self._record(ev.BrowserLaunched(
            browser_id=browser_id, browser_type=info["browser_type"], backend_caps=tuple(info["backends"]),
            pid=info["pid"], node_id=info["node_id"] or "", standby=False))
        log.info("browser launched", extra={"browser_id": browser_id, "backend": self._backend_of[browser_id],
                                            "start_ms": round(info["start_ms"])})
        return browser_id

    def _live_ids(self) -> list[str]:
        return [b.browser_id for b in browsers_alive(self.state)]

    def _keys_on(self, browser_id: str) -> frozenset[str]:
        return frozenset(artifact_key(m.model, m.shard, m.sha256) for m in models_on(self.state, browser_id))

    def _views(self) -> list[placement.BrowserView]:
        return [
            placement.BrowserView(b.browser_id, b.browser_type, self._keys_on(b.browser_id),
                                  self._in_flight.get(b.browser_id, 0))
            for b in browsers_alive(self.state)
        ]

    async def _model_ref(self, art: ModelArtifact) -> ray.ObjectRef:
        if art.sha256 not in self._model_refs:
            data = await asyncio.to_thread(np.fromfile, art.path, np.uint8)
            self._model_refs[art.sha256] = ray.put(data)
        return self._model_refs[art.sha256]

    async def _place(self, art: ModelArtifact, task: str, avoid: frozenset[str] = frozenset()) -> str:
        """A live browser holding ``art``: found, or made so by loading it (launching if allowed)."""
        async with self._lock("placement"):
            browser_type = self._browser_type(task)
            decision = placement.place(art.key, self._views(), self.max_connections, browser_type, avoid)
            browser_id = decision.browser_id
            if decision.action == "launch":
                browser_id = await self._launch(browser_type)
            assert browser_id is not None
            self._in_flight[browser_id] = self._in_flight.get(browser_id, 0) + 1   # reserve it
        try:
            async with self._lock(f"load:{browser_id}:{art.key}"):
                if art.key not in self._keys_on(browser_id):
                    await self._load(browser_id, art)
        finally:
            self._in_flight[browser_id] -= 1
        return browser_id

    async def _load(self, browser_id: str, art: ModelArtifact) -> None:
        backend = self._backend_of[browser_id]
        t0 = time.perf_counter()
        try:
            await self._handles[browser_id].load_model.remote(art.key, await self._model_ref(art), art.sha256,
                                                              backend)
        except BrowserFailure as exc:
            await self._browser_failed(browser_id, exc.category, str(exc))
            raise
        await self._record(ev.ModelLoaded(browser_id=browser_id, model=art.model, shard=art.shard, sha256=art.sha256,
                                          backend=backend, load_ms=(time.perf_counter() - t0) * 1000))

    async def _browser_failed(self, browser_id: str, category: FailureCategory, error: str) -> None:
        if browser_id in set(self._live_ids()):
            await self._record(ev.BrowserFailed(browser_id=browser_id, category=category.value, error=error[:500]))

    async def _artifacts_for(self, model: str, ranges: list[tuple[int, int]] | None = None) -> list[ModelArtifact]:
        key = (model, tuple(ranges or ()))
        async with self._lock(f"build:{key}"):
            if key not in self._artifacts:
                self._artifacts[key] = await asyncio.to_thread(artifacts, model, ranges)
        return self._artifacts[key]

    # ----- operations ---------------------------------------------------------------------------
    async def _run_op(self, browser_id: str, model: str, kind: str, digest: str, call) -> Any:
        """Run ``call()`` on a browser as one recorded operation (started -> completed | failed)."""
        op_id = uuid.uuid4().hex
        await self._record(ev.OperationStarted(op_id=op_id, model=model, browser_id=browser_id, kind=kind,
                                               input_digest=digest))
        self._in_flight[browser_id] = self._in_flight.get(browser_id, 0) + 1
        t0 = time.perf_counter()
        try:
            result = await call()
        except BrowserFailure as exc:
            await self._record(ev.OperationFailed(op_id=op_id, category=exc.category.value, error=str(exc)[:500]))
            await self._browser_failed(browser_id, exc.category, str(exc))
            raise
        except ray.exceptions.RayActorError as exc:
            # The actor process itself is gone (killed, node lost).
            await self._record(ev.OperationFailed(op_id=op_id, category=FailureCategory.CRASH.value,
                                                  error=str(exc)[:500]))
            await self._browser_failed(browser_id, FailureCategory.CRASH, "browser actor died")
            raise BrowserFailure(browser_id, FailureCategory.CRASH, "browser actor died") from exc
        except BaseException as exc:
            await self._record(ev.OperationFailed(op_id=op_id, category=FailureCategory.UNKNOWN.value,
                                                  error=f"{type(exc).__name__}: {exc}"[:500]))
            raise
        finally:
            self._in_flight[browser_id] -= 1
        duration_ms = (time.perf_counter() - t0) * 1000
        await self._record(ev.OperationCompleted(op_id=op_id, duration_ms=duration_ms,
                                                 metrics=result.get("metrics", {})))
        result.setdefault("metrics", {})["duration_ms"] = duration_ms
        return result

    async def infer(self, model_name: str, inputs: dict[str, Any]) -> dict[str, Any]:
        """Embed ``{"text": str}`` (one vector) or ``{"texts": [str, ...]}`` (a matrix)."""
        spec, request = validation.embedding_request(model_name, inputs)
        feeds = minilm.tokenize(request.texts)
        await self._ensure_log()
        [art] = await self._artifacts_for(spec.name)
        browser_id = await self._place(art, spec.task)
        handle = self._handles[browser_id]

        async def call() -> dict[str, Any]:
            out = await handle.run.remote(art.key, feeds, fetch=["embedding"])
            emb = out["outputs"]["embedding"]
            return {"embedding": emb[0] if request.single else emb, "metrics": {"page_ms": out["ms"]}}

        result = await self._run_op(browser_id, spec.name, "infer", _digest(*feeds.values()), call)
        return result | {"model": spec.name, "browser_id": browser_id, "backend": self._backend_of[browser_id]}

    async def generate(self, model_name: str, prompt: str, max_new_tokens: int = 16, shards: int = 1,
                       temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> dict[str, Any]:
        """Generate text with a llama model split over ``shards`` browsers (greedy unless temperature > 0)."""
        spec, req = validation.generation_request(model_name, prompt, max_new_tokens, shards, temperature,
                                                  top_p, seed)
        model = await asyncio.to_thread(llama_model, spec.name)
        prompt_ids = model.encode(req.prompt)
        validation.check_context(len(prompt_ids), req.max_new_tokens, model.config.max_context)
        validation.check_shards(req.shards, model.config.n_layers)
        await self._ensure_log()
        ranges = even_layer_ranges(model.config.n_layers, req.shards)
        arts = await self._artifacts_for(spec.name, ranges if req.shards > 1 else None)
        used: set[str] = set()
        stages = []
        for art in arts:
            browser_id = await self._place(art, spec.task, avoid=frozenset(used))
            used.add(browser_id)
            stages.append(coordinator.ShardStage(browser_id, self._handles[browser_id], art))
        session_id = uuid.uuid4().hex
        await self._record(ev.SessionOpened(session_id=session_id, model=spec.name, plan={
            "shards": [{"browser_id": s.browser_id, "artifact": s.artifact.key,
                        "layers": s.artifact.meta["layer_range"]} for s in stages],
            "prompt_ids": prompt_ids, "max_new_tokens": req.max_new_tokens,
            "temperature": req.temperature, "top_p": req.top_p, "seed": req.seed}))

        async def on_token(token: int) -> None:
            await self._record(ev.TokensAppended(session_id=session_id, token_ids=(token,)))

        async def call() -> dict[str, Any]:
            return await coordinator.generate_tokens(
                stages, session_id, prompt_ids, req.max_new_tokens, model.config.eos_id,
                req.temperature, req.top_p, req.seed, on_token)

        # One operation per request, recorded against the first shard's browser.
        try:
            result = await self._run_op(stages[0].browser_id, spec.name, "generate",
                                        _digest(prompt_ids, req), call)
        finally:
            await self._record(ev.SessionClosed(session_id=session_id, reason="done"))
            await asyncio.gather(*(s.handle.drop_state.remote(session_id) for s in stages),
                                 return_exceptions=True)
        return result | {"model": spec.name, "text": model.decode(result["token_ids"]),
                         "prompt_token_ids": prompt_ids, "session_id": session_id,
                         "browser_ids": [s.browser_id for s in stages]}

    # ----- inspection and shutdown --------------------------------------------------------------
    async def health(self) -> dict[str, Any]:
        """Each live browser's own report (models, PIDs, memory), failures recorded as events."""
        await self._ensure_log()
        reports: dict[str, Any] = {}
        for browser_id in self._live_ids():
            try:
                reports[browser_id] = await self._handles[browser_id].health.remote()
            except BrowserFailure as exc:
                await self._browser_failed(browser_id, exc.category, str(exc))
                reports[browser_id] = {"error": str(exc)}
            except ray.exceptions.RayActorError as exc:
                await self._browser_failed(browser_id, FailureCategory.CRASH, "browser actor died")
                reports[browser_id] = {"error": str(exc)}
        return reports

    async def get_state(self) -> PoolState:
        await self._ensure_log()
        return self.state

    async def browser_handle(self, browser_id: str) -> Any:
        """The actor handle of a browser (tests and fault injection use it)."""
        return self._handles[browser_id]

    async def shutdown(self) -> None:
        """Close every browser (removing its files) and retire it in the log."""
        if self._log is None:
            return
        for browser_id, handle in list(self._handles.items()):
            try:
                await asyncio.wait_for(handle.close.remote(), 15)
            except Exception as exc:  # a dead browser has nothing left to close
                log.warning("closing browser failed", extra={"browser_id": browser_id, "error": str(exc)})
            ray.kill(handle)
            if browser_id in set(self._live_ids()):
                await self._record(ev.BrowserRetired(browser_id=browser_id, reason="pool shutdown"))
        self._handles.clear()
        self._model_refs.clear()


@ray.remote(num_cpus=0, max_restarts=0)
class ResourcePool(PoolCore):
    """The pool as a Ray actor: ``ray.get(pool.infer.remote(model, inputs))`` from any driver."""
