"""A spare browser process: a Chromium started ahead of need, so a restart costs only the model loads.

A new process spends ~0.3 s launching, ~0.2 s opening the runtime page and ~0.7 s setting up
onnxruntime-web's WebAssembly before its first model session (docs/facts.md). A spare pays all of it in
the background, after its browser has served: when the browser fails, ``BrowserCore.restart`` takes the
spare (a few ms) instead of launching. The spare has its own profile folder and CDP relay, its page is
isolated like any other from the start, and no model has ever been in it: what an earlier page held
cannot reach it. It costs one more Chromium per browser (~300-400 MiB PSS here), so it is a pool option
(``spare_process``), on by default where a restart is the pool's recovery step.
"""

from __future__ import annotations

import asyncio
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
from actors.constants import PAGE_READY_WAIT


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
    ready_ms: float = 0.0
    crashed: bool = False

    def usable(self) -> bool:
        return (self.proc.poll() is None and not self.crashed and self.browser is not None
                and self.browser.is_connected() and self.page is not None and not self.page.is_closed())


async def runtime_tab(browser: Browser) -> Page:
    """The browser's one tab (a headless Chromium opens one with about:blank), or a new one."""
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
        answer = await asyncio.wait_for(spare.page.evaluate(
            "(o) => window.webpool.call('init', [o])", {"numThreads": num_threads, "warmRuntime": "wait"}),
            PAGE_READY_WAIT)
        if "error" in answer:
            raise RuntimeError(f"the spare's runtime did not start: {answer['error']}")
        spare.capabilities = answer["value"]
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
