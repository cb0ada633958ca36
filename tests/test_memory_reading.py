"""A browser's memory figure (actors/chromium.py): PSS read from the kernel, kept while it cannot have moved
much, and never a missed ceiling. Real processes: a child Python that touches memory when told to."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from actors.chromium import MemoryReading, memory_bytes, resident_bytes

MB = 1 << 20
# PSS splits a shared page between the processes mapping it: a process started elsewhere on the machine
# meanwhile (libpython's pages) lowers the grower's figure by some KiB, so growth is compared with this slack.
SHARED_SLACK = 1 * MB
GROWER = "import sys\nheld = []\nfor line in sys.stdin:\n    held.append(bytearray(b'x') * (int(line) << 20))\n" \
         "    print('held', flush=True)\n"


@pytest.fixture
def grower():
    """A process that touches N more MiB for each line N written to it."""
    proc = subprocess.Popen([sys.executable, "-c", GROWER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def grow(mb: int) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(f"{mb}\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "held\n"

    grow.pid = proc.pid
    yield grow
    proc.kill()
    proc.wait()


def test_the_resident_bound_is_never_below_pss(grower):
    grower(64)
    pids = [os.getpid(), grower.pid]
    assert memory_bytes(pids) >= 64 * MB
    assert resident_bytes(pids) >= memory_bytes(pids)
    assert resident_bytes([2**22 + 1]) == memory_bytes([2**22 + 1]) == 0      # no such process: nothing


def test_a_reading_is_kept_while_nothing_changed_and_read_again_when_it_may_have(grower):
    grower(16)
    reading = MemoryReading(max_age_s=5.0)
    first = reading.read([grower.pid], ("minilm",), now=100.0)
    assert first >= 16 * MB
    grower(128)
    # Same processes, same models, young: the figure is kept (the cost this saves is the point).
    assert reading.read([grower.pid], ("minilm",), now=104.0) == first
    # Older than max_age_s: read again.
    second = reading.read([grower.pid], ("minilm",), now=105.0)
    assert second >= first + 128 * MB - SHARED_SLACK
    grower(64)
    # A model loaded or unloaded (the page's models change): read again at once.
    assert reading.read([grower.pid], ("minilm", "smollm2"), now=105.5) >= second + 64 * MB - SHARED_SLACK
    # Another set of processes (a restart, a new renderer): read again at once.
    assert reading.read([grower.pid, os.getpid()], ("minilm", "smollm2"), now=105.6) > second + 64 * MB


def test_a_ceiling_breach_is_seen_on_the_next_read_however_young_the_figure(grower):
    grower(16)
    ceiling = resident_bytes([grower.pid]) + 64 * MB
    reading = MemoryReading(max_age_s=3600.0)
    below = reading.read([grower.pid], (), ceiling=ceiling, now=0.0)
    assert below < ceiling
    assert reading.read([grower.pid], (), ceiling=ceiling, now=1.0) == below     # under the bound: kept
    grower(128)
    assert reading.read([grower.pid], (), ceiling=ceiling, now=2.0) > ceiling
