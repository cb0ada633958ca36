"""CPU priority of a browser's processes: work prepared for later yields the cores to work answering now.

A standby (the failover's replacement, built after every failover) and a spare process (a blank Chromium for
the next restart) cost seconds of CPU each: a launch, a model's session, warm-up runs. Built beside busy
serving browsers, a standby took about half of the pool's answers for the ~6 s it took (docs/facts.md, "A
standby rebuilt under load"). So they start in the background: Linux's ``SCHED_IDLE`` policy, which runs a
thread only on CPU time no other thread wants, and which every process and thread Chromium starts inherits
(a nice value does not do: Chromium sets its threads' nice values itself). A browser that takes traffic (a
standby promoted and sent its first request, a spare adopted by a serving browser) is given the normal
policy again, every thread of every one of its processes.

The price: on cores that serving keeps fully busy a standby is built only as the load leaves time; the
failover it is for is not needed until then unless a second browser fails. Where the normal policy could not
be given back (an unprivileged user whose ``RLIMIT_NICE`` does not allow nice 0), nothing is started in the
background: a promoted standby must not serve below its peers.
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
