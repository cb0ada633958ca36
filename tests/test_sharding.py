"""Layer-sharded SmolLM2 across real browsers: identical tokens to the CPU reference, also when a
shard's browser dies mid-generation (its cache is rebuilt by replaying the session's prefix)."""

from __future__ import annotations

import time

import pytest
import ray

from events.state import open_operations
from sharding.models import llama
from sharding.plan import even_layer_ranges
from webpool import ResourcePool

PROMPT = "The capital of France is"
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def smollm2():
    return llama.load_smollm2()


@pytest.fixture(scope="module")
def expected(smollm2):
    ids = smollm2.encode(PROMPT)
    return llama.ort_greedy_generate(llama.build_shards(smollm2, [(0, smollm2.config.n_layers)]), ids, NEW_TOKENS)


@pytest.fixture(scope="module")
def pool(ray_local, tmp_path_factory):
    handle = ResourcePool.remote(max_connections=3, event_log=str(tmp_path_factory.mktemp("shard-events")),
                                 request_timeout=30.0,
                                 fault_tolerance={"level": "medium", "recovery_strategy": "progressive"})
    yield handle
    ray.get(handle.shutdown.remote())
    ray.kill(handle)


@pytest.mark.slow
@pytest.mark.parametrize("shards", [1, 2, 3])
def test_sharded_greedy_equals_unsharded_cpu_reference(pool, expected, shards):
    out = ray.get(pool.generate.remote("smollm2-135m", PROMPT, max_new_tokens=NEW_TOKENS, shards=shards))
    assert out["token_ids"] == expected
    assert len(set(out["browser_ids"])) == shards        # one browser per shard
    assert out["metrics"]["replays"] == 0


def _wait_for_tokens(pool, n: int, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = ray.get(pool.get_state.remote())
        live = [s for s in state.sessions.values() if len(s.tokens) >= n]
        if live:
            return live[0].session_id
        time.sleep(0.01)
    raise AssertionError(f"no session reached {n} tokens")


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill_browser", "crash_page"])
def test_shard_failure_mid_generation_changes_no_token(pool, expected, fault):
    ref = pool.generate.remote("smollm2-135m", PROMPT, max_new_tokens=NEW_TOKENS, shards=3)
    session_id = _wait_for_tokens(pool, 6)
    state = ray.get(pool.get_state.remote())
    victim = state.sessions[session_id].plan["shards"][1]["browser_id"]     # the middle shard
    ray.get(pool.inject_fault.remote(victim, fault))
    out = ray.get(ref, timeout=300)
    assert out["token_ids"] == expected, "a shard failure must not change the output"
    assert out["metrics"]["replays"] >= 1
    events = ray.get(pool.recent_events.remote(2000))
    kinds = [(e["action"], e["subject"]) for e in events]
    assert ("BrowserFailed", victim) in kinds
    replays = [e for e in events if e["action"] == "OperationStarted" and e["data"]["kind"] == "replay"]
    assert replays, "the prefix replay is recorded as an operation"
    assert any(e["action"] == "RecoveryCompleted" and e["data"]["success"] for e in events)
    assert open_operations(ray.get(pool.get_state.remote())) == []


def test_even_layer_ranges_cover_the_model():
    assert even_layer_ranges(30, 3) == [(0, 10), (10, 20), (20, 30)]
    assert even_layer_ranges(4, 3) == [(0, 2), (2, 3), (3, 4)]
