"""Process checks shared by the tests (imported as ``procs``: pytest puts this folder on sys.path)."""

from __future__ import annotations

import os
import signal
import threading

from actors.chromium import descendants


def alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def is_browser_main_process(pid: int) -> bool:
    """A browser's main process (the one webpool launches with a DevTools port), not a renderer/zygote."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return False
    return any(a.startswith(b"--remote-debugging-port=") for a in args) and not any(
        a.startswith(b"--type=") for a in args)


class BrowserStartKiller:
    """SIGKILLs (or sends ``sig``: SIGSTOP freezes it) every browser main process that appears below ``root``
    (this test process: its Ray and every browser the pool starts) after it was created, as soon as it is seen
    (polled every ~2 ms, well inside a start-up), up to ``limit`` kills (None: until stopped). Victims are
    picked by PID from /proc, never by name; ``killed`` lists them."""

    def __init__(self, root: int, limit: int | None = None, sig: signal.Signals = signal.SIGKILL) -> None:
        self.root, self.limit, self.sig = root, limit, sig
        self.killed: list[int] = []
        self._before = {p for p in descendants(root) if is_browser_main_process(p)}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> BrowserStartKiller:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            # Oldest first, and the limit checked at each kill: the launcher (/usr/bin/chromium is a shell
            # script that execs the browser) may show a forked subshell with the same arguments for a moment,
            # and one scan saw both (2 kills where 1 was asked).
            for pid in sorted(set(descendants(self.root)) - self._before - set(self.killed)):
                if self.limit is not None and len(self.killed) >= self.limit:
                    return
                if is_browser_main_process(pid):
                    try:
                        os.kill(pid, self.sig)
                        self.killed.append(pid)
                    except ProcessLookupError:
                        pass
