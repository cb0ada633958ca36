"""Tunables of webpool in one place (budgets, sizes, defaults). Values are seconds unless named _ms."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PAGE_DIR = Path(__file__).resolve().parent / "page"
ORT_WEB_DIST = REPO_ROOT / "node_modules" / "onnxruntime-web" / "dist"
# The only onnxruntime-web files the page needs (wasm + webgpu + webnn in one build).
ORT_WEB_FILES = ("ort.min.mjs", "ort-wasm-simd-threaded.jsep.mjs", "ort-wasm-simd-threaded.jsep.wasm")

# Browser start-up.
DEVTOOLS_PORT_WAIT = 15.0          # waiting for Chromium to write DevToolsActivePort
PAGE_READY_WAIT = 30.0             # page + runtime module loaded
BROWSER_CLOSE_WAIT = 5.0           # SIGTERM -> SIGKILL grace

# Per-call budgets inside a browser.
LOAD_MODEL_TIMEOUT = 180.0         # fetch + InferenceSession.create (SmolLM2 fp32 ~5 s; slow CI x10+)
RUN_TIMEOUT = 60.0                 # one run() of a loaded model
HEALTH_TIMEOUT = 5.0

# Recovery: every step and every browser start has a deadline, so no request can wait forever.
BROWSER_START_TIMEOUT = 90.0       # launch + connect + page (a loaded 2-core machine: ~1-10 s)
RECOVERY_STEP_TIMEOUT = 240.0      # one reconnect / restart / failover, model reloads included

# Pool.
DEFAULT_MAX_CONNECTIONS = 4
# Requests admitted at once (running or waiting for a browser); one more gets PoolBusyError at once.
# Below Ray's own limit on an async actor's concurrent calls (1000), so the bound is ours, not Ray's queue.
DEFAULT_MAX_QUEUED_REQUESTS = 256
DEFAULT_NUM_THREADS = 1            # wasm threads per page; 2-core machines gain nothing from more
BROWSER_TYPE_FALLBACK = ("chromium", "chrome", "edge")   # when a preferred type is not installed

# Input limits at the pool boundary.
MAX_TEXT_CHARS = 20_000
MAX_BATCH = 64
MAX_NEW_TOKENS = 512
