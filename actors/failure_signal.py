"""How a browser's failure is known: from signals, never from how long one waited (actors/browser.py's
guarantees).

``FailureSignal`` holds a browser's failure: the first signal decides its category and every later call
sees the same one until a recovery step clears it. The signals are the browser process's exit (a pidfd the
kernel makes readable: ``watch_process``), the page's crash event (``watch_page``), a lost CDP connection
told apart by whether the browser's own DevTools port still answers (``watch_connection``), a spent time
budget, a memory ceiling or a lost WebGPU device; ``runtime_error`` reads the runtime's typed answers.

A signal counts only for the browser's current process, connection and page: one that a restart or
reconnect replaced may report its end late, and that says nothing of the one serving now.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
from collections.abc import Callable
from typing import Any, Protocol

from playwright.async_api import Browser, Page
from playwright.async_api import Error as PlaywrightError

from actors.constants import DEVTOOLS_PROBE_WAIT, FAILURE_SIGNAL_WAIT
from events.errors import BrowserFailure, FailureCategory, InputError, describe

log = logging.getLogger(__name__)


class FailureSignal:
    """One browser's failure: None while it is fine, else (category, detail) of the first signal."""

    def __init__(self, browser_id: str, reporter: Any = None) -> None:
        self.browser_id = browser_id
        # The pool actor (its ``browser_failed``): told the moment a signal comes, so the pool recovers
        # before a request or a health check would have met the dead browser. None in-process.
        self.reporter = reporter
        self.failure: tuple[FailureCategory, str] | None = None
        self._came = asyncio.Event()
        self.checks: set[asyncio.Future] = set()     # lost connections being classified (held: not collected)

    def fail(self, category: FailureCategory, detail: str, exited_pid: int | None = None) -> None:
        """Record a failure signal; the first one wins and is reported once. ``exited_pid``: the browser process
        whose exit this is (the pool then knows without asking whether the failure is still this browser's)."""
        if self.failure is not None:
            return
        self.failure = (category, detail)
        self._came.set()
        log.warning("browser failed", extra={"browser_id": self.browser_id, "category": category.value,
                                             "detail": detail})
        if self.reporter is not None:
            self.reporter.browser_failed.remote(self.browser_id, category.value, detail, exited_pid)

    def clear(self) -> None:
        """A recovery step revived the browser: the next failure is a new one."""
        self.failure = None
        self._came.clear()

    def raise_if_failed(self) -> None:
        if self.failure is not None:
            raise BrowserFailure(self.browser_id, *self.failure)

    async def wait(self, timeout: float) -> bool:
        """True once a failure signal has come, False if none came within ``timeout``."""
        try:
            await asyncio.wait_for(self._came.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def after_call_failed(self, exc: PlaywrightError) -> BrowserFailure:
        """The failure behind a call Playwright could not finish (the target or the connection went).

        The signal that says which (crash event, process exit, lost connection) is on its way, within
        milliseconds: wait for it. ``FAILURE_SIGNAL_WAIT`` only guards against one never coming.
        """
        if not await self.wait(FAILURE_SIGNAL_WAIT):
            return BrowserFailure(self.browser_id, FailureCategory.UNKNOWN,
                                  f"a page call failed and no failure signal came: {describe(exc, limit=200)}")
        assert self.failure is not None
        return BrowserFailure(self.browser_id, *self.failure)


class SignalledBrowser(Protocol):
    """What the signal handlers read of a browser (actors/browser.py's BrowserCore): its current process,
    connection and page, its DevTools port, and whether a step of its own is closing them."""
    signal: FailureSignal
    proc: subprocess.Popen | None
    browser: Browser | None
    page: Page | None
    port: int
    closing: bool


def watch_process(core: SignalledBrowser, proc: subprocess.Popen) -> None:
    """The exit of ``proc`` is a CRASH of ``core``, while it is ``core``'s process and ``core`` is not closing it."""
    def exited() -> None:
        if proc is core.proc and not core.closing:
            core.signal.fail(FailureCategory.CRASH, f"browser process exited ({proc.poll()})", proc.pid)

    _when_exited(proc, exited)


def watch_page(core: SignalledBrowser, page: Page) -> None:
    """A crash of ``page`` is a CRASH of ``core`` while it is ``core``'s page."""
    def crashed(_: Page) -> None:
        if page is core.page:
            core.signal.fail(FailureCategory.CRASH, "page crashed")

    page.on("crash", crashed)


def watch_connection(core: SignalledBrowser, browser: Browser) -> None:
    """The loss of ``browser``'s CDP connection, while it is ``core``'s and ``core`` is not closing it: a
    CONNECTION failure if the browser still answers on its own DevTools port, else the browser is going
    down and its exit (CRASH) is the signal to wait for."""
    def disconnected(_: Browser) -> None:
        if core.closing or core.signal.failure is not None or browser is not core.browser:
            return
        check = asyncio.ensure_future(_classify_disconnect(core, core.proc, browser))
        core.signal.checks.add(check)
        check.add_done_callback(core.signal.checks.discard)

    browser.on("disconnected", disconnected)


async def _classify_disconnect(core: SignalledBrowser, proc: subprocess.Popen | None, browser: Browser) -> None:
    if browser is not core.browser:      # a restart or reconnect replaced the connection meanwhile
        return
    if proc is None or proc.poll() is not None:
        code = None if proc is None else proc.returncode
        core.signal.fail(FailureCategory.CRASH, f"browser process exited ({code})", None if proc is None else proc.pid)
        return
    if await devtools_answers(core.port):
        if proc is core.proc:
            core.signal.fail(FailureCategory.CONNECTION, "CDP connection to the browser was lost (the browser lives)")
        return
    if not await core.signal.wait(FAILURE_SIGNAL_WAIT) and browser is core.browser:
        core.signal.fail(FailureCategory.CONNECTION, "CDP connection lost; the browser's DevTools port refuses")


def _when_exited(proc: subprocess.Popen, on_exit: Callable[[], None]) -> None:
    """Call ``on_exit`` (in the running loop) when the kernel says ``proc`` exited: its pidfd becomes readable."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):      # no pidfd (Linux < 5.3): the lost connection still tells
        return
    loop = asyncio.get_running_loop()

    def exited() -> None:
        loop.remove_reader(fd)
        os.close(fd)
        on_exit()

    loop.add_reader(fd, exited)


async def devtools_answers(port: int) -> bool:
    """True if a browser's own DevTools port answers an HTTP request (it is alive and serving)."""
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), DEVTOOLS_PROBE_WAIT)
        writer.write(b"GET /json/version HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status = await asyncio.wait_for(reader.readline(), DEVTOOLS_PROBE_WAIT)
        return status.startswith(b"HTTP/1.1 200")
    except (OSError, asyncio.TimeoutError):
        return False
    finally:
        if writer is not None:
            writer.close()


def runtime_error(browser_id: str, error: dict[str, str]) -> Exception:
    """The exception for a typed error the runtime answered a call with.

    RequestError -> InputError (the request was bad; the browser is fine); DeviceLostError ->
    DEVICE_LOST; DeadlineExceeded -> TIMEOUT; a failed allocation -> MEMORY; anything else is the browser's
    fault (UNKNOWN), never blamed on the request by default.
    """
    name, message = str(error.get("name", "Error")), str(error.get("message", ""))
    if name == "RequestError":
        return InputError("inputs", message)
    if name == "DeviceLostError":
        return BrowserFailure(browser_id, FailureCategory.DEVICE_LOST, message)
    if name == "DeadlineExceeded":          # the page reached the call only after its budget ran out
        return BrowserFailure(browser_id, FailureCategory.TIMEOUT, message)
    if (name == "RangeError" and "alloc" in message.lower()) or "out of memory" in message.lower():
        return BrowserFailure(browser_id, FailureCategory.MEMORY, f"{name}: {message}")
    return BrowserFailure(browser_id, FailureCategory.UNKNOWN, f"the runtime failed: {name}: {message[:300]}")
