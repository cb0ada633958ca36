"""BrowserCore: one self-launched Chromium, one page running onnxruntime-web (the Ray actor around it is
actors/browser_actor.py).

Guarantees:
- The browser dies with the actor's process (PR_SET_PDEATHSIG), and everything it writes lives in
  one temp folder owned by the actor and removed by ``close`` (or, after a hard kill, by the next
  actor's start-up sweep, which checks that the owning PID is gone).
- Inputs reach the page only as ``evaluate`` arguments; tensors cross as base64; model bytes are
  fetched by the page from the actor's loopback server, never sent through Playwright messages.
- A browser that crashes, disconnects or hangs is detected from real signals, and the category
  follows from which signal came, never from how long one waited: the process's exit (a pidfd the
  kernel makes readable) is CRASH, the page's ``crash`` event (CDP ``Inspector.targetCrashed``) is
  CRASH, a lost CDP connection is CONNECTION if the browser still answers on its own DevTools port,
  a spent time budget is TIMEOUT. Every later call raises ``BrowserFailure`` with that category, so
  the actor is never a silent zombie.
- A call's error is the request's fault (``InputError``) only when the runtime says so: it answers
  every call with ``{value}`` or a typed ``{error}``; a ``RequestError`` is the caller's, any other
  error the browser's.
- Playwright reaches the browser through a loopback relay (``actors.cdp_relay``), so the
  ``disconnect`` fault cuts a real connection and the real handler classifies it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import ray
from playwright.async_api import Browser, CDPSession, Page, Playwright, async_playwright
from playwright.async_api import Error as PlaywrightError
from playwright.async_api import TimeoutError as PlaywrightTimeoutError

from actors import chromium, logs, priority, reaper
from actors.cdp_relay import CdpRelay
from actors.constants import (
    BLOCKED_URLS_REPORTED,
    HEALTH_TIMEOUT,
    LOAD_MODEL_TIMEOUT,
    PAGE_READY_WAIT,
    RESUME_SETTLE_WAIT,
    RUN_TIMEOUT,
    STAGED_CLAIM_S,
)
from actors.decisions import threads
from actors.failure_signal import FailureSignal, runtime_error, watch_connection, watch_page, watch_process
from actors.isolation import isolate
from actors.page_models import PageModels
from actors.page_server import PageServer
from actors.spare import SpareKeeper, SpareProcess, discard, runtime_tab
from actors.tensors import decode_tensor, encode_tensor
from events.errors import BrowserFailure, FailureCategory, InputError, describe
from sharding.models.cache import cache_dir

log = logging.getLogger(__name__)
# TMPDIR as this process had it before a browser pointed it into its own folder (see ``start``).
_PROCESS_TMPDIR = os.environ.get("TMPDIR")

class BrowserCore:
    """The browser-owning object, usable in-process (benchmarks' floor) or wrapped as a Ray actor.

    With ``spare_process``, once the browser has served and gone quiet the core starts a spare Chromium in
    the background (actors/spare.py), and ``restart`` takes it instead of launching one.
    """

    def __init__(self, browser_id: str, browser_type: str = "chromium", num_threads: int | None = None,
                 memory_limit_mb: int | None = None, reporter: Any = None, spare_process: bool = False,
                 pages_per_node: int = 1):
        logs.configure()
        self.browser_id = browser_id
        self.requested_type = browser_type
        # None: chosen for this node's cores and the pages that may share them (actors/decisions/threads.py).
        if num_threads is None:
            num_threads = threads.wasm_threads(len(os.sched_getaffinity(0)), pages_per_node)
        self.num_threads = num_threads
        self.spares = SpareKeeper(self) if spare_process else None
        self.page_models = PageModels(keep_held=spare_process)     # what the page holds (actors/page_models.py)
        self._unstaging: asyncio.Future | None = None   # drops staged bytes that no reload claimed
        self.memory_limit_bytes = memory_limit_mb << 20 if memory_limit_mb else None
        self.exe: chromium.BrowserExecutable | None = None
        self.temp_dir: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.server: PageServer | None = None
        self.relay: CdpRelay | None = None           # Playwright <-> the browser's DevTools port
        self.ws_path = ""                            # the browser's CDP WebSocket path
        self.pw: Playwright | None = None
        self._pw_starting: asyncio.Future | None = None
        self.browser: Browser | None = None
        self.page: Page | None = None
        self.page_cdp: CDPSession | None = None     # opened before any hang: terminateExecution works
        self.capabilities: dict[str, Any] = {}
        self.signal = FailureSignal(browser_id, reporter)     # this browser's failure, from signals
        self.blocked_requests: list[str] = []
        self.closing = False                          # a step of ours is closing the process: its end is no failure
        self.generation = 0                           # browser processes started by this actor
        self.background = False                       # its processes run in the background (actors/priority.py)
        self._background_ends: asyncio.Future | None = None     # moves them to the normal priority at its cap
        self._background_until = 0.0                  # when that cap comes (wall clock, for the health report)
        self._spawned: subprocess.Popen | None = None  # the Chromium process being launched, before its port is open
        self.profile: Path | None = None              # the current process's profile folder
        self.port = 0
        self.work_in_flight = 0                       # model loads and runs under way in the page
        self.work_ended_at = time.monotonic()         # when the last of them ended (a spare waits for quiet)
        self._cleanups: set[asyncio.Future] = set()   # old profiles being removed
        self._last_page_health: dict[str, Any] | None = None
        self._system_cdp: tuple[Browser, CDPSession] | None = None    # process_ids' session, per connection
        self._memory = chromium.MemoryReading()        # the health report's PSS figures, read again when they
        self._spare_memory = chromium.MemoryReading()  # may have moved (a read costs ~25 ms of CPU)

    # ----- life cycle -------------------------------------------------------------------------
    async def start(self, background_s: float = 0.0) -> dict[str, Any]:
        """Start the browser; with ``background_s`` (a standby) in the background (actors/priority.py) until it
        first serves, or for at most that many seconds from now. The bound counts the launch too: beside
        normal work that keeps every core busy, a Chromium in the background gets no CPU and never opens its
        DevTools port (a pool's standby never came while two busy loops ran)."""
        t0 = time.perf_counter()
        self.background = background_s > 0 and priority.can_restore()
        if self.background:
            self._background_until = time.time() + background_s
            self._background_ends = asyncio.ensure_future(self.leave_background(after_s=background_s))
        self.exe = chromium.resolve_browser(self.requested_type)
        self.temp_dir = reaper.new_folder()
        # Playwright's driver writes its artifacts under TMPDIR: keep them inside our folder too.
        os.environ["TMPDIR"] = str(self.temp_dir)
        # Playwright's driver (a Node.js process: the slowest part of a start, 0.3-0.7 s here) starts first, and
        # the reaper, the page server and Chromium's launch go on beside it; _connect waits for it. Node's
        # on-disk compile cache spares it compiling the driver's JavaScript again (~60 ms of CPU a start here;
        # Node ignores a cache it cannot use).
        os.environ.setdefault("NODE_COMPILE_CACHE", str(cache_dir() / "node-compile-cache"))
        self._pw_starting = asyncio.ensure_future(async_playwright().start())
        watching = asyncio.ensure_future(reaper.watch(self.temp_dir))
        try:
            reaper.sweep_stale_folders()
            self.server = PageServer()
            self.server.bind()
            # Chromium is launched at the page's URL as soon as the server has its port; the server is set up
            # (aiohttp's import, ~0.13 s) while Chromium starts (~0.16 s to its DevTools port), the page's first
            # request waiting in the socket's backlog until then. The launch goes first: it spawns Chromium
            # before its first await, the server's set-up runs in that await.
            launching = asyncio.ensure_future(self._launch_browser())
            serving = asyncio.ensure_future(self.server.start())
            try:
                await serving
            except asyncio.CancelledError:
                launching.cancel()
                raise
            except BaseException:
                await asyncio.gather(launching, return_exceptions=True)    # it ends its own way, browser and all
                raise
            await launching
        finally:
            await watching
        ms = (time.perf_counter() - t0) * 1000
        log.info("browser started", extra={"browser_id": self.browser_id, "pid": self.proc.pid, "ms": round(ms)})
        return self.info() | {"start_ms": ms}

    async def _launch_browser(self) -> bool:
        """A new Chromium process with a fresh profile, connected, with the runtime page open; or the spare
        process, when there is a usable one (returns whether it was taken).

        A browser that does not come up is a BrowserFailure whose category comes from the signal: the
        process exited or the page crashed (CRASH), a budget ran out (TIMEOUT), else UNKNOWN.
        """
        assert self.exe is not None and self.temp_dir is not None
        self.generation += 1
        self.blocked_requests = []       # counted per browser process (a BrowserLaunched starts afresh)
        self._last_page_health = None
        spare = self.spares.take() if self.spares is not None else None
        if spare is not None and spare.usable():
            self.page_models.new_page(loaded=spare.models, staged=spare.staged)
            await self._adopt(spare)
            if self.page_models.staged:
                self._unstaging = asyncio.ensure_future(self._unstage_unclaimed(self.generation))
            return True
        self.page_models.new_page()
        if spare is not None:
            await discard(spare)
        try:
            self.profile = self.temp_dir / f"profile-{self.generation}"
            # The runtime page opens with the process and starts setting its runtime up (~0.4 s of compiling
            # WebAssembly here) while Playwright's driver is still starting; see _open_page.
            try:
                self.proc, self.port, self.ws_path = await chromium.launch(
                    self.exe, self.profile, self._runtime_url(), background=self.background,
                    spawned=lambda proc: setattr(self, "_spawned", proc))
            finally:
                self._spawned = None
            watch_process(self, self.proc)
            if self.relay is None:
                self.relay = CdpRelay()
                await self.relay.start(self.port)
            else:
                self.relay.retarget(self.port)
            await chromium.tab_committed(self.port, self.server.base_url, PAGE_READY_WAIT)
            await self._connect()
            await self._open_page()
        except BrowserFailure:
            raise
        except Exception as exc:
            raise self._start_failure(exc) from None
        return False

    def _start_failure(self, exc: Exception) -> BrowserFailure:
        what = describe(exc, limit=300)
        if isinstance(exc, chromium.BrowserExitedError):
            return BrowserFailure(self.browser_id, FailureCategory.CRASH, f"browser exited during start-up ({what})")
        if self.proc is not None and self.proc.poll() is not None:
            return BrowserFailure(self.browser_id, FailureCategory.CRASH,
                                  f"browser exited with code {self.proc.returncode} during start-up ({what})")
        if self.signal.failure is not None:
            category, detail = self.signal.failure
            return BrowserFailure(self.browser_id, category, f"{detail} during start-up")
        if isinstance(exc, TimeoutError | asyncio.TimeoutError | PlaywrightTimeoutError):
            return BrowserFailure(self.browser_id, FailureCategory.TIMEOUT, f"start-up ran out of time ({what})")
        return BrowserFailure(self.browser_id, FailureCategory.UNKNOWN, f"start-up failed ({what})")

    async def _connect(self) -> None:
        if self.pw is None and self._pw_starting is not None:
            self.pw = await self._pw_starting
        assert self.pw is not None and self.relay is not None
        self.browser = await self.pw.chromium.connect_over_cdp(f"ws://127.0.0.1:{self.relay.port}{self.ws_path}")
        watch_connection(self, self.browser)

    def _runtime_url(self) -> str:
        """The runtime page, told (as data in its URL) to set the runtime up for ``num_threads`` as it opens."""
        assert self.server is not None
        return self.server.base_url + "index.html?" + urllib.parse.urlencode({"threads": self.num_threads})

    async def _open_page(self) -> None:
        """Take the runtime page the browser opened with and route its requests (actors/isolation.py). Until
        then it has loaded only webpool's own runtime files, from its own origin; every model and request
        comes after. A page found elsewhere (a browser that did not open it) is sent to it now."""
        assert self.browser is not None and self.server is not None
        self.page = await runtime_tab(self.browser)
        await self._attach_page()
        if self.page.url.startswith(self.server.base_url):
            await self.page.wait_for_function("window.webpoolReady === true", timeout=PAGE_READY_WAIT * 1000)
        else:
            await self._load_runtime(self.page)
        # The runtime's WebAssembly is set up in the page meanwhile; the first model load waits for it.
        self.capabilities = await self._call("init", [{"numThreads": self.num_threads, "warmRuntime": "background"}],
                                             PAGE_READY_WAIT)

    async def _load_runtime(self, page: Page) -> None:
        assert self.server is not None
        await page.goto(self.server.base_url + "index.html", timeout=PAGE_READY_WAIT * 1000)
        await page.wait_for_function("window.webpoolReady === true", timeout=PAGE_READY_WAIT * 1000)

    async def _attach_page(self) -> None:
        assert self.page is not None
        watch_page(self, self.page)
        self.page_cdp = await self._isolate(self.page, self.blocked_requests)

    async def _isolate(self, page: Page, blocked: list[str]) -> CDPSession:
        assert self.server is not None
        return await isolate(page, self.server.base_url, blocked)

    # ----- the spare process (actors/spare.py) ----------------------------------------------------
    async def _unstage_unclaimed(self, generation: int) -> None:
        """Drop the staged bytes no reload claimed within ``STAGED_CLAIM_S`` of taking the spare over (the pool
        reloads a restarted browser's models at once; one it moved elsewhere would otherwise stay in memory)."""
        await asyncio.sleep(STAGED_CLAIM_S)
        for key in list(self.page_models.staged):
            if generation != self.generation or self.closing:
                return
            self.page_models.staged.pop(key, None)
            try:
                await self._call("unstage", [key], HEALTH_TIMEOUT)
            except Exception as exc:        # a page that is gone holds nothing; its failure is the signal's
                log.info("staged model bytes not dropped", extra={"browser_id": self.browser_id, "model": key,
                                                                  "error": describe(exc, limit=200)})
                return

    async def _adopt(self, spare: SpareProcess) -> None:
        """Make ``spare`` this browser's process: its exit, crash and lost connection are the signals now."""
        old_relay = self.relay
        self.proc, self.port, self.ws_path, self.relay = spare.proc, spare.port, spare.ws_path, spare.relay
        self.browser, self.page, self.page_cdp = spare.browser, spare.page, spare.page_cdp
        self.capabilities = spare.capabilities
        self.blocked_requests = spare.blocked
        self.profile = spare.profile
        assert self.browser is not None and self.page is not None
        watch_process(self, self.proc)
        watch_connection(self, self.browser)
        watch_page(self, self.page)
        if old_relay is not None:
            await old_relay.close()

    # ----- recovery in place ----------------------------------------------------------------------
    async def reconnect(self) -> dict[str, Any]:
        """Re-attach to the same, still running browser and page: page state (models) is kept.

        Fails with BrowserFailure if the browser process or the page is gone (nothing to reconnect to), or
        a model's run queue does not settle within ``RESUME_SETTLE_WAIT`` (see ``resume``).
        """
        t0 = time.perf_counter()
        if self.proc is None or self.proc.poll() is not None:
            raise BrowserFailure(self.browser_id, FailureCategory.CRASH, "browser process is gone; cannot reconnect")
        if self.signal.failure is not None and self.signal.failure[0] is FailureCategory.CRASH:
            raise BrowserFailure(self.browser_id, FailureCategory.CRASH, "page crashed; cannot reconnect")
        if self.signal.failure is not None and self.signal.failure[0] is FailureCategory.MEMORY:
            # The page keeps what it allocated across a reconnect: it would fail its next health check.
            raise BrowserFailure(self.browser_id, FailureCategory.MEMORY,
                                 "over its memory ceiling; reconnecting frees nothing")
        if self.browser is not None and self.browser.is_connected():
            self.closing = True
            try:
                await asyncio.wait_for(self.browser.close(), 2.0)     # CDP-connected: only disconnects
            except (PlaywrightError, asyncio.TimeoutError):
                pass
            self.closing = False                          # a step of ours is closing the process: its end is no failure
        self.signal.clear()
        phases = {"close": time.perf_counter()}
        await self._connect()
        phases["connect"] = time.perf_counter()
        assert self.browser is not None and self.server is not None
        ours = [p for p in self.browser.contexts[0].pages if p.url.startswith(self.server.base_url)]
        if not ours:
            raise BrowserFailure(self.browser_id, FailureCategory.CRASH, "runtime page is gone; cannot reconnect")
        self.page = ours[0]
        await self._attach_page()
        phases["attach"] = time.perf_counter()
        # The page must also be usable: a reconnect would only hand a stuck page back.
        page = await self._usable_page("reconnect")
        phases["health"] = time.perf_counter()
        marks = [t0, *phases.values()]      # where the time went, for benchmarks/failure_signals.py
        return {"models": page["models"], "ms": (time.perf_counter() - t0) * 1000,
                "phases_ms": {name: (b - a) * 1000 for name, a, b in zip(phases, marks[:-1], marks[1:], strict=True)}}

    async def resume(self) -> dict[str, Any]:
        """Go on with the same connection and page after a hang that a time budget ended by terminating the
        page's script: nothing is re-attached or reloaded. Fails with BrowserFailure unless the browser
        process lives, no failure signal came, the page answers, and every model's run queue settles within
        ``RESUME_SETTLE_WAIT`` (a run cut off mid-way never does: that page needs replacing).
        """
        t0 = time.perf_counter()
        self._check()
        page = await self._usable_page("resume")
        return {"models": page["models"], "ms": (time.perf_counter() - t0) * 1000}

    async def _usable_page(self, action: str) -> dict[str, Any]:
        """The page's models, once it answers and every model's run queue settles within
        ``RESUME_SETTLE_WAIT``; a run a terminated script cut off mid-way never settles, and blocks its
        model's runs for good: then BrowserFailure (``action`` says what could not be done)."""
        page = await self._call("settled", [RESUME_SETTLE_WAIT * 1000], HEALTH_TIMEOUT)
        if not page["settled"]:
            raise BrowserFailure(self.browser_id, FailureCategory.TIMEOUT,
                                 f"a run in the page is still unfinished; cannot {action}")
        return page

    async def restart(self) -> dict[str, Any]:
        """Replace the browser process (the old one is killed); its models must be loaded again (a spare
        process taken over may hold them already: the page's ``load`` then answers at once)."""
        t0 = time.perf_counter()
        if self.browser is not None:
            # Closed in the background (a dead connection takes 20-150 ms to close, a hung one up to 2 s). From
            # here it is not this browser's connection: its late events are ignored (actors/failure_signal.py).
            self._spawn_cleanup(_close_quietly(self.browser))
            self.browser = self.page = self.page_cdp = None
        phases = {"close": time.perf_counter()}
        self.closing = True
        if self.proc is not None:
            await asyncio.to_thread(chromium.terminate, self.proc, 0.5)
        if self.profile is not None:     # removed in the background: nothing waits for it
            self._spawn_cleanup(asyncio.to_thread(shutil.rmtree, self.profile, True))
        phases["terminate"] = time.perf_counter()
        # No process until the new one runs: a check meanwhile must not read the old one's exit as a crash.
        self.proc = None
        self.closing = False                          # a step of ours is closing the process: its end is no failure
        self.signal.clear()
        from_spare = await self._launch_browser()
        phases["launch"] = time.perf_counter()
        marks = [t0, *phases.values()]
        return self.info() | {"start_ms": (time.perf_counter() - t0) * 1000, "from_spare": from_spare,
                              "phases_ms": {name: (b - a) * 1000
                                            for name, a, b in zip(phases, marks[:-1], marks[1:], strict=True)}}

    async def leave_background(self, after_s: float = 0.0) -> None:
        """Give the browser's processes the normal priority (~5 ms for ~110 threads): now (a standby about to
        serve), or ``after_s`` seconds from now if still in the background then (its bound)."""
        if after_s:
            await asyncio.sleep(after_s)
        elif self._background_ends is not None:
            self._background_ends.cancel()
        if self.background:
            self.background = False          # a launch not yet begun starts at the normal priority
            proc = self._spawned or self.proc       # one being launched, else the one that runs
            if proc is not None:
                await asyncio.to_thread(priority.to_foreground, proc.pid, self.browser_id)

    def _spawn_cleanup(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    def info(self) -> dict[str, Any]:
        return {
            "browser_id": self.browser_id,
            "browser_type": self.exe.browser_type if self.exe else self.requested_type,
            "executable": self.exe.path if self.exe else None,
            "pid": self.proc.pid if self.proc else None,
            "background": self.background,
            "background_until": self._background_until if self.background else None,   # wall clock, at the latest
            "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
            "backends": list(self.capabilities.get("backends", [])),
            "detail": self.capabilities.get("detail", {}),
            # Set for a process taken from a spare: its runtime's set-up time, paid before it was needed.
            "runtime_warm_up_ms": self.capabilities.get("runtimeWarmUpMs"),
            "wasm_threads": self.wasm_threads(),
        }

    def wasm_threads(self) -> int:
        """The threads the page's runtime computes with: ``num_threads`` where the page can run threads (it is
        cross-origin isolated), else one (onnxruntime-web then runs one whatever it is asked)."""
        return self.num_threads if self.capabilities.get("detail", {}).get("threads") else 1

    async def close(self) -> None:
        """Stop the browser and remove every file it wrote. Safe to call twice."""
        self.closing = True
        for task in (self._background_ends, self._unstaging):
            if task is not None:
                task.cancel()
        if self.spares is not None:
            await self.spares.close()
        if self._cleanups:
            await asyncio.gather(*self._cleanups, return_exceptions=True)
        if self.pw is None and self._pw_starting is not None:
            try:
                self.pw = await self._pw_starting       # a start-up that failed before it was needed
            except Exception:
                pass
        if self.pw is not None:
            try:
                if self.browser is not None:
                    await self.browser.close()     # CDP-connected: only disconnects
            except PlaywrightError:
                pass
            await self.pw.stop()
            self.pw = None
        if self.proc is not None:
            chromium.terminate(self.proc)
        if self.relay is not None:
            await self.relay.close()
        if self.server is not None:
            await self.server.stop()
        if self.temp_dir is not None:
            # In a browser actor's process this is its end; in one that goes on (a test, a benchmark's in-process
            # pages), what it starts next must not inherit a folder that is about to be gone.
            if os.environ.get("TMPDIR") == str(self.temp_dir):
                if _PROCESS_TMPDIR is None:
                    os.environ.pop("TMPDIR", None)
                else:
                    os.environ["TMPDIR"] = _PROCESS_TMPDIR
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None

    async def current_failure(self) -> tuple[str, str] | None:
        """The failure this browser is in now (category, detail); None once a recovery step revived it."""
        return None if self.signal.failure is None else (self.signal.failure[0].value, self.signal.failure[1])

    def _current_page(self) -> Page:
        """The page now; while a restart is between processes there is none (a call then is a connection
        failure, as one to the page being replaced would be)."""
        if self.page is None or self.browser is None or self.proc is None:
            raise BrowserFailure(self.browser_id, FailureCategory.CONNECTION, "the browser is being replaced")
        return self.page

    def _check(self) -> None:
        if self.signal.failure is None and self.proc is not None and self.proc.poll() is not None:
            self.signal.fail(FailureCategory.CRASH, f"browser process exited ({self.proc.returncode})", self.proc.pid)
        self.signal.raise_if_failed()

    async def _call(self, name: str, args: list[Any], timeout: float, work: bool = False) -> Any:
        """Call the runtime's ``name`` with ``args`` (both data) within a time budget; its typed errors
        become InputError or BrowserFailure, and a call the browser did not finish a BrowserFailure of
        the signal's category. ``work``: a model load or run (health reports do not probe the page while
        one is under way)."""
        self._check()
        page = self._current_page()
        self.work_in_flight += work
        try:
            # The page does not start a call whose deadline has passed (same host, same clock).
            deadline_ms = (time.time() + timeout) * 1000
            answer = await asyncio.wait_for(
                page.evaluate("([n, a, d]) => window.webpool.call(n, a, d)", [name, args, deadline_ms]), timeout)
        except asyncio.TimeoutError:
            await self._terminate_script()
            raise BrowserFailure(self.browser_id, FailureCategory.TIMEOUT,
                                 f"no answer within {timeout:.1f} s") from None
        except PlaywrightError as exc:
            if page is not self.page:
                # A reconnect or restart by recovery replaced the page under the call: its fate is
                # unknown, which is a connection failure, not bad input.
                raise BrowserFailure(self.browser_id, FailureCategory.CONNECTION,
                                     "connection was replaced during the call") from None
            raise await self.signal.after_call_failed(exc) from None
        finally:
            self.work_in_flight -= work
            if work:
                self.work_ended_at = time.monotonic()
        if "error" in answer:
            raise runtime_error(self.browser_id, answer["error"])
        return answer["value"]

    async def _terminate_script(self) -> None:
        if self.page_cdp is not None:
            try:
                await asyncio.wait_for(self.page_cdp.send("Runtime.terminateExecution"), 2.0)
            except (PlaywrightError, asyncio.TimeoutError):
                pass

    # ----- models -------------------------------------------------------------------------------
    async def load_model(self, key: str, model_bytes: np.ndarray, sha256: str, backend: str = "wasm") -> dict:
        """Create a session for ``model_bytes`` (verified against ``sha256``) on ``backend``."""
        send_id = uuid.uuid4().hex
        await self.receive_model(send_id, key, model_bytes, sha256)
        return await self.load_received(send_id, key, sha256, backend)

    async def receive_model(self, send_id: str, key: str, model_bytes: np.ndarray, sha256: str) -> None:
        """Keep ``model_bytes`` for ``load_received`` under ``send_id``, verified against ``sha256`` (unless the
        page holds that content already, verified before: then its own copy is kept instead). The
        bytes' way to this node is a step of its own: the pool can abandon it and send them again from
        another copy before any page work starts (``ModelCopies.send``); it discards what an abandoned
        send kept (``discard_received``)."""
        await self.page_models.receive(send_id, key, model_bytes, sha256)

    async def discard_received(self, send_id: str) -> None:
        self.page_models.discard_received(send_id)

    async def load_received(self, send_id: str, key: str, sha256: str, backend: str = "wasm") -> dict:
        """Create a session of ``key`` on ``backend`` from the bytes ``receive_model`` kept under ``send_id``."""
        view = self.page_models.take_received(send_id, key, sha256)
        backends = self.capabilities.get("backends", [])
        if backend not in backends:
            raise InputError("backend", f"{backend!r} is not available in browser {self.browser_id} "
                             f"(has {', '.join(backends)})")
        assert self.server is not None
        staged = self.page_models.claim_staged(key)
        if staged is not None and staged.sha256 != sha256:      # other content under the key: not these bytes
            await self._call("unstage", [key], HEALTH_TIMEOUT)
        url = self.server.put_blob(key, view)
        try:
            result = await self._call("load", [key, url, backend], LOAD_MODEL_TIMEOUT, work=True)
        finally:
            self.server.drop_blob(url)
        self.page_models.loaded(key, view, sha256, backend)
        if self.spares is not None:
            self.spares.tend(start=False)
        return result | {"backend": backend, "sha256": sha256}

    async def run(self, key: str, feeds: dict[str, np.ndarray], fetch: list[str] | None = None,
                  state: str | None = None, state_pairs: list[tuple[str, str]] | None = None,
                  initial_state: dict[str, np.ndarray] | None = None,
                  timeout: float = RUN_TIMEOUT, standby: bool = False) -> dict[str, Any]:
        """Run one step of model ``key``; returns {"outputs": {name: array}, "ms": in-page time}. A run on a
        ``standby`` (a hedge's copy) starts no spare process: a standby is the failover's spare itself, and
        a spare's start (a Chromium and the models: seconds of CPU) would slow the very requests the copy
        hedges; it gets one once it serves. The first run that is not a standby's gives a browser started in
        the background the normal CPU priority."""
        opts = {
            "fetch": fetch,
            "state": state,
            "statePairs": [list(p) for p in state_pairs or []],
            # Given: the state starts afresh from it (replacing one of that name); None: the state goes on.
            "initialState": (None if initial_state is None
                             else {k: encode_tensor(v) for k, v in initial_state.items()}),
        }
        if self.background and not standby:     # a standby's first request, before the pool's word came
            await self.leave_background()
        encoded = {name: encode_tensor(v) for name, v in feeds.items()}
        result = await self._call("run", [key, encoded, opts], timeout, work=True)
        if self.spares is not None and not standby:
            self.spares.tend()
        return {"outputs": {k: decode_tensor(v) for k, v in result["outputs"].items()}, "ms": result["ms"]}

    async def warm_up_round(self, key: str, feeds: list[dict[str, np.ndarray]]) -> float:
        """Run model ``key`` once on each of ``feeds`` (outputs dropped); returns the page time of the round.
        The pool repeats rounds until the model's WebAssembly is optimised (actors/decisions/warmup.py)."""
        opts = {"fetch": [], "state": None, "statePairs": [], "initialState": None}
        ms = 0.0
        for f in feeds:
            encoded = {name: encode_tensor(v) for name, v in f.items()}
            ms += (await self._call("run", [key, encoded, opts], RUN_TIMEOUT, work=True))["ms"]
        return ms

    async def drop_state(self, state: str) -> bool:
        return await self._call("dropState", [state], HEALTH_TIMEOUT)

    async def unload_model(self, key: str) -> bool:
        dropped = await self._call("unload", [key], LOAD_MODEL_TIMEOUT)     # staged bytes too
        self.page_models.unloaded(key)
        if self.spares is not None:
            self.spares.tend(start=False)
        return dropped

    # ----- health -------------------------------------------------------------------------------
    async def health(self) -> dict[str, Any]:
        """Loaded models, states, PIDs and memory of this browser; raises BrowserFailure if it is gone.

        While a model load or run is under way the page answers only when it is done, so it is not
        probed (a short probe would read busy as hung and terminate the work): the report gives the
        page as last seen, with ``busy`` true. That work's own time budget catches a hang.
        """
        if self.work_in_flight:
            self._check()
            page = self._last_page_health or {"models": [], "backends": {}, "states": [], "jsHeapBytes": 0,
                                              "gpuDeviceLost": None}
        else:
            page = self._last_page_health = await self._call("health", [], HEALTH_TIMEOUT)
        pids = await self.process_ids()
        # In a thread: reading a process's smaps waits on its memory map's lock, up to ~1 s while the page
        # allocates a model, and this actor's loop must keep answering the pool's probes.
        memory = await asyncio.to_thread(self._memory.read, list(pids.values()),
                                         (tuple(sorted(page["models"])), tuple(sorted(page.get("staged", [])))),
                                         self.memory_limit_bytes)
        spare = self.spares.spare if self.spares is not None else None
        spare_memory = 0 if spare is None else await asyncio.to_thread(
            self._spare_memory.read, [spare.proc.pid, *chromium.descendants(spare.proc.pid)],
            (tuple(sorted(spare.models)), tuple(sorted(spare.staged))))
        if self.memory_limit_bytes and memory > self.memory_limit_bytes:
            self.signal.fail(FailureCategory.MEMORY, f"uses {memory >> 20} MiB, over its ceiling of "
                                               f"{self.memory_limit_bytes >> 20} MiB")
            self._check()
        if page["gpuDeviceLost"]:
            self.signal.fail(FailureCategory.DEVICE_LOST, f"WebGPU device lost: {page['gpuDeviceLost']}")
            self._check()
        return {
            **self.info(),
            "models": page["models"],
            "model_backends": page["backends"],
            "states": page["states"],
            "js_heap_bytes": page["jsHeapBytes"],
            "runs_started": page.get("runsStarted", 0),
            "gpu_device_lost": page["gpuDeviceLost"],
            "pids": pids,
            "memory_bytes": memory,
            "memory_limit_bytes": self.memory_limit_bytes,
            "busy": self.work_in_flight > 0,
            "spare_pid": None if spare is None else spare.proc.pid,
            "spare_models": [] if spare is None else sorted(spare.models),
            "spare_staged": [] if spare is None else sorted(spare.staged),
            "staged_models": page.get("staged", []),
            # A restart now would take a spare that holds what it should (actors/spare.py).
            "spare_ready": self.spares is not None and self.spares.ready(),
            "spare_expected": self.spares is not None and self.spares.expected(),
            "spare_memory_bytes": spare_memory,
            "blocked_requests": len(self.blocked_requests),
            "blocked_urls": self.blocked_requests[-BLOCKED_URLS_REPORTED:],
            "temp_dir": str(self.temp_dir),
        }

    async def process_ids(self) -> dict[str, int]:
        """PIDs of the browser, renderer(s) and GPU process, from CDP SystemInfo.getProcessInfo."""
        self._current_page()
        assert self.browser is not None and self.proc is not None
        try:
            # One browser-level session per connection, kept: opening and detaching one per health check
            # was two of its three CDP round trips.
            if self._system_cdp is None or self._system_cdp[0] is not self.browser:
                self._system_cdp = (self.browser, await self.browser.new_browser_cdp_session())
            info = await self._system_cdp[1].send("SystemInfo.getProcessInfo")
        except PlaywrightError as exc:
            self._system_cdp = None
            raise await self.signal.after_call_failed(exc) from None
        pids: dict[str, int] = {"browser": self.proc.pid}
        for i, proc in enumerate(info["processInfo"]):
            if proc["type"] != "browser":
                pids[f"{proc['type']}:{i}"] = int(proc["id"])
        return pids


async def _close_quietly(browser: Browser) -> None:
    """Disconnect from a browser being replaced (CDP-connected: the process is not touched)."""
    try:
        await asyncio.wait_for(browser.close(), 2.0)
    except (PlaywrightError, asyncio.TimeoutError):
        pass
