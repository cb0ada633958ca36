"""Finding and launching a Chromium-family browser that webpool drives over CDP.

We launch the browser ourselves (not ``playwright.launch``) so that it outlives a dropped CDP
connection: that is what makes *reconnect* a real recovery. Its life is still tied to the actor's
process: Linux sends it SIGKILL when the launching process dies (``PR_SET_PDEATHSIG``), so a killed
actor never leaves an orphan browser behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import glob
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.constants import BROWSER_TYPE_FALLBACK, DEVTOOLS_PORT_WAIT, MEMORY_READ_MAX_AGE_S

log = logging.getLogger(__name__)

# Candidate executables per browser type, in order of preference. Firefox is detected but cannot be
# driven: webpool needs CDP (connect_over_cdp, Runtime.terminateExecution), which Firefox lacks.
_CANDIDATES: dict[str, tuple[str, ...]] = {
    "chromium": ("chromium", "chromium-browser"),
    "chrome": ("google-chrome", "google-chrome-stable", "chrome"),
    "edge": ("microsoft-edge", "microsoft-edge-stable"),
}
SUPPORTED_TYPES = tuple(_CANDIDATES)


class BrowserNotFoundError(RuntimeError):
    """No usable browser executable of the requested type (or its fallbacks) is installed."""


@dataclass(frozen=True)
class BrowserExecutable:
    browser_type: str
    path: str


def _playwright_chromium() -> str | None:
    root = os.environ.get("PLAYWRIGHT_BROWSERS_PATH") or str(Path.home() / ".cache" / "ms-playwright")
    found = sorted(glob.glob(f"{root}/chromium-*/chrome-linux*/chrome"))
    return found[-1] if found else None


# Where a distribution keeps the browser binary behind its launcher script (Debian: /usr/lib/chromium/chromium).
LAUNCHER_LIB_ROOT = "/usr/lib"


def unwrapped(path: str) -> str:
    """The browser binary behind a distribution's launcher script, else ``path`` itself.

    Debian's ``/usr/bin/chromium`` is a shell script that sources /etc/chromium.d (API keys, desktop flags
    such as extensions and GPU rasterisation) and then execs ``/usr/lib/chromium/chromium``. A headless
    browser under automation needs none of it: launched directly it runs with exactly our flags, and its
    DevTools port opens ~35 ms sooner here (docs/facts.md), which every restart waits for. Only a script
    (``#!``) whose binary sits in ``LAUNCHER_LIB_ROOT/<name>/<name>`` is replaced; anything else is
    launched as found.
    """
    try:
        with open(path, "rb") as f:
            if f.read(2) != b"#!":
                return path
    except OSError:
        return path
    name = os.path.basename(path)
    binary = os.path.join(LAUNCHER_LIB_ROOT, name, name)
    try:
        with open(binary, "rb") as f:
            is_elf = f.read(4) == b"\x7fELF"
    except OSError:
        return path
    return binary if is_elf and os.access(binary, os.X_OK) else path


def find_executable(browser_type: str) -> BrowserExecutable | None:
    """The installed executable of ``browser_type``, or None. ``WEBPOOL_CHROMIUM`` overrides chromium (used
    as given); one found on PATH is the binary behind its distribution's launcher script (``unwrapped``)."""
    if browser_type not in _CANDIDATES:
        return None
    if browser_type == "chromium":
        override = os.environ.get("WEBPOOL_CHROMIUM")
        if override:
            return BrowserExecutable("chromium", override) if os.access(override, os.X_OK) else None
    for name in _CANDIDATES[browser_type]:
        path = shutil.which(name)
        if path:
            return BrowserExecutable(browser_type, unwrapped(path))
    if browser_type == "chromium":
        path = _playwright_chromium()
        if path:
            return BrowserExecutable("chromium", path)
    return None


def resolve_browser(preferred: str) -> BrowserExecutable:
    """The preferred browser type if installed, else the first installed one along the fallback order."""
    order = [preferred, *[t for t in BROWSER_TYPE_FALLBACK if t != preferred]]
    for browser_type in order:
        exe = find_executable(browser_type)
        if exe is not None:
            if browser_type != preferred:
                log.warning("browser type %s is not available; using %s (%s)", preferred, browser_type, exe.path)
            return exe
    raise BrowserNotFoundError(
        f"no browser found for {preferred!r} (tried {', '.join(order)}); install one with "
        "`apt-get install chromium` (as root) or `playwright install chromium`, or set WEBPOOL_CHROMIUM"
    )


def chromium_flags(user_data_dir: Path) -> list[str]:
    flags = [
        "--headless",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        f"--user-data-dir={user_data_dir}",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        "--disable-extensions",
        "--disable-dev-shm-usage",
        "--mute-audio",
        "--enable-unsafe-webgpu",
        "--enable-features=WebMachineLearningNeuralNetwork",
        # Chromium preloads its omnibox popups (WebUI pages of the browser's own UI) in a renderer of their own
        # even when headless: ~0.9 s of CPU and ~50 MiB per start here, for a UI nobody sees (docs/facts.md).
        "--disable-features=WebUIOmniboxPopup,WebUIOmniboxAimPopup",
    ]
    if os.geteuid() == 0:
        # Chromium refuses to start its sandbox as root; as a normal user the sandbox stays on.
        flags.append("--no-sandbox")
    return flags


class BrowserExitedError(RuntimeError):
    """The browser process exited before it opened its DevTools port (``returncode``: its exit status)."""

    def __init__(self, returncode: int, message: str) -> None:
        super().__init__(message)
        self.returncode = returncode


_PR_SET_PDEATHSIG = 1


def _child_setup(background: bool) -> Callable[[], None]:
    def setup() -> None:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if background:      # inherited by every process and thread the browser starts (actors/priority.py)
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))

    return setup


