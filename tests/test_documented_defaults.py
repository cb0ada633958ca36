"""Every default the README states, read from the surface a user meets (signatures, parsed options, the CLI).

A test that compares a constant with itself cannot catch a changed default; these compare with the
README's numbers, written out here. Change a default and this test fails until the README says the same.
"""

from __future__ import annotations

import argparse
import inspect

import pytest

from actors import constants as c
from actors.decisions.recovery import FaultToleranceConfig
from actors.pool import PoolCore
from events.state import PERF_WINDOW
from webpool.cli import _add_status_parser


def _defaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_pool_options_default_to_what_the_readme_says():
    pool = _defaults(PoolCore.__init__)
    assert pool["max_queued_requests"] == 256 and pool["max_queued_rows"] == 4096
    assert pool["max_batch_size"] == 32 and pool["batch_wait_ms"] == 2
    assert pool["scale_down_idle_s"] == 30 and pool["adaptive_scaling"] is False
    assert pool["health_interval"] == 2.0
    assert pool["spare_process"] is None          # "default on at medium and up where the strategy restarts"
    assert pool["num_threads"] is None            # "by default (`None`) each browser chooses for its node"
    generate = _defaults(PoolCore.generate)        # the ResourcePool actor's class is PoolCore's subclass
    assert generate["max_new_tokens"] == 16 and generate["shards"] == 1
    assert generate["temperature"] == 0.0 and generate["top_p"] == 1.0 and generate["seed"] is None


def test_fault_tolerance_options_default_to_what_the_readme_says():
    high = FaultToleranceConfig.from_options({"level": "high"})
    assert high.standby_browsers == 1 and high.shadow_shards and high.hedges and high.hedge_budget == 0.05
    assert high.recovery_strategy.value == "progressive"
    critical = FaultToleranceConfig.from_options({"level": "critical"})
    assert critical.vote_k == 3 and critical.vote_cosine == 0.999 and not critical.hedges
    assert FaultToleranceConfig.from_options(None).level.value == "none"
    medium = FaultToleranceConfig.from_options({"level": "medium"})
    assert medium.restarts_in_place and not medium.keeps_standby and not medium.hedges


@pytest.mark.parametrize(("constant", "readme"), [
    ("HEDGE_MIN_MS", 50.0), ("HEDGE_MAX_MS", 2000.0), ("HEDGE_TRANSPORT_MS", 30.0), ("HEDGE_MIN_SAMPLES", 5),
    ("HEDGE_BUDGET_PER_S", 0.2), ("HEDGE_BUDGET_BURST", 3.0),          # one hedge every 5 s, a burst of 3
    ("SPARE_MODEL_BYTES_MAX", 256 << 20), ("SPARE_MEMORY_RESERVE_BYTES", 2 << 30),
    ("SPARE_IDLE_S", 0.5), ("SPARE_START_WITHIN_S", 10.0),
    ("DEGRADED_FACTOR", 4.0), ("ANSWER_RATE_WINDOW_S", 5.0),
    ("PROBE_INTERVAL", 0.25),                                          # every browser's actor pinged 4 times a second
])
def test_tunables_are_the_readme_numbers(constant, readme):
    assert getattr(c, constant) == readme


def test_the_history_window_and_the_live_view_interval():
    assert PERF_WINDOW == 20
    parser = argparse.ArgumentParser()
    _add_status_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["status", "--watch"])
    assert args.interval == 1.0
