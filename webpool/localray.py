"""Starting an embedded local Ray for webpool's own entry points (demo, benchmarks, tests).

Ray 2.60 turns on token authentication for local clusters and would write ``~/.ray/auth_token``;
webpool's entry points use token auth with a throwaway token of their own instead. Ray reads
``RAY_AUTH_MODE`` / ``RAY_AUTH_TOKEN`` when it is first imported, so ``configure_auth_env`` must run
before anything imports ray: entry points call it first thing.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from typing import Any


def configure_auth_env() -> None:
    if "ray" in sys.modules and "RAY_AUTH_TOKEN" not in os.environ:
        raise RuntimeError("configure_auth_env() must run before ray is imported")
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))


def start_local_ray(temp_dir: Path, **options: Any):
    """ray.init() of a local instance whose files all live under ``temp_dir`` (short path: socket limits)."""
    configure_auth_env()
    import ray

    ray.init(include_dashboard=False, _temp_dir=str(temp_dir), log_to_driver=False, **options)
    return ray
