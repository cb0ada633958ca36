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


CONCURRENT_PROMPTS = ["The capital of France is", "Water boils at a temperature of", "Once upon a time, a small robot"]
CONCURRENT_TOKENS = 12


@pytest.mark.slow
def test_concurrent_sessions_on_the_same_shards_keep_their_own_kv_cache(ray_local, smollm2, tmp_path):
    """Three different prompts at once over the same two shard browsers: each session keeps its own KV cache
    in each page, so each output is token-identical to its own CPU reference."""
    whole = llama.build_shards(smollm2, [(0, smollm2.config.n_layers)])
    expected = {p: llama.ort_greedy_generate(whole, smollm2.encode(p), CONCURRENT_TOKENS) for p in CONCURRENT_PROMPTS}
    pool = ResourcePool.remote(max_connections=2, event_log=str(tmp_path / "events"), request_timeout=60.0)
    try:
        warm = ray.get(pool.generate.remote("smollm2-135m", "Hi", max_new_tokens=1, shards=2))   # load both shards
        refs = {p: pool.generate.remote("smollm2-135m", p, max_new_tokens=CONCURRENT_TOKENS, shards=2)
                for p in CONCURRENT_PROMPTS}
        outs = {p: ray.get(ref, timeout=300) for p, ref in refs.items()}
        for prompt, out in outs.items():
            assert out["token_ids"] == expected[prompt], prompt
            assert sorted(out["browser_ids"]) == sorted(warm["browser_ids"])     # the same two browsers
        assert len({out["session_id"] for out in outs.values()}) == 3
        # The sessions really overlapped: every one had opened before any of them closed.
        events = ray.get(pool.recent_events.remote(5000))
        sessions = {out["session_id"] for out in outs.values()}
        seq = {(e["action"], e["data"]["session_id"]): e["seq"] for e in events
               if e["action"] in ("SessionOpened", "SessionClosed") and e["data"]["session_id"] in sessions}
        assert max(seq[("SessionOpened", s)] for s in sessions) < min(seq[("SessionClosed", s)] for s in sessions)
    finally:
        ray.get(pool.shutdown.remote())
        ray.kill(pool)
