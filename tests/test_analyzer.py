"""ModelShardingAnalyzer: trends per shard count, shard-count recommendation, history from events.

Pure logic: run records come from a seeded generator whose compute / hop / overhead figures are known,
so every estimate the analyzer makes can be checked against the numbers that produced the data.
"""

from __future__ import annotations

import numpy as np
import pytest

from events.schema import (
    BrowserHealthReported,
    OperationCompleted,
    OperationFailed,
    OperationStarted,
    Recorded,
    SessionOpened,
)
from sharding.analyzer import AnalyzerError, ModelShardingAnalyzer, ShardRunRecord
from sharding.models.llama import LlamaConfig
from sharding.plan import GIB, BrowserBudget, plan_layers

SMOL = LlamaConfig(n_layers=30, hidden=576, n_heads=9, n_kv_heads=3, head_dim=64, ffn=1536, vocab=49152,
                   rope_base=100000.0, rms_eps=1e-5, bos_id=1, eos_id=2, max_context=8192)

T0 = 1_700_000_000.0
COMPUTE = 60.0      # ms/token for all layers together
HOP = 6.0           # ms per boundary per token
OVERHEAD = 4.0      # ms/token at the coordinator
PAGE = 400_000_000  # bytes each browser pays
WEIGHTS = 1_600_000_000