async def launch(exe: BrowserExecutable, user_data_dir: Path, url: str = "about:blank",
                 background: bool = False,
                 spawned: Callable[[subprocess.Popen], None] | None = None) -> tuple[subprocess.Popen, int, str]:
    """Start the browser with ``url`` open in its one tab (in the ``background``: see actors/priority.py);
    returns the process, its DevTools port and the browser's WebSocket path (``/devtools/browser/<id>``), both
    read from DevToolsActivePort. ``spawned`` is given the process as soon as it exists, before its port is
    open (a background start's bound may end meanwhile).

    Must be called from a thread that lives as long as the browser should (the actor's event loop
    thread): PR_SET_PDEATHSIG fires when the *thread* that forked the child exits.
    """
    port_file = user_data_dir / "DevToolsActivePort"
    proc = subprocess.Popen(
        [exe.path, *chromium_flags(user_data_dir), url],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # Chromium's own temp folder (its singleton socket's, org.chromium.Chromium.*) goes beside the profile,
        # into the folder its caller removes, never into the machine's /tmp whoever launches it.
        env={**os.environ, "TMPDIR": str(user_data_dir.parent)},
        preexec_fn=_child_setup(background),
    )
    if spawned is not None:
        spawned(proc)
    deadline = time.monotonic() + DEVTOOLS_PORT_WAIT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BrowserExitedError(proc.returncode, f"{exe.path} exited with code {proc.returncode} during start-up")
        try:
            port, path = port_file.read_text().splitlines()[:2]
            if path.startswith("/devtools/browser/"):
                return proc, int(port), path
        except (FileNotFoundError, ValueError):          # not there yet, or half written
            pass
        await asyncio.sleep(0.01)
    terminate(proc)
    raise TimeoutError(f"{exe.path} did not open its DevTools port within {DEVTOOLS_PORT_WAIT} s")


async def tab_committed(port: int, url_prefix: str, timeout: float) -> None:
    """Wait until the browser's tab has committed a URL under ``url_prefix`` (its DevTools target list shows
    it). Playwright's ``connect_over_cdp`` waits for a tab it finds mid-navigation, and could wait out its
    whole timeout on one whose navigation was under way as it attached (docs/facts.md)."""
    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as answer:
                targets = await answer.json(content_type=None)
            if any(t.get("type") == "page" and t.get("url", "").startswith(url_prefix) for t in targets):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the browser's tab did not open {url_prefix} within {timeout} s")
            await asyncio.sleep(0.01)


def descendants(pid: int) -> list[int]:
    """Live (not zombie) processes descended from ``pid``, from /proc (the browser's renderers, GPU
    process and zygote)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def resident_bytes(pids: list[int]) -> int:
    """Resident set size of these processes added up (``/proc/PID/statm``, ~20 us a process): pages shared
    between them are counted once per process, so this is never below ``memory_bytes`` of the same PIDs."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * page
        except (OSError, ValueError, IndexError):
            pass
    return total


def memory_bytes(pids: list[int]) -> int:
    """Proportional set size of these processes together: shared pages split between the processes that map
    them, so the browser's processes are not counted twice over."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next((int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:")), 0)
        except (OSError, ValueError, IndexError):
            pass
    return total


class MemoryReading:
    """A browser's ``memory_bytes``, read again only when it may have moved enough to matter.

    Reading PSS walks each process's page tables: ~25 ms of CPU for a browser holding MiniLM here, most of
    a health check's cost (docs/facts.md). The last reading is kept while the processes and the models they
    hold are the same, for at most ``max_age_s``; a ceiling breach is never missed in between, since the
    cheap ``resident_bytes`` bound is checked on every call and a bound above the ceiling reads PSS again.
    """

    def __init__(self, max_age_s: float = MEMORY_READ_MAX_AGE_S,
                 read_pss: Callable[[list[int]], int] = memory_bytes,
                 read_bound: Callable[[list[int]], int] = resident_bytes) -> None:
        self.max_age_s = max_age_s
        self._read_pss, self._read_bound = read_pss, read_bound
        self._key: tuple[Any, ...] | None = None
        self._at = 0.0
        self._bytes = 0

    def read(self, pids: list[int], holding: Any = None, ceiling: int | None = None,
             now: float | None = None) -> int:
        """PSS of ``pids`` (as ``memory_bytes``); ``holding``: what the processes hold (the page's models):
        a change reads again at once, as does a ``resident_bytes`` bound over ``ceiling``."""
        now = time.monotonic() if now is None else now
        key = (tuple(sorted(pids)), holding)
        fresh = key == self._key and now - self._at < self.max_age_s
        if fresh and (not ceiling or self._read_bound(pids) <= ceiling):
            return self._bytes
        self._key, self._at, self._bytes = key, now, self._read_pss(pids)
        return self._bytes


def terminate(proc: subprocess.Popen, grace: float = 2.0) -> None:
    """Stop the browser and every process it started: SIGTERM to the browser, SIGKILL after ``grace``
    seconds; then SIGKILL to those of its children still there, and wait (bounded) until they are gone."""
    # Looked up first: once the browser is gone its children are no longer its children.
    children = descendants(proc.pid) if proc.poll() is None else []
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace)
    # Children exit on their own once the browser is gone, but not at once: do not leave it to chance.
    deadline = time.monotonic() + grace
    while (left := [c for c in children if alive(c)]) and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs: not gone, and not exited (a zombie, or a leader whose other threads are
    still being torn down, which ``waitpid`` does not report yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
