"""ResourcePool end to end on real Ray and real Chromium: results checked against CPU references."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import ray
from procs import alive, is_browser_main_process, parent_of
from waiting import until

from actors.chromium import descendants
from actors.constants import BROWSER_ACTOR_NAMESPACE, BROWSER_ACTOR_PREFIX
from actors.decisions.placement import SOFTWARE_ADAPTERS
from actors.decisions.threads import wasm_threads
from events.errors import InputError
from events.fold import replay
from events.schema import BrowserLaunched
from events.state import browsers_alive, open_operations
from events.store import EventStore
from sharding.models import llama, llama_onnx, minilm
from sharding.models.registry import ModelNotFoundError
from webpool import ResourcePool

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse."]



@pytest.fixture(scope="module")
def pool(ray_local, tmp_path_factory):
    handle = ResourcePool.options(name="webpool-test", lifetime="detached").remote(
        max_connections=2, event_log=str(tmp_path_factory.mktemp("pool-events")), name="webpool-test")
    yield handle
    health = ray.get(handle.health.remote())
    ray.get(handle.shutdown.remote())
    ray.kill(handle)
    # After shutdown: no browser process and no temp folder of any browser is left.
    for report in health.values():
        assert not [p for p in report["pids"].values() if alive(p)], report["pids"]
        assert not os.path.exists(report["temp_dir"])


def test_infer_single_and_batch_match_reference(pool):
    one = ray.get(pool.infer.remote("all-minilm-l6-v2", {"text": SENTENCES[0]}))
    assert one["embedding"].shape == (minilm.EMBED_DIM,)
    batch = ray.get(pool.infer.remote("all-minilm-l6-v2", {"texts": SENTENCES}))
    ref = minilm.reference_embed(SENTENCES)
    assert np.abs(batch["embedding"] - ref).max() <= 1e-4
    assert np.abs(one["embedding"] - ref[0]).max() <= 1e-4
    assert float(batch["embedding"][0] @ batch["embedding"][1]) == pytest.approx(0.7553, abs=0.002)
    # README (Limits): WASM unless the browser has a hardware WebGPU adapter; a software one (SwiftShader, as in a
    # headless container or CI) is far slower than WASM. The adapter is what the browser itself reported.
    adapter = ray.get(pool.health.remote())[batch["browser_id"]]["detail"].get("webgpu", {}).get("architecture", "")
    software = not adapter or any(name in adapter.lower() for name in SOFTWARE_ADAPTERS)
    assert batch["backend"] == ("wasm" if software else "webgpu"), adapter


def test_each_browser_computes_with_the_threads_chosen_for_this_machine_and_has_simd(pool):
    """With the default ``num_threads`` (None) each browser sizes its page's WebAssembly threads for its node's
    cores and the pool's browsers that may share them (actors/decisions/threads.py); the log records the
    count, and the page says it has SIMD and can run threads (it is cross-origin isolated)."""
    ray.get(pool.infer.remote("all-minilm-l6-v2", {"text": SENTENCES[0]}))
    health = ray.get(pool.health.remote())
    want = wasm_threads(len(os.sched_getaffinity(0)), 2)        # the fixture's two browsers, all on this node
    for b in browsers_alive(ray.get(pool.get_state.remote())):
        report = health[b.browser_id]
        assert report["detail"]["simd"] is True and report["detail"]["threads"] is True, report["detail"]
        assert b.wasm_threads == report["wasm_threads"] == want


def test_concurrent_requests_all_correct(pool):
    texts = [f"sentence number {i} about browsers" for i in range(12)]
    outs = ray.get([pool.infer.remote("all-minilm-l6-v2", {"text": t}) for t in texts])
    ref = minilm.reference_embed(texts)
    for out, r in zip(outs, ref, strict=True):
        assert np.abs(out["embedding"] - r).max() <= 1e-4


def test_webpools_local_ray_runs_the_pool_and_the_browser_actors_at_normal_priority(pool):
    """webpool's local Ray sets Ray's worker niceness to 0 (webpool/localray.py): at Ray's default, 15, the pool,
    each browser actor and its Playwright driver (every request passes through them) waited behind any busy
    normal process. Chromium sets its own threads' values (here, as root: -8 to 5), whatever it inherits."""
    ray.get(pool.infer.remote("all-minilm-l6-v2", {"text": SENTENCES[0]}))      # a browser is up
    shells = {"pool": ray.get(pool.pid.remote())}
    for browser_id, report in ray.get(pool.health.remote()).items():
        chromium = report["pids"]["browser"]
        actor = parent_of(chromium)
        shells[f"{browser_id} actor"] = actor
        shells |= {f"{browser_id} child {pid}": pid for pid in descendants(actor)
                   if pid != chromium and parent_of(pid) == actor}               # Playwright's Node driver
    assert len(shells) >= 3, shells
    assert {name: os.getpriority(os.PRIO_PROCESS, pid) for name, pid in shells.items()} == dict.fromkeys(shells, 0)


