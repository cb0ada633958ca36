"""The account a browser actor keeps of what its page holds (actors/page_models.py): pure, no browser. The same
rules on a real restart from a spare are in tests/test_spare.py (staged bytes) and tests/test_browser_actor.py."""

from __future__ import annotations

import asyncio
import hashlib

import numpy as np
import pytest

from actors.page_models import PageModels
from events.errors import InputError

BYTES = np.arange(1000, dtype=np.uint8)
SHA = hashlib.sha256(BYTES.tobytes()).hexdigest()


def test_received_bytes_are_verified_and_taken_once():
    models = PageModels(keep_held=True)
    asyncio.run(models.receive("s1", "m", BYTES, SHA))
    with pytest.raises(InputError, match="sha256") as wrong:
        asyncio.run(models.receive("s2", "m", np.zeros(10, np.uint8), SHA))
    assert wrong.value.field == "model_bytes" and "s2" not in models.received
    assert bytes(models.take_received("s1", "m", SHA)) == BYTES.tobytes()
    with pytest.raises(LookupError):              # taken already
        models.take_received("s1", "m", SHA)
    asyncio.run(models.receive("s4", "m", BYTES, SHA))
    with pytest.raises(LookupError):              # another content than was received under that send
        models.take_received("s4", "m", "0" * 64)
    asyncio.run(models.receive("s3", "m", BYTES, SHA))
    models.discard_received("s3")
    assert models.received == {}


def test_content_the_page_holds_is_not_hashed_again_and_its_own_copy_is_used():
    models = PageModels(keep_held=True)
    models.loaded("m", memoryview(BYTES), SHA, "wasm")
    garbage = np.full(1000, 7, np.uint8)           # sent under the held content's sha256: never used
    asyncio.run(models.receive("s1", "m", garbage, SHA))
    assert bytes(models.take_received("s1", "m", SHA)) == BYTES.tobytes()
    # Other content under the key is verified as any new bytes are.
    with pytest.raises(InputError):
        asyncio.run(models.receive("s2", "m", garbage, "f" * 64))


def test_a_new_page_holds_what_the_spare_it_was_held_of_the_browsers_models():
    models = PageModels(keep_held=True)
    for key in ("a", "b", "c"):
        models.loaded(key, memoryview(BYTES), SHA, "wasm")
    models.new_page(loaded={"a"}, staged={"b", "other"})
    assert set(models.held) == {"a"} and set(models.staged) == {"b"}
    assert models.claim_staged("b") is not None and models.staged == {}
    models.unloaded("a")
    assert models.held == {}
    models.loaded("a", memoryview(BYTES), SHA, "wasm")
    models.new_page()                              # a fresh process: its page holds nothing
    assert models.held == {} and models.staged == {}


def test_without_a_spare_the_held_bytes_are_not_kept():
    models = PageModels(keep_held=False)
    models.loaded("m", memoryview(BYTES), SHA, "wasm")
    assert models.held == {}
