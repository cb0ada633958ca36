"""CutOffs (actors/cutoff.py): the calls awaiting a browser whose actor fell silent end at once with the failure,
instead of waiting for Ray's verdict on its node (README, "When a node vanishes"). Pure asyncio: an awaitable
that never completes stands for a call to an actor on a vanished node."""

from __future__ import annotations

import asyncio
import gc

import pytest

from actors.cutoff import CutOffs
from events.errors import ActorUnreachable, FailureCategory


def _silent() -> asyncio.Future:
    return asyncio.get_running_loop().create_future()         # never answered


def test_cutting_a_key_ends_every_call_awaiting_it_with_the_failure_and_no_other() -> None:
    async def scenario() -> None:
        cutoffs = CutOffs()
        failure = ActorUnreachable("b1", FailureCategory.CONNECTION, "no probe")
        waiting = [asyncio.ensure_future(cutoffs.call("b1", _silent())) for _ in range(3)]
        other = asyncio.ensure_future(cutoffs.call("b2", _silent()))
        await asyncio.sleep(0)
        cutoffs.cut("b1", failure)
        done, _ = await asyncio.wait(waiting, timeout=5)
        assert done == set(waiting)
        assert all(task.exception() is failure for task in waiting)
        assert not other.done() and not cutoffs.is_cut("b2")
        # Later calls to a cut key fail at once; a later cut changes nothing.
        cutoffs.cut("b1", ActorUnreachable("b1", FailureCategory.CONNECTION, "again"))
        with pytest.raises(ActorUnreachable) as late:
            await asyncio.wait_for(cutoffs.call("b1", _silent()), 5)
        assert late.value is failure
        other.cancel()

    asyncio.run(scenario())


def test_an_answer_before_the_cut_is_returned_and_a_reset_key_waits_again() -> None:
    async def scenario() -> None:
        cutoffs = CutOffs()
        answered = _silent()
        answered.set_result("answer")
        assert await cutoffs.call("b1", answered) == "answer"
        cutoffs.cut("b1", ActorUnreachable("b1", FailureCategory.CONNECTION, "no probe"))
        cutoffs.reset("b1")                      # a new actor under the same id
        assert not cutoffs.is_cut("b1")
        waiting = asyncio.ensure_future(cutoffs.call("b1", _silent()))
        done, _ = await asyncio.wait({waiting}, timeout=0.1)
        assert not done, "a call to the new actor must wait for its answer"
        waiting.cancel()

    asyncio.run(scenario())


def test_a_late_answer_of_a_call_that_was_cut_off_is_dropped_quietly() -> None:
    async def scenario() -> list[dict]:
        loop = asyncio.get_running_loop()
        errors: list[dict] = []
        loop.set_exception_handler(lambda _loop, context: errors.append(context))
        cutoffs = CutOffs()
        late = _silent()
        waiting = asyncio.ensure_future(cutoffs.call("b1", late))
        await asyncio.sleep(0)
        cutoffs.cut("b1", ActorUnreachable("b1", FailureCategory.CONNECTION, "no probe"))
        try:
            await waiting
        except ActorUnreachable:
            pass
        else:
            raise AssertionError("the call was not cut off")
        late.set_exception(RuntimeError("the actor's late failure"))
        await asyncio.sleep(0)                   # its done-callbacks run
        del late, waiting, cutoffs               # unreferenced: an unretrieved failure would be reported now
        gc.collect()
        return errors

    assert asyncio.run(scenario()) == [], "an unretrieved late failure was reported"
