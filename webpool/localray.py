"""Starting an embedded local Ray for webpool's own entry points (demo, benchmarks, tests).

Ray 2.60 turns on token authentication for local clusters and would write ``~/.ray/auth_token``;
webpool's entry points use token auth with a throwaway token of their own instead. Ray reads
``RAY_AUTH_MODE`` / ``RAY_AUTH_TOKEN`` when it is first imported, so ``configure_auth_env`` must run
before anything imports ray: entry points call it first thing.

Ray starts its worker processes at nice 15 (its ``worker_niceness`` setting): the pool, the state log,
every browser actor and the Playwright driver (Node) it starts, which every request passes through.
(Chromium sets its own threads' values where it may, as root, whatever it inherits.) Below every normal
process on the machine, they waited behind any busy one: beside two busy loops on a 2-core machine a test
that starts about ten browsers took 250 s, against 35 s with Ray's workers at nice 0 (docs/facts.md, "Ray's
worker niceness"). webpool's own entry points start Ray with its workers at normal priority; a driver that
starts Ray itself can do the same (``RAY_worker_niceness=0`` in the environment of ``ray start`` or of the
driver whose ``ray.init()`` starts Ray, or ``ray.init(_system_config=RAY_SYSTEM_CONFIG)``).

Ray's log monitor is stopped once Ray is up. Its one job is to forward workers' output to drivers, which
these entry points turn off (``log_to_driver=False``), and it polls every worker's log file ten times a
second, dead workers' included: ~27 CPU-s over a test session's Ray (docs/facts.md, "Ray's log monitor").
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from typing import Any

RAY_SYSTEM_CONFIG: dict[str, Any] = {"worker_niceness": 0}


def configure_auth_env() -> None:
    if "ray" in sys.modules and "RAY_AUTH_TOKEN" not in os.environ:
        raise RuntimeError("configure_auth_env() must run before ray is imported")
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))


def start_local_ray(temp_dir: Path, **options: Any):
    """ray.init() of a local instance whose files all live under ``temp_dir`` (short path: socket limits), its
    workers at normal priority (``RAY_SYSTEM_CONFIG``), without the log monitor (workers' output stays in
    their log files under ``temp_dir``)."""
    configure_auth_env()
    import ray

    options["_system_config"] = {**RAY_SYSTEM_CONFIG, **options.get("_system_config", {})}
    ray.init(include_dashboard=False, _temp_dir=str(temp_dir), log_to_driver=False, **options)
    # No public switch: ray.init() always starts it (ray start has --include-log-monitor); Ray's own tests stop
    # it this way.
    ray._private.worker._global_node.kill_log_monitor()
    return ray