def test_webpools_local_ray_runs_no_log_monitor(ray_local):
    """webpool's local Ray stops Ray's log monitor (webpool/localray.py: it only forwards workers' output, which
    is off, and polls every worker's log file ten times a second); Ray's other processes run on."""
    session = ray._private.worker._global_node.get_session_dir_path()
    ours = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(session in a for a in args):
            ours.append(" ".join(args))
    assert any("raylet" in a for a in ours), ours          # the scan finds this session's processes
    assert not [a for a in ours if "log_monitor" in a]


def test_events_since_follows_the_log_by_long_poll(pool):
    """events_since(seq) waits for the first event after seq and returns what came, in order; followed from
    its last seq it yields every event once (an infer's start and end among them); nothing new: [] once its
    timeout is spent."""
    seq = ray.get(pool.get_state.remote()).last_seq
    waiting = pool.events_since.remote(seq, 60.0)              # sent before the infer: it waits for it
    out = ray.get(pool.infer.remote("all-minilm-l6-v2", {"text": "followed"}))
    seen = ray.get(waiting)
    while not any(e["action"] == "OperationCompleted" for e in seen):
        more = ray.get(pool.events_since.remote(seen[-1]["seq"], 60.0))
        assert more, "the infer's completion never came"
        seen += more
    assert [e["seq"] for e in seen] == list(range(seq + 1, seq + 1 + len(seen)))
    [started] = [e for e in seen if e["action"] == "OperationStarted"]
    assert started["data"]["browser_id"] == out["browser_id"]
    last = ray.get(pool.get_state.remote()).last_seq
    assert ray.get(pool.events_since.remote(last + 1_000_000, 0.1)) == []


def test_generate_tiny_llama_equals_cpu_onnxruntime(pool):
    model = llama.tiny_llama(seed=0)
    out = ray.get(pool.generate.remote("tiny-llama", "hello pool", max_new_tokens=16))
    expected = llama_onnx.ort_greedy_generate(llama_onnx.build_shards(model, [(0, model.config.n_layers)]),
                                         out["prompt_token_ids"], 16)
    assert out["token_ids"] == expected
    # The README's generate metrics: prefill time and decode speed, consistent with each other.
    m = out["metrics"]
    decoded = len(out["token_ids"]) - 1          # the first token comes from the prefill
    assert m["tokens"] == len(out["token_ids"]) and m["shards"] == 1 and m["recovery_ms"] == 0
    assert m["prefill_ms"] > 0 and m["decode_ms_per_token"] > 0
    assert m["decode_tokens_per_s"] == pytest.approx(1000 / m["decode_ms_per_token"]) and decoded >= 1


BAD_REQUESTS = [
    ("infer", ("no-such-model", {"text": "x"}), ModelNotFoundError, "model_name"),
    ("infer", (42, {"text": "x"}), ModelNotFoundError, "model_name"),
    ("infer", ("all-minilm-l6-v2", {"txt": "x"}), InputError, "inputs"),
    ("infer", ("all-minilm-l6-v2", {"text": 3}), InputError, "inputs.text"),
    ("infer", ("all-minilm-l6-v2", {"text": ""}), InputError, "inputs.text"),
    ("infer", ("all-minilm-l6-v2", {"text": "x" * 20_001}), InputError, "inputs.text"),
    ("infer", ("all-minilm-l6-v2", {"texts": []}), InputError, "inputs.texts"),
    ("infer", ("all-minilm-l6-v2", "not a dict"), InputError, "inputs"),
    ("infer", ("tiny-llama", {"text": "x"}), InputError, "model_name"),
    ("generate", ("all-minilm-l6-v2", "x"), InputError, "model_name"),
    ("generate", ("tiny-llama", ""), InputError, "prompt"),
    ("generate", ("tiny-llama", "hi", 0), InputError, "max_new_tokens"),
    ("generate", ("tiny-llama", "hi", 4, 0), InputError, "shards"),
    ("generate", ("tiny-llama", "hi " * 400, 8), InputError, "prompt"),   # longer than the context
]


@pytest.mark.parametrize(("method", "args", "error", "field"), BAD_REQUESTS)
def test_bad_input_gets_typed_error_and_pool_keeps_serving(pool, method, args, error, field):
    with pytest.raises(error) as info:
        ray.get(getattr(pool, method).remote(*args))
    assert info.value.field == field
    out = ray.get(pool.infer.remote("all-minilm-l6-v2", {"text": SENTENCES[0]}))
    assert np.abs(out["embedding"] - minilm.reference_embed(SENTENCES[:1])[0]).max() <= 1e-4


def test_javascript_looking_input_is_plain_data(pool):
    text = '"); process.exit(1); //'
    out = ray.get(pool.infer.remote("all-minilm-l6-v2", {"text": text}))
    assert np.abs(out["embedding"] - minilm.reference_embed([text])[0]).max() <= 1e-4


