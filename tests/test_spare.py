"""The spare keeper's pure rules (actors/spare.py), and a real restart whose reload finds its model's bytes
staged in the spare; a real restart taking a spare that holds a session is in tests/test_browser_actor.py,
and the time both save in benchmarks/startup.py."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from actors.constants import SPARE_FAILURES_MAX, SPARE_MODEL_BYTES_MAX, SPARE_STAGED_BYTES_MAX
from actors.page_models import HeldModel
from actors.spare import SpareKeeper


def _held(**sizes: int) -> dict[str, HeldModel]:
    # np.zeros: the kernel's zero pages, so a gigabyte "model" costs no memory here
    return {key: HeldModel(memoryview(np.zeros(n, np.uint8)), f"sha-{key}", "wasm") for key, n in sizes.items()}


def test_a_spare_holds_the_browsers_models_as_sessions_while_they_fit_else_stages_their_bytes():
    small = _held(a=1000, b=2000)
    keeper = SpareKeeper(SimpleNamespace(page_models=SimpleNamespace(held=small)))
    assert keeper.wanted() == (small, {})
    # One model too many for second sessions: all of them are staged (bytes only), never a part as sessions.
    big = small | _held(big=SPARE_MODEL_BYTES_MAX)
    keeper.core.page_models.held = big
    assert keeper.wanted() == ({}, big)
    # Too many bytes to stage: the spare stays blank rather than hold a part.
    keeper.core.page_models.held = big | _held(huge=SPARE_STAGED_BYTES_MAX)
    assert keeper.wanted() == ({}, {})


def test_a_keeper_whose_spares_keep_failing_stops_starting_them():
    keeper = SpareKeeper(SimpleNamespace(page_models=SimpleNamespace(held={}), closing=False, proc=object()))
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
    # Models cost about twice their bytes in a page as sessions, their bytes when staged.
    assert spare_fits(room + 2 * 100, 100) and not spare_fits(room + 2 * 100 - 1, 100)
    assert spare_fits(room + 2 * 100 + 50, 100, 50) and not spare_fits(room + 2 * 100 + 49, 100, 50)
    assert not spare_fits(0, 0)               # /proc/meminfo unreadable: no spare
    assert memory_available() > 0             # Linux: the kernel's MemAvailable


def test_minilm_is_held_by_a_spare_and_smollm2_is_staged():
    """README: a spare holds the browser's models as sessions when they take at most 256 MiB in all (MiniLM),
    and stages their bytes up to 1 GiB (SmolLM2 whole): the real artifacts' sizes against the rule."""
    from sharding.models.registry import artifacts, llama_model

    [minilm] = artifacts("all-minilm-l6-v2")
    [smollm2] = artifacts("smollm2-135m", [(0, llama_model("smollm2-135m").config.n_layers)])
    assert minilm.path.stat().st_size <= SPARE_MODEL_BYTES_MAX < smollm2.path.stat().st_size <= SPARE_STAGED_BYTES_MAX


