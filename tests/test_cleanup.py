"""Nothing is left behind: after ray.shutdown() (without pool.shutdown) no browser process and no
browser temp folder survives. Runs its own driver in a subprocess, since it must shut Ray down."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from procs import alive

DRIVER = textwrap.dedent("""
    import json, os, secrets, sys, tempfile
    os.environ["RAY_AUTH_MODE"] = "token"; os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(16)
    import ray
    from webpool import ResourcePool
    temp = tempfile.mkdtemp(prefix="wpclean-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp + "/ray", log_to_driver=False)
    pool = ResourcePool.remote(max_connections=2, event_log=temp + "/events")
    ray.get(pool.infer.remote("all-minilm-l6-v2", {"text": "hello"}))
    ray.get(pool.generate.remote("tiny-llama", "hi", max_new_tokens=2, shards=2))
    health = ray.get(pool.health.remote())
    ray.shutdown()                      # no pool.shutdown(): Ray kills every actor process
    print(json.dumps({"temp": temp, "reports": health}))
""")



def test_ray_shutdown_leaves_no_browser_process_or_temp_dir():
    done = subprocess.run([sys.executable, "-c", DRIVER], capture_output=True, text=True, timeout=300,
                          env=os.environ | {"RAY_worker_niceness": "0"})     # as the README advises
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    reports = out["reports"]
    assert len(reports) == 2
    pids = [p for r in reports.values() for p in r["pids"].values()]
    dirs = [r["temp_dir"] for r in reports.values()]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and ([p for p in pids if alive(p)] or [d for d in dirs if Path(d).exists()]):
        time.sleep(0.2)
    assert [p for p in pids if alive(p)] == []
    assert [d for d in dirs if Path(d).exists()] == []
    shutil.rmtree(out["temp"], ignore_errors=True)


def test_terminate_ends_what_the_browser_started():
    """What a browser forks (renderers, GPU process) goes with it, also when it ignores SIGTERM and its
    children would outlive it: a shell standing in for the browser's process tree (no browser needed)."""
    from actors import chromium

    proc = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 60 & sleep 60 & wait"])
    deadline = time.monotonic() + 10
    while len(chromium.descendants(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    children = chromium.descendants(proc.pid)
    assert len(children) == 2
    chromium.terminate(proc, grace=0.5)
    assert proc.poll() is not None
    assert [p for p in children if alive(p)] == []
