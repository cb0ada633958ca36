"""Layer partition planner: byte estimates against real built ONNX files, budgets, and properties.

Pure logic (no Ray, no browser). The byte estimates are checked against files that
``sharding.models.llama`` really builds (tiny llama always; SmolLM2 in the slow test).
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sharding.models import llama as L
from sharding.models import llama_onnx as LO
from sharding.plan import (
    DEFAULT_MEMORY_MODEL,
    GIB,
    GRAPH_BYTES_PER_LAYER,
    GRAPH_BYTES_PER_SHARD,
    MEASURED_IDLE_PAGE_BYTES,
    MEASURED_MODEL_FILE_BYTES,
    MEASURED_SESSION_PEAK_BYTES,
    MEASURED_SESSION_STEADY_BYTES,
    BrowserBudget,
    MemoryModel,
    PlanError,
    PlanInputError,
    ShardPlan,
    activation_bytes,
    apportion,
    even_layer_ranges,
    kv_cache_bytes,
    layer_weight_bytes,
    plan_layers,
    shard_file_bytes,
    shard_memory_bytes,
)

# SmolLM2-135M as converted from its GGUF (docs/facts.md, "Models available offline"); the slow test
# checks it against the real file.
SMOL = L.LlamaConfig(n_layers=30, hidden=576, n_heads=9, n_kv_heads=3, head_dim=64, ffn=1536, vocab=49152,
                     rope_base=100000.0, rms_eps=9.999999747378752e-6, bos_id=1, eos_id=2, max_context=8192)
FILE_TOL = 0.02


def budgets(*gib: float, throughput: tuple[float, ...] | None = None) -> list[BrowserBudget]:
    speeds = throughput or (1.0,) * len(gib)
    return [BrowserBudget(f"b{i}", int(g * GIB), s) for i, (g, s) in enumerate(zip(gib, speeds, strict=True))]


def check_plan(plan: ShardPlan, config: L.LlamaConfig, browsers: list[BrowserBudget], **workload) -> None:
    """The invariants every plan must hold."""
    ranges = plan.ranges
    assert ranges[0][0] == 0 and ranges[-1][1] == config.n_layers
    assert all(a < b for a, b in ranges)
    assert all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1))
    LO.check_chain_ranges(ranges, config.n_layers)  # the builder's own check accepts them
    by_id = {b.browser_id: b for b in browsers}
    assert len(set(plan.browser_ids)) == len(plan.browser_ids)
    for s in plan.shards:
        b = by_id[s.browser_id]
        assert s.budget_bytes == b.memory_limit_bytes
        assert s.memory_bytes <= b.memory_limit_bytes
        assert s.memory_bytes == shard_memory_bytes(config, s.layer_start, s.layer_end, **workload)
        assert s.file_bytes == shard_file_bytes(config, s.layer_start, s.layer_end)


# ----- bytes -------------------------------------------------------------------------------------


def test_layer_bytes_count_every_weight_of_the_model():
    model = L.tiny_llama()
    c = model.config
    per_layer = sum(model.weights[f"l0.{k}"].nbytes for k in
                    ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w_gate", "w_up", "w_down"))
    assert layer_weight_bytes(c) == per_layer
    assert kv_cache_bytes(c, 3, 100) == 3 * 2 * c.n_kv_heads * 100 * c.head_dim * 4


@pytest.mark.parametrize("ranges", [[(0, 4)], [(0, 1), (1, 3), (3, 4)], [(0, 2), (2, 4)]])
def test_file_bytes_match_built_tiny_shards(ranges):
    model = L.tiny_llama()
    for (a, b), art in zip(ranges, LO.build_shards(model, ranges), strict=True):
        real = art.path.stat().st_size
        est = shard_file_bytes(model.config, a, b)
        assert abs(est - real) <= FILE_TOL * real, (a, b, est, real)


@pytest.mark.slow
@pytest.mark.parametrize("ranges", [[(0, 30)], [(0, 10), (10, 20), (20, 30)]])
def test_file_bytes_match_built_smollm2_shards(ranges):
    model = L.load_smollm2()
    assert model.config == SMOL
    assert "head" not in model.weights  # tied: the last shard carries its own copy of the embedding
    for (a, b), art in zip(ranges, LO.build_shards(model, ranges), strict=True):
        real = art.path.stat().st_size
        est = shard_file_bytes(model.config, a, b)
        assert abs(est - real) <= FILE_TOL * real, (a, b, est, real)


def test_tied_head_is_stored_by_a_non_first_last_shard_only():
    table = SMOL.vocab * SMOL.hidden * 4
    whole, first, mid, last = (shard_file_bytes(SMOL, a, b) for a, b in [(0, 30), (0, 10), (10, 20), (20, 30)])
    assert first - mid == table
    assert last - mid == table + SMOL.hidden * 4
    shared = shard_file_bytes(SMOL, 10, 11) - layer_weight_bytes(SMOL) - GRAPH_BYTES_PER_LAYER  # RoPE tables...
    assert shared == 2 * SMOL.max_context * SMOL.head_dim * 4 + GRAPH_BYTES_PER_SHARD
    assert whole == first + mid + last - table - 2 * shared  # one shard: the embedding once, every layer once
    assert shard_file_bytes(SMOL, 0, 30, tied_head=False) - whole == table  # an untied head is its own matrix
    assert shard_file_bytes(SMOL, 20, 30, tied_head=False) == last


def test_memory_model_reproduces_the_facts_it_was_derived_from():
    m = DEFAULT_MEMORY_MODEL
    assert 3.9 < m.weight_peak_factor < 4.1 and 2.7 < m.weight_steady_factor < 2.9
    # One fp32 SmolLM2 session at a short context: the creation peak measured (docs/facts.md, "Memory").
    need = shard_memory_bytes(SMOL, 0, 30, context_tokens=16)
    assert abs(need - MEASURED_SESSION_PEAK_BYTES) <= 0.01 * MEASURED_SESSION_PEAK_BYTES
    assert shard_file_bytes(SMOL, 0, 30) == pytest.approx(MEASURED_MODEL_FILE_BYTES, rel=1e-4)
    steady = MEASURED_IDLE_PAGE_BYTES + m.weight_steady_factor * shard_file_bytes(SMOL, 0, 30)
    assert steady == pytest.approx(MEASURED_SESSION_STEADY_BYTES, rel=1e-3)


def test_long_contexts_cost_kv_and_attention_memory():
    short = shard_memory_bytes(SMOL, 10, 20, context_tokens=16)
    kv = shard_memory_bytes(SMOL, 10, 20, context_tokens=4096, forward_tokens=1)
    replay = shard_memory_bytes(SMOL, 10, 20, context_tokens=4096)
    assert short < kv < replay
    assert replay - kv >= activation_bytes(SMOL, 4096, 4096) - activation_bytes(SMOL, 1, 4096) - 1
    two = shard_memory_bytes(SMOL, 10, 20, context_tokens=4096, forward_tokens=1, sessions=2)
    assert two - kv == pytest.approx(DEFAULT_MEMORY_MODEL.kv_copies * kv_cache_bytes(SMOL, 10, 4096), abs=2)


# ----- partition -----------------------------------------------------------------------------------


def test_even_layer_ranges_still_work():
    assert even_layer_ranges(30, 3) == [(0, 10), (10, 20), (20, 30)]
    assert even_layer_ranges(10, 3) == [(0, 4), (4, 7), (7, 10)]
    with pytest.raises(ValueError):
        even_layer_ranges(3, 4)


def test_apportion_is_proportional_within_caps():
    assert apportion(30, [1, 1, 1], [30, 30, 30]) == [10, 10, 10]
    assert apportion(30, [2, 1], [30, 30]) == [20, 10]
    assert apportion(30, [10, 1, 1], [12, 30, 30]) == [12, 9, 9]
    assert apportion(3, [100, 1, 1], [9, 9, 9]) == [1, 1, 1]
    with pytest.raises(PlanInputError):
        apportion(10, [1, 1], [4, 5])


def test_big_equal_browsers_split_smollm2_evenly_and_fewest_shards_by_default():
    browsers = budgets(64, 64, 64)
    plan = plan_layers(SMOL, browsers, 3, context_tokens=1024)
    assert plan.ranges == [(0, 10), (10, 20), (20, 30)]
    assert plan.browser_ids == ["b0", "b1", "b2"]
    check_plan(plan, SMOL, browsers, context_tokens=1024)
    auto = plan_layers(SMOL, browsers, context_tokens=1024)
    assert auto.ranges == [(0, 30)] and auto.browser_ids == ["b0"]


def test_memory_weights_the_split_and_ends_go_to_the_big_browsers():
    browsers = budgets(1.5, 3.0, 2.0)
    plan = plan_layers(SMOL, browsers, 3, context_tokens=1024)
    check_plan(plan, SMOL, browsers, context_tokens=1024)
    layers = dict(zip(plan.browser_ids, (b - a for a, b in plan.ranges), strict=True))
    assert layers["b1"] > layers["b2"]
    assert {plan.browser_ids[0], plan.browser_ids[-1]} == {"b1", "b2"}  # the ends carry the embedding
    assert plan.browser_ids[1] == "b0"
    d = plan.as_dict()
    assert [s["layers"] for s in d["shards"]] == [list(r) for r in plan.ranges]
    assert d["context_tokens"] == 1024 and d["forward_tokens"] == 1024


def test_throughput_moves_layers_to_the_faster_browser():
    even = plan_layers(SMOL, budgets(4, 4, 4), 3, context_tokens=1024)
    fast = plan_layers(SMOL, budgets(4, 4, 4, throughput=(1.0, 3.0, 1.0)), 3, context_tokens=1024)
    n_fast = {bid: b - a for (a, b), bid in zip(fast.ranges, fast.browser_ids, strict=True)}
    n_even = {bid: b - a for (a, b), bid in zip(even.ranges, even.browser_ids, strict=True)}
    assert n_fast["b1"] > n_even["b1"]
    assert n_fast["b1"] > n_fast["b0"] and n_fast["b1"] > n_fast["b2"]


def test_impossible_plan_says_how_much_memory_is_missing():
    with pytest.raises(PlanError, match="missing") as info:
        plan_layers(SMOL, budgets(1, 1, 1), context_tokens=1024)
    assert not isinstance(info.value, PlanInputError)
    assert info.value.missing_bytes > 0
    # One browser: exactly the missing bytes more make it fit, one byte less does not.
    need = shard_memory_bytes(SMOL, 0, 30, context_tokens=1024)
    with pytest.raises(PlanError) as one:
        plan_layers(SMOL, [BrowserBudget("x", need - 12345)], context_tokens=1024)
    assert one.value.missing_bytes == 12345
    assert plan_layers(SMOL, [BrowserBudget("x", need)], context_tokens=1024).ranges == [(0, 30)]


def test_full_context_default_is_honest_about_attention_memory():
    # SmolLM2's 8192-token context replayed in one forward: the attention scores alone are GiBs.
    with pytest.raises(PlanError) as info:
        plan_layers(SMOL, budgets(4, 4, 4))
    assert info.value.missing_bytes > GIB


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"browsers": []}, "no browsers"),
    ({"browsers": [*budgets(4, 4), BrowserBudget("b0", GIB)]}, "repeat"),
    ({"n_shards": 4}, "n_shards"),
    ({"n_shards": 0}, "n_shards"),
    ({"context_tokens": 9000}, "context_tokens"),
    ({"forward_tokens": 2000, "context_tokens": 1000}, "forward_tokens"),
    ({"sessions": 0}, "sessions"),
    ({"config": "smol"}, "LlamaConfig"),
])
def test_bad_requests_raise_typed_errors(kwargs, match):
    args = {"config": SMOL, "browsers": budgets(4, 4, 4)} | kwargs
    with pytest.raises(PlanInputError, match=match):
        plan_layers(args.pop("config"), args.pop("browsers"), **args)


@pytest.mark.parametrize(("args", "match"), [
    (("", GIB), "browser_id"), (("a", 0), "memory_limit_bytes"), (("a", 1.5), "memory_limit_bytes"),
    (("a", GIB, 0.0), "throughput"), (("a", GIB, float("nan")), "throughput"),
])
def test_bad_budgets_raise(args, match):
    with pytest.raises(PlanInputError, match=match):
        BrowserBudget(*args)
    with pytest.raises(PlanInputError, match="kv_copies"):
        MemoryModel(kv_copies=-1)


# ----- properties ----------------------------------------------------------------------------------


@st.composite
def configs(draw) -> L.LlamaConfig:
    kv = draw(st.integers(1, 3))
    return L.LlamaConfig(n_layers=draw(st.integers(1, 12)), hidden=draw(st.sampled_from([32, 64, 96])),
                         n_heads=kv * draw(st.integers(1, 3)), n_kv_heads=kv, head_dim=draw(st.sampled_from([8, 16])),
                         ffn=draw(st.integers(16, 256)), vocab=draw(st.integers(8, 4096)), rope_base=1e4,
                         rms_eps=1e-5, bos_id=0, eos_id=1, max_context=draw(st.integers(8, 512)))


def browser_lists(min_size: int = 1, max_size: int = 5):
    mib = 1 << 20
    return st.lists(st.tuples(st.integers(mib, 1200 * mib), st.sampled_from([0.5, 1.0, 1.0, 2.0, 3.0])),
                    min_size=min_size, max_size=max_size).map(
        lambda xs: [BrowserBudget(f"b{i}", m, t) for i, (m, t) in enumerate(xs)])


@settings(max_examples=300, deadline=None)
@given(config=configs(), browsers=browser_lists(), data=st.data())
def test_plans_are_contiguous_cover_all_layers_fit_budgets_and_are_deterministic(config, browsers, data):
    most = min(len(browsers), config.n_layers)
    n = data.draw(st.one_of(st.none(), st.integers(1, most)))
    ctx = data.draw(st.integers(1, config.max_context))
    fwd = data.draw(st.integers(1, ctx))
    sessions = data.draw(st.integers(1, 3))
    workload = {"context_tokens": ctx, "forward_tokens": fwd, "sessions": sessions}
    memory = MemoryModel(page_bytes=1 << 20)  # small pages, so that small random budgets can fit
    try:
        plan = plan_layers(config, browsers, n, memory=memory, **workload)
    except PlanInputError:
        raise
    except PlanError as e:
        assert e.missing_bytes is not None and e.missing_bytes > 0
        with pytest.raises(PlanError) as again:
            plan_layers(config, browsers, n, memory=memory, **workload)
        assert again.value.missing_bytes == e.missing_bytes
        return
    ranges = plan.ranges
    assert ranges[0][0] == 0 and ranges[-1][1] == config.n_layers
    assert all(a < b for a, b in ranges) and all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1))
    if n is not None:
        assert len(ranges) == n
    by_id = {b.browser_id: b for b in browsers}
    assert len(set(plan.browser_ids)) == len(ranges)
    for s in plan.shards:
        assert s.memory_bytes <= by_id[s.browser_id].memory_limit_bytes
        assert s.memory_bytes == shard_memory_bytes(config, s.layer_start, s.layer_end, memory=memory, **workload)
    assert plan_layers(config, browsers, n, memory=memory, **workload) == plan


@settings(max_examples=150, deadline=None)
@given(config=configs().filter(lambda c: c.n_layers <= 7), browsers=browser_lists(1, 3), data=st.data())
def test_planner_finds_a_plan_whenever_one_exists(config, browsers, data):
    """Brute force over every order of the chosen browsers and every split of the layers."""
    n = data.draw(st.integers(1, min(len(browsers), config.n_layers)))
    ctx = data.draw(st.integers(1, config.max_context))
    memory = MemoryModel(page_bytes=1 << 20)
    chosen = sorted(browsers, key=lambda b: (-b.memory_limit_bytes, -b.throughput))[:n]

    def fits(order, cuts) -> bool:
        bounds = [0, *cuts, config.n_layers]
        return all(shard_memory_bytes(config, a, b, context_tokens=ctx, memory=memory) <= br.memory_limit_bytes
                   for a, b, br in zip(bounds, bounds[1:], order, strict=False))

    exists = any(fits(order, cuts) for order in itertools.permutations(chosen)
                 for cuts in itertools.combinations(range(1, config.n_layers), n - 1))
    try:
        plan_layers(config, browsers, n, context_tokens=ctx, memory=memory)
        found = True
    except PlanError:
        found = False
    assert found == exists