def test_every_operation_ends_and_state_is_the_log_projection(pool):
    """The pool's state equals both folds of its log's records up to the state's seq, read back from
    the StateLog (the pool keeps running: later tests use it)."""
    state = ray.get(pool.get_state.remote())
    assert open_operations(state) == []
    ops = state.metrics
    assert ops.get("operations_started", 0) == ops.get("operations_completed", 0) + ops.get("operations_failed", 0)
    assert 1 <= len(browsers_alive(state)) <= 2
    state_log = ray.get_actor("webpool-test-log", namespace=ray.get_runtime_context().namespace)
    records = ray.get(state_log.read.remote(1, state.last_seq))
    assert [r.seq for r in records] == list(range(1, state.last_seq + 1))
    assert replay(records) == state


def test_detached_pool_is_found_by_another_driver(pool, ray_local):
    address = ray.get_runtime_context().gcs_address
    script = textwrap.dedent(f"""
        import ray, numpy as np
        ray.init(address="{address}", namespace="webpool-tests", log_to_driver=False)
        pool = ray.get_actor("webpool-test")
        out = ray.get(pool.infer.remote("all-minilm-l6-v2", {{"text": "from another driver"}}))
        print("DIM", out["embedding"].shape[0])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=os.environ.copy())
    assert "DIM 384" in done.stdout, done.stderr[-2000:]


def test_a_checkpoint_reaches_the_pools_state_without_waiting_for_another_event(ray_local, tmp_path):
    """The log appends a SnapshotWritten of its own at each checkpoint (level high); the pool takes it at
    once. (It used to wait for it as for a lost acknowledgement: a 5 s stall at the next record, and
    a pool with nothing else to record never saw it.) No browser is needed: a pool restarted over a
    log retires the browsers the log lists, and that is the one event here."""
    root = tmp_path / "events"
    with EventStore.open(root) as store:
        store.append([BrowserLaunched("b-old", "chromium", ("wasm",), 1, "node", False)])
    pool = ResourcePool.remote(event_log=str(root), fault_tolerance={
        "level": "high", "checkpoint_interval": 0.2, "standby_browsers": 0})
    try:
        deadline = time.monotonic() + 60
        while (state := ray.get(pool.get_state.remote())).metrics.get("snapshots", 0) < 1:
            assert time.monotonic() < deadline, "no checkpoint reached the pool's state"
            time.sleep(0.05)
        assert state.browsers["b-old"].status == "retired" and state.metrics["last_snapshot_seq"] >= 2
    finally:
        ray.get(pool.shutdown.remote())
        ray.kill(pool)


def _browser_actors(pool) -> list[str]:
    """The names of the browser actors named after ``pool`` (actors/fleet.py names them)."""
    prefix = f"{BROWSER_ACTOR_PREFIX}{pool._actor_id.hex()}:"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == BROWSER_ACTOR_NAMESPACE and a["name"].startswith(prefix))


def test_a_new_pool_prepares_its_first_browser_actor_and_its_first_launch_takes_it(ray_local, tmp_path):
    """A new pool creates and starts its first browser when it is created, so that actor's Ray worker process
    and its Chromium start while the pool opens its log; the first launch takes that browser, not another."""
    pool = ResourcePool.remote(max_connections=1, event_log=str(tmp_path / "events"), spare_process=False)
    ray.get(pool.__ray_ready__.remote())
    prepared = until(lambda: _browser_actors(pool), "the pool to prepare a browser actor")
    assert len(prepared) == 1
    out = ray.get(pool.infer.remote("all-minilm-l6-v2", {"text": SENTENCES[0]}))
    assert np.abs(out["embedding"] - minilm.reference_embed(SENTENCES[:1])[0]).max() <= 1e-4
    prefix = f"{BROWSER_ACTOR_PREFIX}{pool._actor_id.hex()}:"
    assert out["browser_id"] == prepared[0][len(prefix):].rsplit(":", 1)[0]
    assert _browser_actors(pool) == prepared, "the first launch made another actor"
    ray.get(pool.shutdown.remote())
    ray.kill(pool)


def _browser_processes() -> set[int]:
    """Every browser main process below this test process (its Ray runs the pools' browser actors)."""
    return {p for p in descendants(os.getpid()) if is_browser_main_process(p)}


def test_a_prepared_browser_ends_with_its_pool(ray_local, tmp_path):
    """Unused, it is ended by the pool's shutdown; and it ends itself when the pool dies without one (it is
    detached, so nothing else would end it). Its Chromium, started already, goes with it."""
    before = _browser_processes()
    shut = ResourcePool.remote(max_connections=1, event_log=str(tmp_path / "shut"), spare_process=False)
    killed = ResourcePool.remote(max_connections=1, event_log=str(tmp_path / "killed"), spare_process=False)
    for pool in (shut, killed):
        ray.get(pool.__ray_ready__.remote())
        until(lambda pool=pool: _browser_actors(pool), "the pool to prepare a browser actor")
    started = until(lambda: len(_browser_processes() - before) >= 2 and _browser_processes() - before,
                    "the prepared browsers to start Chromium")
    ray.get(shut.shutdown.remote())
    until(lambda: not _browser_actors(shut), "shutdown to end the prepared browser actor")
    ray.kill(shut)
    ray.kill(killed)
    until(lambda: not _browser_actors(killed), "the prepared browser actor to end with its pool")
    until(lambda: not any(alive(p) for p in started), f"their Chromium to end with the pool: {started}")
