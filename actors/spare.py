"""A spare browser process: a Chromium started ahead of need, so a restart costs only the model loads.

A new process spends ~0.3 s launching, ~0.2 s opening the runtime page and ~0.7 s setting up
onnxruntime-web's WebAssembly before its first model session (docs/facts.md). A spare pays all of it in
the background, after its browser has served: when the browser fails, ``BrowserCore.restart`` takes the
spare (a few ms) instead of launching. The spare has its own profile folder and CDP relay, its page is
isolated like any other from the start, and no model has ever been in it: what an earlier page held
cannot reach it. It costs one more Chromium per browser (~300-400 MiB PSS here), so it is a pool option
(``spare_process``), on by default where a restart is the pool's recovery step, and none is started when
it would leave less than ``SPARE_MEMORY_RESERVE_BYTES`` of the machine's memory free.

A spare also holds the browser's own models when they are small (``SPARE_MODEL_BYTES_MAX`` in all): the
same content-addressed bytes, verified by the browser before its own page loaded them, loaded into the
spare's page in the background. The pool's reloads after a restart then find them there (the page's
``load`` answers at once for a key it holds) and the restart costs tens of milliseconds. Bigger models
(up to ``SPARE_STAGED_BYTES_MAX``; a second session would cost ~4x their bytes) are staged instead: their
bytes fetched into the spare's page without a session, so a reload after a restart skips the fetch and the
hash, and pays only the session's creation. Never anything else: no generation state (a session's shards
rebuild theirs by replay), no model of another browser.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from playwright.async_api import Browser, CDPSession, Page, Playwright
from playwright.async_api import Error as PlaywrightError

from actors import chromium
from actors.cdp_relay import CdpRelay
from actors.constants import (
    LOAD_MODEL_TIMEOUT,
    PAGE_READY_WAIT,
    SPARE_BLANK_BYTES,
    SPARE_FAILURES_MAX,
    SPARE_IDLE_S,
    SPARE_MEMORY_RESERVE_BYTES,
    SPARE_MODEL_BYTES_MAX,
    SPARE_STAGED_BYTES_MAX,
    SPARE_START_WITHIN_S,
)
from actors.page_models import HeldModel
from events.errors import describe

log = logging.getLogger(__name__)


@dataclass
class SpareProcess:
    """A Chromium process, connected through its own relay, its page open and isolated, the runtime's
    WebAssembly instantiated (``capabilities`` as the page's ``init`` answered); no model has been in it."""

    proc: subprocess.Popen
    port: int
    ws_path: str
    relay: CdpRelay
    profile: Path
    browser: Browser | None = None
    page: Page | None = None
    page_cdp: CDPSession | None = None
    capabilities: dict[str, Any] = field(default_factory=dict)
    blocked: list[str] = field(default_factory=list)     # URLs its page was refused (isolation)
    models: set[str] = field(default_factory=set)        # model keys loaded into its page
    staged: set[str] = field(default_factory=set)        # model keys whose bytes its page holds, no session
    ready_ms: float = 0.0
    crashed: bool = False

    def usable(self) -> bool:
        # alive() too: waitpid does not report a leader whose other threads are still exiting (its stat says Z)
        return (self.proc.poll() is None and chromium.alive(self.proc.pid) and not self.crashed
                and self.browser is not None and self.browser.is_connected() and self.page is not None
                and not self.page.is_closed())


async def runtime_tab(browser: Browser) -> Page:
    """The browser's one tab (the one it was launched with: the runtime page, or about:blank), or a new one."""
    context = browser.contexts[0]
    return context.pages[0] if context.pages else await context.new_page()


async def start_spare(exe: chromium.BrowserExecutable, pw: Playwright, profile: Path, num_threads: int,
                      isolate: Callable[[Page, list[str]], Awaitable[CDPSession]],
                      load_runtime: Callable[[Page], Awaitable[None]]) -> SpareProcess:
    """Launch, connect, isolate and open the runtime page the way the browser's own process is (``isolate``
    and ``load_runtime`` are BrowserCore's), then set the runtime up and wait for it. On any failure the
    process is stopped and its folder removed before the error propagates."""
    t0 = time.perf_counter()
    proc, port, ws_path = await chromium.launch(exe, profile)
    spare = SpareProcess(proc, port, ws_path, CdpRelay(), profile)
    try:
        await spare.relay.start(port)
        spare.browser = await pw.chromium.connect_over_cdp(f"ws://127.0.0.1:{spare.relay.port}{ws_path}")
        spare.page = await runtime_tab(spare.browser)
        spare.page.on("crash", lambda _page: setattr(spare, "crashed", True))
        spare.page_cdp = await isolate(spare.page, spare.blocked)
        await load_runtime(spare.page)
        spare.capabilities = await _page_call(spare.page, "init", [{"numThreads": num_threads, "warmRuntime": "wait"}],
                                              PAGE_READY_WAIT)
    except BaseException:
        await discard(spare)
        raise
    spare.ready_ms = (time.perf_counter() - t0) * 1000
    return spare


async def discard(spare: SpareProcess) -> None:
    """Stop a spare process and remove its profile folder."""
    if spare.browser is not None:
        try:
            await asyncio.wait_for(spare.browser.close(), 2.0)     # CDP-connected: only disconnects
        except (PlaywrightError, asyncio.TimeoutError):
            pass
    await asyncio.to_thread(chromium.terminate, spare.proc, 0.5)
    await spare.relay.close()
    await asyncio.to_thread(shutil.rmtree, spare.profile, True)


def spare_fits(available_bytes: int, model_bytes: int, staged_bytes: int = 0) -> bool:
    """Whether the machine has room for a spare holding sessions of ``model_bytes`` of models and
    ``staged_bytes`` of staged ones and still keeps ``SPARE_MEMORY_RESERVE_BYTES`` free (a session takes about
    twice its model's bytes in a page; staged bytes take themselves)."""
    need = SPARE_BLANK_BYTES + 2 * model_bytes + staged_bytes
    return available_bytes - need >= SPARE_MEMORY_RESERVE_BYTES


def spare_holdings(held: dict[str, HeldModel]) -> tuple[dict[str, HeldModel], dict[str, HeldModel]]:
    """What a spare holds of its browser's models ``held``: (as sessions, staged). Sessions of all of them
    if they take at most ``SPARE_MODEL_BYTES_MAX`` in all; else their bytes staged, if at most
    ``SPARE_STAGED_BYTES_MAX``; else nothing."""
    total = sum(m.data.nbytes for m in held.values())
    if total <= SPARE_MODEL_BYTES_MAX:
        return held, {}
    if total <= SPARE_STAGED_BYTES_MAX:
        return {}, held
    return {}, {}


def memory_available() -> int:
    """The kernel's estimate of memory available for new work (``MemAvailable``); 0 if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class SpareKeeper:
    """Keeps one spare process ready for a browser (``core``: its BrowserCore) and hands it over.

    ``tend`` (after each run, load or unload of the browser) starts a background task that prepares a spare
    if there is none (after a run only) and brings its models in line with the browser's small ones;
    ``take`` hands the spare over (None if there is none). A spare that fails is dropped, never the browser.
    """

    def __init__(self, core: Any) -> None:
        self.core = core
        self.spare: SpareProcess | None = None
        self._task: asyncio.Future | None = None
        self._started = 0
        self.failures = 0                 # spares that failed; after SPARE_FAILURES_MAX the keeper gives up
        self.asked = False                # tend(start=True) has been called: the browser has served a run

    def tend(self, start: bool = True) -> None:
        """Bring the spare in line in the background; ``start``: also start one if there is none (after a
        run, not after a load). A new spare waits until the browser's page has had no work for
        ``SPARE_IDLE_S`` (at most ``SPARE_START_WITHIN_S``): on a few cores, preparing one (~2-3 s of CPU)
        slows the requests it would run beside, and a pool that only ever serves a few requests needs none."""
        self.asked |= start
        if (self.spare is None and not start) or self.failures >= SPARE_FAILURES_MAX:
            return
        if not self.core.closing and self.core.proc is not None and (self._task is None or self._task.done()):
            self._task = asyncio.ensure_future(self._tend())

    def ready(self) -> bool:
        """A spare is there, alive, and holds every model it should."""
        sessions, staged = self.wanted()
        return (self.spare is not None and self.spare.usable() and self.spare.models >= set(sessions)
                and self.spare.staged >= set(staged))

    def expected(self) -> bool:
        """A spare is being kept: the browser has served a run (a standby that only warmed up has none until
        it serves) and the keeper has not given up. One may still be on its way (``ready`` says when)."""
        return self.asked and self.failures < SPARE_FAILURES_MAX

    def take(self) -> SpareProcess | None:
        spare, self.spare = self.spare, None
        return spare

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        spare, self.spare = self.spare, None
        if spare is not None:
            await discard(spare)

    def wanted(self) -> tuple[dict[str, HeldModel], dict[str, HeldModel]]:
        """The browser's models the spare should hold: (as sessions, staged), by ``spare_holdings``."""
        return spare_holdings(self.core.page_models.held)

    async def _tend(self) -> None:
        core = self.core
        if self.spare is not None and not self.spare.usable():     # died while waiting: replace it
            dead, self.spare = self.spare, None
            await discard(dead)
        if self.spare is None:
            await self._until_idle()
            if core.closing or core.proc is None:
                return
            sessions, staged = self.wanted()
            available = memory_available()
            if not spare_fits(available, sum(m.data.nbytes for m in sessions.values()),
                              sum(m.data.nbytes for m in staged.values())):
                log.info("no spare browser process: too little memory free",
                         extra={"browser_id": core.browser_id, "available_mib": available >> 20})
                return          # asked again after the next run
            self._started += 1
            try:
                spare = await start_spare(core.exe, core.pw, core.temp_dir / f"spare-{self._started}",
                                          core.num_threads, core._isolate, core._load_runtime)
            except Exception as exc:      # a spare that did not come up is no failure of the browser
                self.failures += 1
                log.warning("spare browser process did not start",
                            extra={"browser_id": core.browser_id, "error": describe(exc, limit=300),
                                   "failures": self.failures})
                return
            if core.closing or self.spare is not None:
                await discard(spare)
                return
            self.spare = spare
            log.info("spare browser process ready",
                     extra={"browser_id": core.browser_id, "pid": spare.proc.pid, "ms": round(spare.ready_ms)})
        spare = self.spare
        # Re-read each time round: the browser may load or unload meanwhile; stop once the spare is taken.
        while spare is self.spare and spare.usable():
            sessions, staged = self.wanted()
            missing = [k for k in sessions if k not in spare.models and sessions[k].backend in
                       spare.capabilities.get("backends", [])]
            unstaged = [k for k in staged if k not in spare.staged]
            extra = [k for k in spare.models | spare.staged if k not in sessions and k not in staged]
            if not missing and not unstaged and not extra:
                return
            try:
                if missing:
                    await self._load(spare, missing[0], sessions[missing[0]])
                elif unstaged:
                    await self._stage(spare, unstaged[0], staged[unstaged[0]])
                else:       # the page's unload also drops staged bytes
                    await _page_call(spare.page, "unload", [extra[0]], LOAD_MODEL_TIMEOUT)
                    spare.models.discard(extra[0])
                    spare.staged.discard(extra[0])
            except Exception as exc:
                self.failures += 1
                log.warning("spare browser process dropped",
                            extra={"browser_id": core.browser_id, "error": describe(exc, limit=300),
                                   "failures": self.failures})
                if spare is self.spare:
                    self.spare = None
                    await discard(spare)
                return

    async def _until_idle(self) -> None:
        """Until the browser's page has done no work (loads, runs) for ``SPARE_IDLE_S``, or at most
        ``SPARE_START_WITHIN_S``."""
        core = self.core
        give_up = time.monotonic() + SPARE_START_WITHIN_S
        while (now := time.monotonic()) < give_up:
            quiet = now - core.work_ended_at
            if not core.work_in_flight and quiet >= SPARE_IDLE_S:
                return
            await asyncio.sleep(SPARE_IDLE_S - quiet if not core.work_in_flight else SPARE_IDLE_S)

    async def _load(self, spare: SpareProcess, key: str, model: HeldModel) -> None:
        url = self.core.server.put_blob(key, model.data)
        try:
            await _page_call(spare.page, "load", [key, url, model.backend], LOAD_MODEL_TIMEOUT)
        finally:
            self.core.server.drop_blob(url)
        spare.models.add(key)
        spare.staged.discard(key)      # a staged model's load used its bytes (runtime.js `load`)

    async def _stage(self, spare: SpareProcess, key: str, model: HeldModel) -> None:
        url = self.core.server.put_blob(key, model.data)
        try:
            await _page_call(spare.page, "stage", [key, url], LOAD_MODEL_TIMEOUT)
        finally:
            self.core.server.drop_blob(url)
        spare.staged.add(key)


async def _page_call(page: Page | None, name: str, args: list[Any], timeout: float) -> Any:
    """Call the runtime's ``name`` in a spare's page; an error answer raises RuntimeError."""
    assert page is not None
    answer = await asyncio.wait_for(
        page.evaluate("([n, a]) => window.webpool.call(n, a)", [name, args]), timeout)
    if "error" in answer:
        raise RuntimeError(f"{name}: {answer['error'].get('message', answer['error'])}")
    return answer["value"]
