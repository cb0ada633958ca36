"""CPU priority of a browser's processes: a standby being built yields the cores to the browsers answering now.

A standby (the failover's replacement, built after every failover) costs seconds of CPU: a launch, the
models' sessions, warm-up runs. Built beside busy serving browsers, it took about half of the pool's answers
for the ~6 s it took (docs/facts.md, "A standby rebuilt under load"). So it starts in the background: Linux's
``SCHED_IDLE`` policy, which runs a thread only on CPU time no other thread wants, and which every process and
thread Chromium starts inherits (a nice value does not do: Chromium sets its threads' nice values itself).
When a failover picks it (``Fleet.serving_soon``, while the log records the promotion; else its first request
that is not a hedge's copy), or at the latest ``STANDBY_BACKGROUND_S`` after its launch began (a launch in the
background beside normal work that keeps every core busy would never end), every thread of every one of its
processes gets the normal policy back: on cores that serving keeps fully busy the pool has a standby again
within that bound and the standby's own build time.

Restart spares (actors/spare.py) are not started in the background: they wait for their browser's quiet
instead, and a restart needs them soon (a chaos run with faults every few seconds found them not ready).
Where the normal policy could not be given back (an unprivileged user whose ``RLIMIT_NICE`` does not allow
nice 0), nothing is started in the background: a promoted standby must not serve below its peers.
"""

from __future__ import annotations

import logging
import os
import resource

from actors import chromium

log = logging.getLogger(__name__)


def can_restore() -> bool:
    """Whether this process may move a thread from ``SCHED_IDLE`` back to the normal policy: as root, or where
    ``RLIMIT_NICE`` allows nice 0 (the kernel's rule for that switch; the soft limit is 20 - the lowest nice)."""
    if os.geteuid() == 0:
        return True
    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    return soft == resource.RLIM_INFINITY or soft >= 20


def threads_of(pid: int) -> list[int]:
    """Every thread of ``pid`` and of its descendants (processes that end meanwhile are skipped)."""
    tids: list[int] = []
    for p in [pid, *chromium.descendants(pid)]:
        try:
            tids.extend(int(t) for t in os.listdir(f"/proc/{p}/task"))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return tids


def policies_of(pid: int) -> set[int]:
    """The scheduling policies of the threads of ``pid`` and its descendants (``os.SCHED_IDLE``: background)."""
    policies: set[int] = set()
    for tid in threads_of(pid):
        try:
            policies.add(os.sched_getscheduler(tid))
        except ProcessLookupError:
            continue
    return policies


def to_foreground(pid: int, browser_id: str) -> int:
    """Give every thread of a background browser (``pid`` and its descendants) the normal policy; returns how
    many threads it moved. Chromium's own nice values per thread are kept. A thread started meanwhile by one
    not yet moved inherits the background policy, so the threads are looked at again until none is left."""
    moved = 0
    for _ in range(5):
        idle = 0
        for tid in threads_of(pid):
            try:
                if os.sched_getscheduler(tid) != os.SCHED_IDLE:
                    continue
                idle += 1
                os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
                moved += 1
            except ProcessLookupError:
                continue
            except PermissionError as exc:    # can_restore() said yes: a limit changed under us; it serves as is
                log.warning("could not restore a browser's priority", extra={"browser_id": browser_id,
                                                                             "error": str(exc)})
                return moved
        if not idle:
            break
    log.info("browser given the normal priority", extra={"browser_id": browser_id, "threads": moved})
    return moved
