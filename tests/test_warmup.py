"""When a standby's warm-up stops (actors/decisions/warmup.py), and the warm-up inputs of every model
(sharding/models/registry.py): they run on CPU onnxruntime, so a page can run them too."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from actors.decisions.warmup import warmed_up
from sharding.models.registry import WARMUP_PROMPT_TOKENS, artifact, artifacts, warmup_feeds


@pytest.mark.parametrize("rounds, expected", [
    ([], False),
    ([1500.0, 700.0], False),                        # too few rounds
    ([400.0, 300.0, 290.0], False),                  # settled, but too little work to have tiered up
    ([1500.0, 700.0, 480.0], False),                 # enough work, still falling
    ([1500.0, 700.0, 480.0, 290.0], False),          # the previous round is far above the fastest
    ([1500.0, 700.0, 480.0, 290.0, 300.0], True),    # the last two within the ratio of the fastest
    ([1500.0, 700.0, 480.0, 290.0, 300.0, 370.0], False),   # a slow round (a busy machine): one more
])
def test_warm_up_stops_once_enough_work_is_done_and_the_rounds_settle(rounds, expected):
    assert warmed_up(rounds, min_work_ms=2500.0, settle_ratio=1.25, max_rounds=40) is expected


def test_warm_up_of_a_small_model_stops_at_the_round_cap():
    assert not warmed_up([5.0] * 39, min_work_ms=2500.0, settle_ratio=1.25, max_rounds=40)
    assert warmed_up([5.0] * 40, min_work_ms=2500.0, settle_ratio=1.25, max_rounds=40)


@pytest.mark.parametrize("name, shard", [("all-minilm-l6-v2", None), ("tiny-llama", None),
                                         ("tiny-llama", "0-2"), ("tiny-llama", "2-4")])
def test_warm_up_inputs_run_on_the_model(name, shard):
    art = artifacts(name)[0] if shard is None else artifact(name, shard)
    session = ort.InferenceSession(str(art.path), providers=["CPUExecutionProvider"])
    feeds = warmup_feeds(art)
    assert feeds
    for f in feeds:
        assert set(f) == {i.name for i in session.get_inputs()}
        outputs = session.run(None, f)
        assert all(o.size for o in outputs)
    if art.meta.get("state"):      # a llama shard: a prompt's prefill, then one decode step over its cache
        assert [next(iter(f.values())).shape[1] for f in feeds] == [WARMUP_PROMPT_TOKENS, 1]
