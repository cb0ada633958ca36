"""Level critical's decisions as pure functions: who wins a vote, and when a vote cannot be held.

The pool's use of them on real browsers is in tests/test_fault_tolerance.py (a corrupted browser is
outvoted and quarantined; generations voted, one shard and sharded).
"""

from __future__ import annotations

import numpy as np
import pytest

from actors.decisions.recovery import FaultToleranceConfig
from actors.decisions.voting import to_quarantine, vote_embeddings, vote_tokens
from events.errors import InputError, NoMajorityError


def test_identical_generations_win_and_a_dissenter_is_named():
    vote = vote_tokens({"b1": [5, 6, 7], "b2": [5, 6, 7], "b3": [5, 6, 8]}, voters=3)
    assert vote.winner == [5, 6, 7] and vote.agreeing == ("b1", "b2") and vote.dissenting == ("b3",)


def test_a_majority_is_of_every_voter_asked_not_of_those_that_answered():
    # Two of three voters agree, the third failed: still a majority of three.
    assert vote_tokens({"b1": [1], "b2": [1]}, voters=3).agreeing == ("b1", "b2")
    # One survivor of three is no majority: it never wins alone.
    with pytest.raises(NoMajorityError, match="3 voters"):
        vote_tokens({"b1": [1]}, voters=3)
    # Two answers that differ, of three voters: no majority either.
    with pytest.raises(NoMajorityError):
        vote_tokens({"b1": [1], "b2": [2]}, voters=3)


def test_without_a_count_of_voters_the_answers_are_the_voters():
    assert vote_tokens({"b1": [1], "b2": [1], "b3": [2]}).dissenting == ("b3",)
    with pytest.raises(NoMajorityError):
        vote_tokens({"b1": [1], "b2": [2]})


def test_a_dissenting_chain_of_shards_is_quarantined_whole():
    """A sharded voter's answer came from a chain of browsers, any of which may have erred: each is quarantined,
    none of an agreeing chain; a voter of one browser (an embedding) is its own chain."""
    vote = vote_tokens({"a1": [1, 2], "b1": [1, 2], "c1": [1, 3]}, voters=3)
    chains = {"a1": ["a1", "a2"], "b1": ["b1", "b2"], "c1": ["c1", "c2"]}
    assert to_quarantine(vote, chains) == ["c1", "c2"]
    assert to_quarantine(vote, {}) == ["c1"]
    # A browser in an agreeing chain as well is kept (voters' chains are disjoint in the pool; said anyway).
    assert to_quarantine(vote, chains | {"c1": ["c1", "b2"]}) == ["c1"]


def test_embeddings_agree_by_cosine_and_never_across_shapes():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(2, 8))
    close = e + 1e-6 * rng.normal(size=e.shape)
    vote = vote_embeddings({"b1": e, "b2": close, "b3": -e}, min_cosine=0.999, voters=3)
    assert vote.agreeing == ("b1", "b2") and vote.dissenting == ("b3",)
    with pytest.raises(NoMajorityError):
        vote_embeddings({"b1": e, "b2": e[:1], "b3": -e}, voters=3)


@pytest.mark.parametrize(("options", "max_connections", "shards", "field"), [
    ({"level": "critical"}, 2, 1, "fault_tolerance.vote_k"),           # 3 voters do not fit in 2 browsers
    ({"level": "critical", "vote_k": 1}, 4, 1, "fault_tolerance.vote_k"),   # a vote of one is no vote
    ({"level": "critical", "vote_k": 0}, 4, 1, "fault_tolerance.vote_k"),
    ({"level": "critical"}, 4, 2, "shards"),                           # 3 voters x 2 shards = 6 browsers
])
def test_a_vote_that_cannot_be_held_is_refused_with_a_clear_error(options, max_connections, shards, field):
    config = FaultToleranceConfig.from_options(options)
    with pytest.raises(InputError) as info:
        config.check_voters(max_connections, shards, field="shards" if shards > 1 else "fault_tolerance.vote_k")
    assert info.value.field == field


@pytest.mark.parametrize(("options", "max_connections", "shards"), [
    ({"level": "critical"}, 3, 1), ({"level": "critical", "vote_k": 2}, 4, 2), ({"level": "high"}, 1, 4),
    ({"level": "none"}, 1, 1),
])
def test_a_vote_that_fits_or_no_vote_at_all_passes(options, max_connections, shards):
    FaultToleranceConfig.from_options(options).check_voters(max_connections, shards)


def test_voters_of_a_sharded_generation_run_no_shadows():
    """At critical the redundancy is the voters; shadows would double every voter's browsers."""
    assert FaultToleranceConfig.from_options({"level": "high"}).shadows(2)
    assert not FaultToleranceConfig.from_options({"level": "critical"}).shadows(2)


def test_shadows_only_for_sharded_generations_at_high_unless_turned_off():
    """README: a shadow per shard at level high (``shadow_shards``, default on); none for one shard, none below
    high, none once turned off. (Too few browsers: the shard runs unshadowed, actors/sessions.py.)"""
    shadows = lambda options, shards: FaultToleranceConfig.from_options(options).shadows(shards)  # noqa: E731
    assert shadows({"level": "high"}, 3) and not shadows({"level": "high"}, 1)
    assert not shadows({"level": "high", "shadow_shards": False}, 2)
    assert not shadows({"level": "medium"}, 2) and not shadows({"level": "none"}, 2)
