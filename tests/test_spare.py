"""The spare keeper's pure rules (actors/spare.py); a real restart taking a real spare is in
tests/test_browser_actor.py, and the time it saves in benchmarks/startup.py."""

from __future__ import annotations

from types import SimpleNamespace

from actors.constants import SPARE_FAILURES_MAX, SPARE_MODEL_BYTES_MAX
from actors.spare import HeldModel, SpareKeeper


def _held(**sizes: int) -> dict[str, HeldModel]:
    return {key: HeldModel(memoryview(bytearray(n)), f"sha-{key}", "wasm") for key, n in sizes.items()}


def test_a_spare_holds_the_browsers_models_only_while_they_fit():
    small = _held(a=1000, b=2000)
    keeper = SpareKeeper(SimpleNamespace(held_models=small))
    assert keeper.wanted() == small
    # One model too many for a second copy: the spare stays blank rather than hold a part.
    keeper.core.held_models = small | _held(big=SPARE_MODEL_BYTES_MAX)
    assert keeper.wanted() == {}


def test_a_keeper_whose_spares_keep_failing_stops_starting_them():
    keeper = SpareKeeper(SimpleNamespace(held_models={}, closing=False, proc=object()))
    keeper.failures = SPARE_FAILURES_MAX
    keeper.tend()              # would need a running event loop if it started anything
    assert keeper._task is None
    keeper.failures = 0
    keeper.tend(start=False)   # after a load, with no spare there: nothing to bring in line
    assert keeper._task is None


def test_a_spare_is_started_only_where_memory_allows():
    from actors.constants import SPARE_BLANK_BYTES, SPARE_MEMORY_RESERVE_BYTES
    from actors.spare import memory_available, spare_fits

    room = SPARE_MEMORY_RESERVE_BYTES + SPARE_BLANK_BYTES
    assert spare_fits(room, 0) and not spare_fits(room - 1, 0)
    # Models cost about twice their bytes in a page.
    assert spare_fits(room + 2 * 100, 100) and not spare_fits(room + 2 * 100 - 1, 100)
    assert not spare_fits(0, 0)               # /proc/meminfo unreadable: no spare
    assert memory_available() > 0             # Linux: the kernel's MemAvailable


def test_minilm_is_held_by_a_spare_and_smollm2_is_not():
    """README: a spare holds the browser's models when they take at most 256 MiB in all (MiniLM yes, SmolLM2 no):
    the real artifacts' sizes against the rule."""
    from sharding.models.registry import artifacts, llama_model

    [minilm] = artifacts("all-minilm-l6-v2")
    [smollm2] = artifacts("smollm2-135m", [(0, llama_model("smollm2-135m").config.n_layers)])
    assert minilm.path.stat().st_size <= SPARE_MODEL_BYTES_MAX < smollm2.path.stat().st_size
