"""A browser actor's temp folder: made private to the actor, and removed once the actor's process is gone,
however it died.

Started by the actor as a small daemon (double fork, own session): Ray kills a worker's children
when the worker exits, and ``ray.shutdown()`` SIGKILLs workers without running any handler, so
only a process that is no longer the worker's child can clean up after it. It waits on a pidfd
for the actor to exit, gives the browser (killed by PR_SET_PDEATHSIG at that moment) a moment to
let go of its files, then deletes the folder. A clean ``close`` removes the folder first; the
reaper then finds nothing to do.

The daemon boots a bare Python (``-S``: no site-packages) that imports only what ``main`` needs: ~40 ms on
each browser start instead of ~100 ms (docs/facts.md); the actor's side imports the rest where it is used.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import sys
import tempfile
import time
from pathlib import Path

FOLDER_PREFIX = "webpool-browser-"      # + the owning actor's PID: a sweep tells whose folder it is
_FOLDER_RE = re.compile(rf"^{FOLDER_PREFIX}(\d+)-")


def new_folder() -> Path:
    """A new folder (0700) for everything this process's browser writes; ``watch`` it next. Until then a
    crash leaves it to ``sweep_stale_folders`` (its name carries this process's PID)."""
    folder = Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-"))
    os.chmod(folder, 0o700)
    return folder


async def watch(folder: Path) -> None:
    """Start the reaper daemon for ``folder`` (this process's); returns once it is detached. Asynchronous:
    the browser's start-up goes on beside it."""
    import asyncio
    import subprocess

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-S", "-m", "actors.reaper", str(os.getpid()), str(folder),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, cwd=str(Path(__file__).resolve().parent.parent))
    if await asyncio.wait_for(proc.wait(), 30) != 0:
        raise RuntimeError(f"the reaper of {folder} did not start (exit code {proc.returncode})")


def sweep_stale_folders(root: Path | None = None) -> list[Path]:
    """Remove the folders of browser actors whose process is gone (e.g. a reaper that was killed too)."""
    root = Path(root or tempfile.gettempdir())
    removed = []
    for path in root.glob(f"{FOLDER_PREFIX}*"):
        match = _FOLDER_RE.match(path.name)
        if match and not _pid_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_for_exit(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        select.select([fd], [], [])
    finally:
        os.close(fd)


def main(argv: list[str]) -> int:
    pid, folder = int(argv[0]), Path(argv[1])
    if os.fork() != 0:           # the first process returns at once; the daemon lives on
        return 0
    wait_for_exit(pid)
    for _ in range(50):                    # the browser may still be writing for a few ms
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            return 0
        time.sleep(0.1)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
