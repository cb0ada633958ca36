"""Process checks shared by the tests (imported as ``procs``: pytest puts this folder on sys.path)."""

from __future__ import annotations


def alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
