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
    picked by PID from /proc, never by name; ``killed`` lists them.

    The scan is incremental: only a process not seen before has its parent read. Walking the whole of /proc
    every 2 ms (``descendants``) cost 1.6 ms a scan with 70 processes, half a core taken from the pool under
    test (more with another test's pool beside it); the incremental scan takes ~7 % of one."""

    def __init__(self, root: int, limit: int | None = None, sig: signal.Signals = signal.SIGKILL) -> None:
        self.root, self.limit, self.sig = root, limit, sig
        self.killed: list[int] = []
        self._existing = set(descendants(root))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> BrowserStartKiller:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        below = {self.root} | self._existing   # processes under root, root included
        outside: set[int] = set()              # never under root later: a parent changes only to init or a subreaper
        new: set[int] = set()                  # under root, started after us: watched, as a fork shows its parent's
        #                                        command line until it execs
        while not self._stop.wait(0.002):
            listed = {int(entry) for entry in os.listdir("/proc") if entry.isdigit()}
            # A PID that vanished may be given to a new process later (pid_max may be 32768): forget it now.
            below &= listed
            outside &= listed
            new &= listed
            parents = {pid: parent for pid in listed - below - outside if (parent := parent_of(pid)) is not None}
            for pid in parents:
                chain = [pid]      # up through processes also unseen, until one already placed (PIDs may wrap)
                while chain[-1] in parents and parents[chain[-1]] not in chain and chain[-1] not in below | outside:
                    chain.append(parents[chain[-1]])
                under = chain[-1] in below
                for unseen in (p for p in chain if p in parents and p not in below | outside):
                    (below if under else outside).add(unseen)
                    if under:
                        new.add(unseen)
            # Oldest first, and the limit checked at each kill: a launcher script that execs the browser (Debian's
            # /usr/bin/chromium, launched as such only where WEBPOOL_CHROMIUM names it) may show a forked subshell
            # with the same arguments for a moment, and one scan saw both (2 kills where 1 was asked).
            for pid in sorted(new - set(self.killed)):
                if self.limit is not None and len(self.killed) >= self.limit:
                    return
                if is_browser_main_process(pid):
                    try:
                        os.kill(pid, self.sig)
                        self.killed.append(pid)
                    except ProcessLookupError:
                        pass


def parent_of(pid: int) -> int | None:
    """``pid``'s parent PID, or None once it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return None if fields[0] == "Z" else int(fields[1])
