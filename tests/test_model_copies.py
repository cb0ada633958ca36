"""Model bytes on their way to a browser are sent again from a fresh copy when a node holding the copy in
use may be gone (``actors/model_copies.py``): a pull that picks a vanished node's copy waits Ray's pull timeout
(10 s) before it tries another, and a shard's load after a node loss was seen to wait 9.5 s and 30 s so.

Real local Ray and real object refs. The receiving actor stands in for a browser's actor (only its
``receive_model`` and ``discard_received`` are used: page work starts after the bytes arrive). The copy whose
bytes do not arrive is the result of a call that has not ended: Ray holds such a send at the caller,
where a pull from a vanished node waits at the receiving node; the cluster scenarios meet that case
(tests/cluster_scenarios.py, the sharded node loss; docs/facts.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import time

import numpy as np
import ray

from actors.cutoff import CutOffs
from actors.model_copies import ModelCopies, ModelCopy
from sharding.models.registry import ModelArtifact


@ray.remote(num_cpus=0)
class Receiver:
    """Keeps what ``receive_model`` got, as a browser's actor does, and says what it keeps."""

    def __init__(self) -> None:
        self.kept: dict[str, tuple[str, str, bytes]] = {}

    async def receive_model(self, send_id: str, key: str, model_bytes: np.ndarray, sha256: str) -> None:
        self.kept[send_id] = (key, sha256, model_bytes.tobytes())

    async def discard_received(self, send_id: str) -> None:
        self.kept.pop(send_id, None)

    async def got(self) -> list[tuple[str, str, bytes]]:
        return list(self.kept.values())


@ray.remote(num_cpus=0)
class Gate:
    """``bytes_`` ends only once the gate is opened: bytes that do not arrive until then."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()

    async def bytes_(self) -> np.ndarray:
        await self.opened.wait()
        return np.zeros(1, np.uint8)

    async def open(self) -> None:
        self.opened.set()


def _copies() -> ModelCopies:
    cutoffs = CutOffs()
    return ModelCopies(cutoffs.call, cutoffs.is_cut, asyncio.ensure_future)


def test_forgetting_a_node_forgets_only_the_copies_sent_there() -> None:
    copies = _copies()
    there, elsewhere = ModelCopy("ref-1", {"node-a", "node-b"}), ModelCopy("ref-2", {"node-c"})
    copies.copies = {"sha-1": there, "sha-2": elsewhere}
    copies.own_node = "node-c"
    copies.forget_node("node-c")                 # the pool's own node: a fresh put would land there again
    assert copies.copies == {"sha-1": there, "sha-2": elsewhere}
    copies.forget_node("node-a")
    assert copies.copies == {"sha-2": elsewhere}
    assert there.forgotten.is_set() and not elsewhere.forgotten.is_set()


def test_bytes_on_their_way_are_sent_again_from_a_fresh_copy(ray_local, tmp_path) -> None:
    data = np.arange(64, dtype=np.uint8)
    data.tofile(tmp_path / "model.onnx")
    art = ModelArtifact("m", None, tmp_path / "model.onnx", hashlib.sha256(data.tobytes()).hexdigest(), {})
    receiver, gate = Receiver.remote(), Gate.remote()

    async def scenario() -> tuple[ModelCopy, ModelCopy]:
        copies = _copies()
        stuck = ModelCopy(gate.bytes_.remote(), {"node-a"})
        copies.copies[art.sha256] = stuck
        sending = asyncio.ensure_future(copies.send("b1", receiver, "node-b", art))
        done, _ = await asyncio.wait({sending}, timeout=1.0)
        assert not done, "the bytes of the stuck copy arrived"
        copies.forget_node("node-a")             # node-a may be gone: the send goes on from a fresh copy
        await asyncio.wait_for(sending, 60)
        return stuck, copies.copies[art.sha256]

    try:
        stuck, fresh = asyncio.run(scenario())
        assert fresh is not stuck and fresh.ref != stuck.ref and fresh.nodes == {"node-b"}
        expected = [(art.key, art.sha256, data.tobytes())]
        assert ray.get(receiver.got.remote(), timeout=30) == expected
        # The stuck copy's bytes come after all: the abandoned send was cancelled, or what it kept is discarded.
        ray.get(gate.open.remote(), timeout=30)
        ray.get(stuck.ref, timeout=30)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            assert ray.get(receiver.got.remote(), timeout=30) == expected
            time.sleep(0.05)
    finally:
        ray.get(gate.open.remote(), timeout=30)
        ray.kill(receiver)
        ray.kill(gate)
