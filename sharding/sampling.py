"""Next-token choice from a shard chain's top-K output. Pure and deterministic for a given seed."""

from __future__ import annotations

import numpy as np


def sample_next(values: np.ndarray, indices: np.ndarray, temperature: float = 0.0, top_p: float = 1.0,
                rng: np.random.Generator | None = None) -> int:
    """Pick a token id from the top-K logits (``values`` sorted descending, ``indices`` their ids).

    temperature 0 is greedy (index 0). Otherwise softmax(values / temperature), cut to the smallest
    prefix whose mass reaches ``top_p``, sampled with ``rng``. Sampling sees only the top K tokens
    (K = the graph's top_k, 64 by default), as top-k sampling does.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    indices = np.asarray(indices).reshape(-1)
    if temperature <= 0.0:
        return int(indices[0])
    if rng is None:
        raise ValueError("sampling with temperature > 0 needs an rng (pass a seed)")
    logits = values / temperature
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    keep = int(np.searchsorted(np.cumsum(probs), top_p) + 1)
    probs = probs[:keep] / probs[:keep].sum()
    return int(indices[rng.choice(keep, p=probs)])


def token_rng(seed: int, position: int) -> np.random.Generator:
    """The generator that samples the ``position``-th new token of a seeded generation.

    One generator per position (seeded by ``(seed, position)``), not one advanced token by token: a
    coordinator that takes a session over after ``position`` logged tokens samples exactly what the
    one that died would have, without replaying its draws.
    """
    return np.random.default_rng([seed, position])
