"""Tunables of webpool in one place (budgets, sizes, defaults). Values are seconds unless named _ms."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PAGE_DIR = Path(__file__).resolve().parent / "page"
ORT_WEB_DIST = REPO_ROOT / "node_modules" / "onnxruntime-web" / "dist"
# The onnxruntime-web files the page loads: the lean build (wasm backend only) and the full one (wasm + WebGPU
# + WebNN), which a page imports only where the browser offers WebGPU or WebNN (actors/page/runtime.js).
ORT_WEB_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm",
                 "ort.min.mjs", "ort-wasm-simd-threaded.jsep.mjs", "ort-wasm-simd-threaded.jsep.wasm")

# Browser start-up.
DEVTOOLS_PORT_WAIT = 15.0          # waiting for Chromium to write DevToolsActivePort
PAGE_READY_WAIT = 30.0             # page + runtime module loaded
BROWSER_CLOSE_WAIT = 5.0           # SIGTERM -> SIGKILL grace

# Per-call budgets inside a browser.
LOAD_MODEL_TIMEOUT = 180.0         # fetch + InferenceSession.create (SmolLM2 fp32 ~5 s; slow CI x10+)
RUN_TIMEOUT = 60.0                 # one run() of a loaded model
HEALTH_TIMEOUT = 5.0
# A browser's PSS (memory use, split fairly between processes) is read again after this long, or at once when
# its processes or models change or a cheap upper bound passes its ceiling (actors/chromium.py MemoryReading).
MEMORY_READ_MAX_AGE_S = 5.0
HANG_ARM_WAIT = 2.0                # fault injection: a busy page queues the hang behind its work, answering later

# Failure signals. Guards only: the signals themselves arrive in milliseconds (a pidfd ~40 ms after a
# SIGKILL, a renderer's crash event ~100 ms; docs/facts.md "Faults, as the browser reports them").
FAILURE_SIGNAL_WAIT = 5.0          # a call Playwright could not finish waits this long for the signal that explains it
DEVTOOLS_PROBE_WAIT = 1.0          # a lost connection: does the browser still answer on its own DevTools port?

# Recovery: every step and every browser start has a deadline, so no request can wait forever.
BROWSER_START_TIMEOUT = 90.0       # launch + connect + page (a loaded 2-core machine: ~1-10 s)
RECOVERY_STEP_TIMEOUT = 240.0      # one reconnect / restart / failover, model reloads included
# Resume (a hang ended by terminating the page's script): the page must answer and every model's run queue
# settle within this; a run cut off mid-way never settles, and the next step replaces the page.
RESUME_SETTLE_WAIT = 1.0
RESUME_TIMEOUT = HEALTH_TIMEOUT + RESUME_SETTLE_WAIT + 1.0

# Pool.
DEFAULT_MAX_CONNECTIONS = 4
RECORD_GAP_WAIT = 5.0              # a gap in acknowledged seqs this old is read back from the log (a lost reply)
HEALTH_INTERVAL = 2.0              # between passes of the reconcile loop's health checks (levels >= medium)
HEALTH_RECORD_CHANGE = 0.10        # a health report is logged when its models change or its memory by this much
# Probes (levels >= low): every live browser's actor is pinged this often, busy or not (a ping touches no
# page). One unanswered past its deadline (while other browsers answer) means its process or node is gone:
# Ray itself takes ~13 s to declare a vanished node dead at its default settings, and calls there wait that
# long. The deadline is PROBE_DEADLINE_FACTOR x the slowest recent answer, within [PROBE_DEADLINE,
# PROBE_DEADLINE_MAX]: a ping answers in a few ms on a quiet machine and took up to ~0.9 s while three pages
# created SmolLM2 sessions on two cores (docs/facts.md "Probes").
PROBE_INTERVAL = 0.25
PROBE_DEADLINE = 1.0
PROBE_DEADLINE_FACTOR = 4.0
PROBE_DEADLINE_MAX = 10.0
PROBE_RTT_WINDOW = 64              # answers the deadline looks back on (~4 s with four browsers)
# A node whose browser answered no probe gets no new browser for this long (or until Ray lists it dead):
# an actor placed on a vanished node waits for its start until BROWSER_START_TIMEOUT.
SUSPECT_NODE_S = 60.0
SCALE_DOWN_IDLE_S = 30.0           # adaptive_scaling: a serving browser idle this long is retired (one stays)
STOP_BROWSER_WAIT = 10.0           # a browser's own close() before its actor is killed anyway
ADOPT_PING_WAIT = 5.0              # a restarted pool's ping to a browser it finds: an answer in time adopts it
BROWSER_ACTOR_PREFIX = "webpool-browser:"   # + pool actor id + ":" + browser id + ":" + a nonce: the actor's name
# The Ray namespace a pool's (detached, named) browser actors live in, whatever the driver's: a detached actor
# in a driver's anonymous namespace draws a warning from Ray, and the pool's actor id keeps names apart.
BROWSER_ACTOR_NAMESPACE = "webpool-browsers"
STATE_LOG_OPEN_WAIT = 30.0         # a restarted pool waits this long for its dead StateLog's name to free up
# Requests admitted at once (running or waiting for a browser); one more gets PoolBusyError at once.
# Below Ray's own limit on an async actor's concurrent calls (1000), so the bound is ours, not Ray's queue.
DEFAULT_MAX_QUEUED_REQUESTS = 256
# ...and rows (texts) admitted at once: 64-text requests weigh 64 times a single sentence.
DEFAULT_MAX_QUEUED_ROWS = 4096
ANSWER_RATE_WINDOW_S = 5.0         # a refused client's retry hint: rows ahead at this window's rate while busy
# Dynamic batching of embedding requests (actors/batching.py): rows per page run, and how long a free
# browser waits for a batch to fill. A request arriving at an idle pool waits at most this long.
DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_BATCH_WAIT_MS = 2.0
# A spare process (actors/spare.py) also holds its browser's models if they take at most this many bytes in
# all: MiniLM (86 MiB) does, SmolLM2 (~540 MiB) does not (a second session of it takes ~2.3 GiB, docs/facts.md).
SPARE_MODEL_BYTES_MAX = 256 << 20
# Bigger models, up to this many bytes in all, are staged in the spare instead: their bytes fetched into its
# page without a session (1x their bytes, not ~4x), so a restart skips their fetch (1.4 s for SmolLM2 here).
SPARE_STAGED_BYTES_MAX = 1 << 30
STAGED_CLAIM_S = 60.0              # staged bytes a restarted browser's reloads did not use by then are dropped
SPARE_BLANK_BYTES = 400 << 20      # a spare's Chromium with the runtime set up, no model (PSS, docs/facts.md)
SPARE_MEMORY_RESERVE_BYTES = 2 << 30   # no spare is started if it would leave less memory free than this
SPARE_IDLE_S = 0.5                 # a spare is started once its browser's page has had no work this long...
SPARE_START_WITHIN_S = 10.0        # ...or this long after it was wanted, whichever comes first
SPARE_FAILURES_MAX = 3             # spares that failed to start or load before a browser stops keeping one
WASM_THREADS_MAX = 4               # wasm threads per page, at most (actors/decisions/threads.py)
BROWSER_TYPE_FALLBACK = ("chromium", "chrome", "edge")   # when a preferred type is not installed

# Fault tolerance defaults (the guide's ``fault_tolerance`` options; see actors/decisions/recovery.py).
DEFAULT_CHECKPOINT_INTERVAL = 60.0   # log snapshots (level high and up): bounds the replay a restart needs
DEFAULT_MAX_RECOVERY_ATTEMPTS = 3    # per request, and consecutive failures before a browser's circuit opens
DEFAULT_STANDBY_BROWSERS = 1         # warm spares at level high and up: failover without a cold start
STANDBY_DEFER_S = 2.0                # a missing spare is started once no request is in flight, or after this
# A standby is built in the background (actors/priority.py: on CPU time serving leaves) until it serves, or for
# at most this long from its launch's start: under a load that leaves no time, the pool has a standby again
# within ~this + its build.
STANDBY_BACKGROUND_S = 10.0
# A standby's warm-up runs (actors/decisions/warmup.py): V8 optimises a page's WebAssembly only after it has
# done some work: on the lean wasm build, MiniLM's 8-sentence rounds settle after the second (~0.5 s of page
# time) and runs after 3 rounds are within ~10 % of runs after 20 (docs/facts.md). Warm-up stops when this much
# page time is spent and the last two rounds are within the ratio of the fastest, or at the round / time caps.
WARMUP_MIN_WORK_MS = 1000.0
WARMUP_SETTLE_RATIO = 1.25
WARMUP_MAX_ROUNDS = 40
WARMUP_MAX_S = 30.0
# Hedged requests (level high; actors/decisions/hedging.py): a request still unanswered after the p95 of its
# model's per-row page time x its rows + the transport is also sent to an idle browser holding the model.
# Floor: below it a hedge chases noise; cap: the delay with too little history, and the most it waits.
HEDGE_MIN_MS = 50.0
HEDGE_MAX_MS = 2000.0
HEDGE_TRANSPORT_MS = 30.0            # a request through Ray and CDP costs ~20-30 ms beyond its page time here
HEDGE_MIN_SAMPLES = 5                # per-row service times before the p95 is trusted
# The budget, a token bucket: each request adds HEDGE_BUDGET_RATIO of a token (5 % of requests, over time),
# and each second HEDGE_BUDGET_PER_S (one hedge every 5 s however light the traffic: a rare fault on a quiet
# pool is hedged too, at a cost nobody notices); a hedge spends one; it holds at most HEDGE_BUDGET_BURST.
HEDGE_BUDGET_RATIO = 0.05
HEDGE_BUDGET_PER_S = 0.2
HEDGE_BUDGET_BURST = 3.0
DEFAULT_VOTE_K = 3                   # browsers per request at level critical (a majority of 3 survives one liar)
DEFAULT_VOTE_COSINE = 0.999          # embeddings agree at this cosine (fp32 runs of one model differ ~1e-6)
DEFAULT_BACKOFF_S = 0.05             # before retry n of a request: DEFAULT_BACKOFF_S * 2**(n-1)

# Placement and adaptive decisions (actors/decisions/).
# A browser holding the model takes a request while fewer than this many run on it; beyond that the
# pool prefers to grow (up to max_connections), since one page runs one inference at a time.
BUSY_THRESHOLD = 2
MIN_SAMPLES = 8                    # completed operations before a browser's speed is judged
# Drained when its median is this many times its peers'. Two browsers sharing two busy cores were seen
# up to ~3x apart while one of them was starting: the bar sits above that.
DEGRADED_FACTOR = 4.0

# Browser health reports and faults.
BLOCKED_URLS_REPORTED = 10         # the latest blocked URLs a health report carries
EXFILTRATE_COUNT_WAIT = 10.0       # the exfiltrate fault waits this long for its three attempts to be counted

# Input limits at the pool boundary.
MAX_TEXT_CHARS = 20_000
MAX_BATCH = 64
MAX_NEW_TOKENS = 512