def run(ts: float, n: int, rng: np.random.Generator, model: str = "smollm2-135m", drift: float = 0.0,
        success: bool = True, noise: float = 0.5) -> ShardRunRecord:
    if not success:
        return ShardRunRecord(ts, model, n, (), (), None, None, 0, (), False)
    compute = tuple(float(x) for x in rng.normal(COMPUTE / n, noise, n).clip(0.1))
    hops = tuple(float(x) for x in rng.normal(HOP, noise, n - 1).clip(0.1))
    decode = sum(compute) + sum(hops) + OVERHEAD + drift
    # Uneven split: the first shard a little larger than the rest.
    mem = [PAGE + WEIGHTS // n] * n
    mem[0] += 10_000_000
    return ShardRunRecord(ts, model, n, compute, hops, 300.0 + 10 * n, decode, 32, tuple(mem), True)


def history(counts=(1, 2), per=12, seed=0) -> list[ShardRunRecord]:
    rng = np.random.default_rng(seed)
    return [run(T0 + 60 * (i * len(counts) + j), n, rng) for i in range(per) for j, n in enumerate(counts)]


def test_record_validation_names_the_bad_field():
    good = run(T0, 2, np.random.default_rng(0))
    with pytest.raises(AnalyzerError, match="hop_ms"):
        ShardRunRecord(**(good.as_dict() | {"hop_ms": (1.0, 2.0)}))
    with pytest.raises(AnalyzerError, match="shard_compute_ms"):
        ShardRunRecord(**(good.as_dict() | {"shard_compute_ms": (1.0, float("inf"))}))
    with pytest.raises(AnalyzerError, match="decode_ms_per_token"):
        ShardRunRecord(**(good.as_dict() | {"decode_ms_per_token": None}))
    with pytest.raises(AnalyzerError, match="num_shards"):
        ShardRunRecord(**(good.as_dict() | {"num_shards": 0}))
    with pytest.raises(AnalyzerError, match="keys"):
        ModelShardingAnalyzer([{"ts": T0}])
    failed = ShardRunRecord(T0, "m", 3, (), (), None, None, 0, (), False)
    assert not failed.success
    assert ModelShardingAnalyzer([good.as_dict()]).history == [good]  # dicts are accepted


def test_recommends_fewest_shards_that_fit_memory():
    a = ModelShardingAnalyzer(history((1, 2, 3)))
    rec = a.recommend_shard_count()
    assert rec["recommended_shards"] == 1, rec["reason"]
    est = rec["estimates"]
    assert est[1]["decode_ms_per_token"] < est[2]["decode_ms_per_token"] < est[3]["decode_ms_per_token"]
    assert all(e["fits_memory"] for e in est.values())
    # The largest shard of 1 shard is PAGE + WEIGHTS + 10 MB: a limit below it needs 2 shards.
    rec = a.recommend_shard_count(memory_limit_bytes=PAGE + WEIGHTS)
    assert rec["recommended_shards"] == 2
    assert not rec["estimates"][1]["fits_memory"] and rec["estimates"][2]["fits_memory"]
    assert "fewest" in rec["reason"]
    rec = a.recommend_shard_count(memory_limit_bytes=PAGE)
    assert rec["recommended_shards"] is None and "no shard count" in rec["reason"]


def test_unmeasured_counts_follow_the_compute_hop_overhead_model():
    a = ModelShardingAnalyzer(history((1, 2), per=40))
    rec = a.recommend_shard_count(max_shards=5)
    m = rec["model"]
    assert m["compute_ms_per_token"] == pytest.approx(COMPUTE, rel=0.03)
    assert m["hop_ms"] == pytest.approx(HOP, rel=0.05)
    assert m["overhead_ms"] == pytest.approx(OVERHEAD, abs=0.5)
    for n in (3, 4, 5):
        e = rec["estimates"][n]
        assert e["source"] == "model"
        assert e["decode_ms_per_token"] == pytest.approx(COMPUTE + (n - 1) * HOP + OVERHEAD, rel=0.03)
        # Memory: sum = n * PAGE + WEIGHTS (+10 MB) fitted from the two measured counts.
        assert e["max_shard_memory_bytes"] == pytest.approx(PAGE + WEIGHTS / n, rel=0.02)
    assert rec["estimates"][2]["source"] == rec["estimates"][2]["memory_source"] == "measured"
    assert rec["estimates"][2]["max_shard_memory_bytes"] == PAGE + WEIGHTS // 2 + 10_000_000
    assert {rec["estimates"][n]["memory_source"] for n in (3, 4, 5)} == {"model"}
    assert rec["model"]["page_bytes"] == pytest.approx(PAGE, rel=0.02)


def test_more_shards_win_only_when_measured_faster():
    rng = np.random.default_rng(3)
    runs = history((1, 2))
    # Three shards measured clearly faster (e.g. smaller sessions run in cache): a drift of -30 ms.
    runs += [run(T0 + 5000 + i, 3, rng, drift=-30.0) for i in range(8)]
    rec = ModelShardingAnalyzer(runs).recommend_shard_count()
    assert rec["recommended_shards"] == 3, rec["reason"]
    assert "measured" in rec["reason"]
    # Slightly faster (below min_advantage) does not count.
    runs2 = history((1,)) + [run(T0 + 5000 + i, 2, rng, drift=-HOP - 0.5) for i in range(8)]
    assert ModelShardingAnalyzer(runs2).recommend_shard_count()["recommended_shards"] == 1


def test_failed_runs_count_in_success_rate_not_in_estimates():
    rng = np.random.default_rng(1)
    runs = history((1, 2)) + [run(T0 + 9000 + i, 2, rng, success=False) for i in range(4)]
    a = ModelShardingAnalyzer(runs)
    trends = a.analyze_performance_trends()
    assert trends["by_shards"][2]["runs"] == 16 and trends["by_shards"][2]["successful"] == 12
    assert trends["by_shards"][2]["success_rate"] == pytest.approx(0.75)
    assert trends["by_shards"][1]["success_rate"] == 1.0
    only_failed = ModelShardingAnalyzer([run(T0, 2, rng, success=False)])
    assert only_failed.recommend_shard_count()["recommended_shards"] is None


def test_trends_per_shard_count():
    rng = np.random.default_rng(2)
    # 2 shards get steadily slower (+1 ms/token per run), 1 shard stays put.
    runs = [run(T0 + 60 * i, 1, rng) for i in range(20)]
    runs += [run(T0 + 60 * i + 30, 2, rng, drift=1.0 * i) for i in range(20)]
    t = ModelShardingAnalyzer(runs).analyze_performance_trends()
    assert t["model"] == "smollm2-135m" and t["runs"] == 40
    assert t["by_shards"][1]["trend_direction"] == "stable"
    two = t["by_shards"][2]
    assert two["trend_direction"] == "degrading"
    assert two["slope_ms_per_token_per_s"] == pytest.approx(1 / 60, rel=0.1)
    assert two["avg_hop_ms"] == pytest.approx(HOP, rel=0.1)
    improving = [run(T0 + 60 * i, 3, rng, drift=40.0 - 2.0 * i) for i in range(20)]
    assert ModelShardingAnalyzer(improving).analyze_performance_trends()["by_shards"][3]["trend_direction"] \
        == "improving"


def test_several_models_need_a_model_argument():
    rng = np.random.default_rng(4)
    runs = history((1, 2)) + [run(T0 + i, 2, rng, model="tiny-llama") for i in range(5)]
    a = ModelShardingAnalyzer(runs)
    with pytest.raises(AnalyzerError, match="several models"):
        a.analyze_performance_trends()
    assert a.analyze_performance_trends(model="tiny-llama")["runs"] == 5
    assert a.recommend_shard_count(model="tiny-llama")["estimates"][2]["runs"] == 5
    with pytest.raises(AnalyzerError, match="not in the history"):
        a.recommend_shard_count(model="nope")
    with pytest.raises(AnalyzerError, match="memory_limit_bytes"):
        a.recommend_shard_count(memory_limit_bytes=0, model="tiny-llama")


def _events(plan_dict: dict, metrics: dict, failed_op: bool = False) -> list[Recorded]:
    evs = [
        OperationStarted(op_id="op1", model="smollm2-135m", browser_id="b0", kind="generate", input_digest="d"),
        SessionOpened(session_id="s1", model="smollm2-135m", plan=plan_dict | {"op_id": "op1"}),
        OperationFailed(op_id="op1", category="crash", error="gone") if failed_op
        else OperationCompleted(op_id="op1", duration_ms=1234.0, metrics=metrics),
        # An embedding operation: not a generation, ignored.
        OperationStarted(op_id="op2", model="all-minilm-l6-v2", browser_id="b1", kind="infer", input_digest="e"),
        OperationCompleted(op_id="op2", duration_ms=12.0, metrics={"page_ms": 10.0}),
    ]
    return [Recorded(i + 1, T0 + i, e) for i, e in enumerate(evs)]


def test_history_from_events_uses_metrics_and_the_session_plan():
    plan = plan_layers(SMOL, [BrowserBudget(f"b{i}", 4 * GIB) for i in range(3)], 3, context_tokens=1024)
    metrics = {"shards": 3, "prefill_ms": 410.0, "decode_ms_per_token": 80.0, "shard_compute_ms": [20.0, 20.0, 21.0],
               "hop_ms": [6.0, 7.0], "tokens": 32, "session_id": "s1", "decode_tokens_per_s": 12.5}
    a = ModelShardingAnalyzer.from_events(_events(plan.as_dict(), metrics))
    assert a.skipped == {}
    [r] = a.history
    assert r == ShardRunRecord(T0 + 2, "smollm2-135m", 3, (20.0, 20.0, 21.0), (6.0, 7.0), 410.0, 80.0, 32,
                               tuple(plan.memory_bytes), True, memory_measured=False)
    # The plan's memory is the planner's estimate, and the recommendation says so: its decode speed was measured.
    estimate = a.recommend_shard_count()["estimates"][3]
    assert estimate["source"] == "measured" and estimate["memory_source"] == "planner"
    # Memory given in the metrics wins over the plan's estimate, as a reading.
    a = ModelShardingAnalyzer.from_events(_events(plan.as_dict(), metrics | {"memory_bytes_per_shard": [1, 2, 3]}))
    assert a.history[0].memory_bytes_per_shard == (1, 2, 3) and a.history[0].memory_measured
    assert a.recommend_shard_count()["estimates"][3]["memory_source"] == "measured"
    # A failed generation tied to its session by the plan's op_id.
    a = ModelShardingAnalyzer.from_events(_events(plan.as_dict(), metrics, failed_op=True))
    assert [(r.num_shards, r.success) for r in a.history] == [(3, False)]


def test_history_from_events_skips_malformed_generations():
    plan = {"shards": [{"browser_id": "b0", "layers": [0, 30]}]}  # no memory figures
    metrics = {"shards": 1, "prefill_ms": 400.0, "decode_ms_per_token": 60.0, "shard_compute_ms": [55.0],
               "hop_ms": [], "tokens": 16, "session_id": "s1"}
    a = ModelShardingAnalyzer.from_events(_events(plan, metrics))
    assert a.history == [] and sum(a.skipped.values()) == 1
    a = ModelShardingAnalyzer.from_events(_events(plan, metrics | {"memory_bytes_per_shard": [10], "hop_ms": [1.0]}))
    assert a.history == [] and any("malformed" in k for k in a.skipped)
    a = ModelShardingAnalyzer.from_events(_events(plan, {k: v for k, v in metrics.items() if k != "hop_ms"}
                                                  | {"memory_bytes_per_shard": [10]}))
    assert a.history == [] and any("hop_ms" in k for k in a.skipped)
    a = ModelShardingAnalyzer.from_events(_events(plan, metrics | {"memory_bytes_per_shard": [10]}))
    assert len(a.history) == 1 and a.skipped == {}
    with pytest.raises(AnalyzerError, match="Recorded"):
        ModelShardingAnalyzer.from_events([{"kind": "x"}])


def test_history_from_events_takes_memory_from_the_shard_browsers_health_reports():
    """The pool's plan names each shard's browser and artifact: memory is what that browser measured itself
    (BrowserHealthReported listing the artifact), the last report before the generation ended, else the first
    after it; a report from before the shard was loaded does not count."""
    plan = {"shards": [{"browser_id": "b0", "artifact": "a0", "layers": [0, 15]},
                       {"browser_id": "b1", "artifact": "a1", "layers": [15, 30]}]}
    metrics = {"shards": 2, "prefill_ms": 400.0, "decode_ms_per_token": 60.0, "shard_compute_ms": [25.0, 25.0],
               "hop_ms": [5.0], "tokens": 16, "session_id": "s1"}
    mib = 1 << 20

    def with_reports(*reports: tuple[int, str, float, tuple[str, ...]]) -> list[Recorded]:
        """The generation's events at seqs 10-14, each report at its own seq."""
        base = [Recorded(10 + r.seq, r.ts, r.event) for r in _events(plan, metrics)]
        health = [Recorded(seq, T0 + seq, BrowserHealthReported(browser_id=b, memory_mb=mb, loaded=loaded))
                  for seq, b, mb, loaded in reports]
        return sorted(base + health, key=lambda r: r.seq)

    # b0 reported before (with its shard) and after; b1 only before its shard was loaded, then after the run.
    records = with_reports((2, "b0", 300.0, ("a0",)), (5, "b1", 100.0, ()), (20, "b0", 999.0, ("a0",)),
                           (21, "b1", 350.0, ("a1", "other")))
    [r] = ModelShardingAnalyzer.from_events(records).history
    assert r.memory_bytes_per_shard == (300 * mib, 350 * mib)
    # No report of b1 holding its shard: skipped, and said why.
    a = ModelShardingAnalyzer.from_events(with_reports((2, "b0", 300.0, ("a0",)), (5, "b1", 100.0, ())))
    assert a.history == [] and list(a.skipped) == ["no health report of a shard's browser with its shard loaded"]
