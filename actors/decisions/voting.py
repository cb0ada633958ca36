"""Voting over redundant runs (fault-tolerance level critical). Pure functions.

An answer wins when a strict majority of the browsers asked agree on it (``voters``: those that were
asked, including any that failed to answer, so a lone survivor never wins alone); browsers that
disagree with the winner are dissenters (the pool quarantines them). No majority -> no answer (an
error), because picking one of several disagreeing answers would be a guess.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from events.errors import NoMajorityError


@dataclass(frozen=True)
class Vote:
    winner: Any                       # the agreed answer (an arbitrary agreeing browser's copy)
    agreeing: tuple[str, ...]
    dissenting: tuple[str, ...]


def _majority(answers: dict[str, Any], agree, voters: int | None) -> Vote:
    ids = sorted(answers)
    voters = len(ids) if voters is None else voters
    best: list[str] = []
    for candidate in ids:
        group = [b for b in ids if agree(answers[candidate], answers[b])]
        if len(group) > len(best):
            best = group
    if len(best) * 2 <= voters:
        raise NoMajorityError(f"no majority of {voters} voters among {len(ids)} answers "
                              f"(largest agreeing group: {best})")
    return Vote(answers[best[0]], tuple(best), tuple(b for b in ids if b not in best))


def to_quarantine(vote: Vote, chains: dict[str, Sequence[str]]) -> list[str]:
    """The browsers a vote takes out of service: every browser that computed a dissenting answer.

    ``chains`` maps each voter (the browser the vote placed it on) to the browsers its answer came from, in
    order: one for an embedding, one per shard for a sharded generation. Which browser of a dissenting chain
    erred cannot be told from its answer, so each is quarantined: a fresh browser replacing an innocent one
    costs a launch, a faulty one kept (the voted-on first shard alone, as before) would go on answering. A
    browser that also computed an agreeing answer is never quarantined."""
    agreeing = {b for voter in vote.agreeing for b in chains.get(voter, (voter,))}
    out: list[str] = []
    for voter in vote.dissenting:
        out += [b for b in chains.get(voter, (voter,)) if b not in agreeing and b not in out]
    return out


def vote_embeddings(answers: dict[str, np.ndarray], min_cosine: float = 0.999, voters: int | None = None) -> Vote:
    """Embeddings agree when every row's cosine similarity is at least ``min_cosine``."""

    def agree(a: np.ndarray, b: np.ndarray) -> bool:
        a2, b2 = np.atleast_2d(a).astype(np.float64), np.atleast_2d(b).astype(np.float64)
        if a2.shape != b2.shape:
            return False
        cos = (a2 * b2).sum(1) / (np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1) + 1e-30)
        return bool((cos >= min_cosine).all())

    return _majority(answers, agree, voters)


def vote_tokens(answers: dict[str, list[int]], voters: int | None = None) -> Vote:
    """Generations (greedy, or sampled with the request's seed) agree when their token ids are identical."""
    return _majority(answers, lambda a, b: list(a) == list(b), voters)