def _until_idle_on_a_stepped_clock(monkeypatch, core: SimpleNamespace, busy_until: float | None = None) -> float:
    """How long ``_until_idle`` waits for ``core`` (seconds of a stepped clock; its sleeps advance it). With
    ``busy_until``, the page works until then and is quiet after."""
    import asyncio

    from actors import spare

    clock = [100.0]

    async def sleep(seconds: float) -> None:
        clock[0] += seconds
        assert clock[0] < 1000.0, "the spare never starts"
        if busy_until is not None and clock[0] >= busy_until and core.work_in_flight:
            core.work_in_flight, core.work_ended_at = 0, busy_until

    monkeypatch.setattr(spare, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(spare, "asyncio", SimpleNamespace(sleep=sleep))
    asyncio.run(SpareKeeper(core)._until_idle())
    return clock[0] - 100.0


def test_a_spare_waits_for_a_quiet_page_but_at_most_its_start_cap(monkeypatch):
    """README: a spare is started once the page has had SPARE_IDLE_S without work, at most
    SPARE_START_WITHIN_S after it was wanted, so a page that is never idle still gets one."""
    from actors.constants import SPARE_IDLE_S, SPARE_START_WITHIN_S

    never_idle = SimpleNamespace(work_in_flight=1, work_ended_at=0.0)
    waited = _until_idle_on_a_stepped_clock(monkeypatch, never_idle)
    assert SPARE_START_WITHIN_S <= waited < SPARE_START_WITHIN_S + SPARE_IDLE_S
    quiet_since_long = SimpleNamespace(work_in_flight=0, work_ended_at=0.0)
    assert _until_idle_on_a_stepped_clock(monkeypatch, quiet_since_long) == 0.0
    just_finished = SimpleNamespace(work_in_flight=0, work_ended_at=100.0 - SPARE_IDLE_S / 5)
    assert _until_idle_on_a_stepped_clock(monkeypatch, just_finished) == pytest.approx(SPARE_IDLE_S * 4 / 5)
    # Busy for 3 s, then quiet: the spare starts SPARE_IDLE_S after the work ended (within a sleep's step).
    busy_a_while = SimpleNamespace(work_in_flight=1, work_ended_at=0.0)
    waited = _until_idle_on_a_stepped_clock(monkeypatch, busy_a_while, busy_until=103.0)
    assert 3.0 + SPARE_IDLE_S <= waited <= 3.0 + 2 * SPARE_IDLE_S


@pytest.mark.browser
def test_a_restart_reloads_a_staged_model_without_fetching_or_hashing_it_and_drops_what_no_reload_claims(monkeypatch):
    """Real Chromium and MiniLM, in-process (a BrowserCore), with the rule's bound lowered so that MiniLM is
    "big": the spare stages its verified bytes (no session); after the browser is SIGKILLed the restart takes
    the spare, the reload uses the staged bytes (no fetch; bytes that are not the model, sent under the
    model's sha256, are not what loads) and answers as numpy does; staged bytes that no reload claims within
    STAGED_CLAIM_S are dropped from the page."""
    import asyncio
    import time

    from actors import browser, spare
    from actors.browser import BrowserCore
    from actors.faults import inject_fault
    from sharding.models import minilm
    from sharding.models.registry import artifacts

    monkeypatch.setattr(spare, "SPARE_MODEL_BYTES_MAX", 0)
    [art] = artifacts("all-minilm-l6-v2")
    data = np.fromfile(art.path, np.uint8)
    sentences = ["A staged model skips its fetch.", "Its bytes were verified before."]
    feeds, reference = minilm.tokenize(sentences), minilm.reference_embed(sentences)

    async def until(check, what: str) -> None:
        deadline = time.monotonic() + 60
        while not check():
            assert time.monotonic() < deadline, f"{what} within 60 s"
            await asyncio.sleep(0.05)

    async def scenario() -> None:
        core = BrowserCore("staging-browser", spare_process=True)
        try:
            await core.start()
            assert (await core.load_model(art.key, data, art.sha256))["staged"] is False
            await core.run(art.key, feeds, fetch=["embedding"])     # a browser that served keeps a spare
            await until(lambda: core.spares.spare and core.spares.spare.staged == {art.key}, "no spare staged MiniLM")
            assert core.spares.spare.models == set(), "staged, not a second session"
            assert core.spares.ready()
            await inject_fault(core, "kill_browser")
            assert (await core.restart())["from_spare"] is True
            health = await core.health()
            assert health["models"] == [] and health["staged_models"] == [art.key]
            garbage = np.full_like(data, 7)       # the content is the staged one: these bytes never load
            loaded = await core.load_model(art.key, garbage, art.sha256)
            assert loaded["staged"] is True and not loaded.get("alreadyLoaded")
            out = (await core.run(art.key, feeds, fetch=["embedding"]))["outputs"]["embedding"]
            assert np.abs(out - reference).max() <= 1e-4
            assert (await core.health())["staged_models"] == []
            # A restart whose reload never comes: the staged bytes leave the page once the claim window ends,
            # cut short here (only here: under load the first reload came more than 0.2 s after its restart).
            monkeypatch.setattr(browser, "STAGED_CLAIM_S", 0.2)
            await until(core.spares.ready, "no next spare was ready")
            await inject_fault(core, "kill_browser")
            await core.restart()
            assert set(core.page_models.staged) == {art.key}        # read at once: the window is short now
            deadline = time.monotonic() + 30
            while (await core.health())["staged_models"]:
                assert time.monotonic() < deadline, "unclaimed staged bytes were never dropped"
                await asyncio.sleep(0.05)
            assert core.page_models.staged == {}
        finally:
            await core.close()

    asyncio.run(scenario())
