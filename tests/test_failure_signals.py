"""Each failure signal of a browser, on real Chromium: the category comes from the signal that came.

- a cut CDP connection (the relay closes both ends; the browser lives) is CONNECTION, and a reconnect
  finds the page with its model;
- a SIGKILLed browser is CRASH, with or without calls in flight (its exit, from a pidfd, or the port
  that refuses after the connection drops);
- a renderer killed or a page crashed under concurrent runs is CRASH for every run, never bad input;
- a hang is TIMEOUT at its budget, and the page goes on (resume) once its script is terminated, unless
  the termination cut a run off mid-way;
- the runtime's typed errors: a bad request is InputError, anything else the browser's.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import numpy as np
import pytest
import ray

from actors.browser_actor import BrowserActor
from actors.cdp_relay import CdpRelay
from actors.failure_signal import runtime_error
from events.errors import BrowserFailure, FailureCategory, InputError
from sharding.models import minilm
from sharding.models.registry import artifacts

SENTENCES = [f"Sentence number {i} is about failure signals." for i in range(24)]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


# ----- the relay, on its own ------------------------------------------------------------------------
async def _echo_server() -> tuple[asyncio.Server, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_relay_passes_bytes_in_order_and_a_cut_closes_both_ends_but_not_the_relay():
    async def scenario() -> None:
        server, port = await _echo_server()
        relay = CdpRelay()
        await relay.start(port)
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        payload = os.urandom(3 << 20)                       # larger than any socket buffer: backpressure
        writer.write(payload)
        assert await reader.readexactly(len(payload)) == payload
        assert relay.cut() == 2                             # the client's end and the upstream end
        assert await reader.read() == b""                   # the client sees the connection end
        writer.close()
        # The relay still listens: a new connection (a reconnect) goes through.
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(b"again")
        assert await reader.readexactly(5) == b"again"
        writer.close()
        await relay.close()
        server.close()

    asyncio.run(scenario())


def test_relay_closes_a_client_whose_upstream_refuses():
    async def scenario() -> None:
        server, port = await _echo_server()
        server.close()
        await server.wait_closed()                          # nothing listens there any more
        relay = CdpRelay()
        await relay.start(port)
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        assert await reader.read() == b""
        writer.close()
        await relay.close()

    asyncio.run(scenario())


# ----- the runtime's typed errors (pure) -------------------------------------------------------------
@pytest.mark.parametrize(("error", "expected"), [
    ({"name": "RequestError", "message": "input ids: 3 bytes do not fit"}, InputError),
    ({"name": "DeviceLostError", "message": "destroyed"}, FailureCategory.DEVICE_LOST),
    ({"name": "DeadlineExceeded", "message": "the caller's deadline passed"}, FailureCategory.TIMEOUT),
    ({"name": "RangeError", "message": "Array buffer allocation failed"}, FailureCategory.MEMORY),
    ({"name": "Error", "message": "failed to call OrtRun(). ERROR_CODE: 6"}, FailureCategory.UNKNOWN),
    ({"name": "TypeError", "message": "x is not a function"}, FailureCategory.UNKNOWN),
    ({}, FailureCategory.UNKNOWN),
])
def test_only_a_request_error_blames_the_request(error, expected):
    exc = runtime_error("b1", error)
    if expected is InputError:
        assert isinstance(exc, InputError)
    else:
        assert isinstance(exc, BrowserFailure) and exc.category is expected


# ----- real browsers ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(ray_local):
    """One browser actor with MiniLM loaded; tests that break it restart it before they return."""
    [art] = artifacts("all-minilm-l6-v2")
    handle = BrowserActor.remote("signals-browser", "chromium", 1)
    ray.get(handle.start.remote())
    data = ray.put(np.fromfile(art.path, np.uint8))

    def load() -> None:
        ray.get(handle.load_model.remote(art.key, data, art.sha256, "wasm"))

    load()
    yield handle, art, load
    ray.get(handle.close.remote())
    ray.kill(handle)


def _check_answer(handle, art, texts) -> None:
    out = ray.get(handle.run.remote(art.key, minilm.tokenize(texts), fetch=["embedding"]))["outputs"]["embedding"]
    assert np.abs(out - minilm.reference_embed(texts)).max() <= 1e-4


def _failures(refs) -> list[BaseException]:
    """The error each call ended in (None for a call that was answered)."""
    out = []
    for ref in refs:
        try:
            ray.get(ref)
            out.append(None)
        except BrowserFailure as exc:
            out.append(exc)
    return out


def test_a_cut_connection_is_connection_the_browser_lives_and_reconnect_keeps_the_model(served):
    handle, art, _ = served
    pid = ray.get(handle.health.remote())["pids"]["browser"]
    running = handle.run.remote(art.key, minilm.tokenize(SENTENCES), fetch=["embedding"])
    fault = ray.get(handle.inject_fault.remote("disconnect"))
    assert fault["sockets_closed"] >= 2
    with pytest.raises(BrowserFailure) as err:
        ray.get(running)
    assert err.value.category is FailureCategory.CONNECTION, err.value
    assert "the browser lives" in str(err.value)
    assert _alive(pid)
    with pytest.raises(BrowserFailure) as err:               # a zombie never answers
        ray.get(handle.health.remote())
    assert err.value.category is FailureCategory.CONNECTION
    back = ray.get(handle.reconnect.remote())
    assert art.key in back["models"]                         # the page and its model were kept
    assert ray.get(handle.health.remote())["pids"]["browser"] == pid
    _check_answer(handle, art, SENTENCES[:3])


def test_a_killed_browser_is_a_crash_with_or_without_calls_in_flight(served):
    handle, art, load = served
    for in_flight in (0, 4):
        pid = ray.get(handle.health.remote())["pids"]["browser"]
        feeds = minilm.tokenize(SENTENCES)
        refs = [handle.run.remote(art.key, feeds, fetch=["embedding"]) for _ in range(in_flight)]
        os.kill(pid, signal.SIGKILL)
        failures = _failures(refs) + _failures([handle.health.remote()])
        assert all(f is not None and f.category is FailureCategory.CRASH for f in failures), failures
        assert "exited" in str(failures[-1])
        ray.get(handle.restart.remote())
        load()
    _check_answer(handle, art, SENTENCES[:2])


@pytest.mark.parametrize("fault", ["kill_renderer", "crash_page"])
def test_a_page_that_dies_under_concurrent_runs_is_a_crash_for_every_run(served, fault):
    """Runs that finish before the fault takes effect are answered; every other one is a CRASH, none bad
    input. (``Page.crash`` takes effect only when the page's running JavaScript task ends, so under
    load the queued runs may all be answered before it lands; the crash then shows in ``health``.)"""
    handle, art, load = served
    feeds = minilm.tokenize(SENTENCES)
    refs = [handle.run.remote(art.key, feeds, fetch=["embedding"]) for _ in range(6)]
    ray.get(handle.inject_fault.remote(fault))
    try:
        failures = _failures(refs)
        assert all(f is None or f.category is FailureCategory.CRASH for f in failures), failures
        if fault == "kill_renderer":                     # a SIGKILL ends the page at once
            assert any(f is not None for f in failures), failures
        crash = _health_failure(handle)
        assert crash is not None and crash.category is FailureCategory.CRASH, crash
    finally:
        ray.get(handle.restart.remote())
        load()
    _check_answer(handle, art, SENTENCES[:2])


def _health_failure(handle, deadline_s: float = 60.0) -> BrowserFailure | None:
    """The failure ``health`` reports once the fault's signal has come (None if none by the deadline,
    a hang guard: the signal comes in milliseconds once the page's task ends)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            ray.get(handle.health.remote())
        except BrowserFailure as exc:
            return exc
        time.sleep(0.05)
    return None


def test_a_hang_is_a_timeout_and_the_same_page_resumes_with_its_model(served):
    handle, art, _ = served
    pid = ray.get(handle.health.remote())["pids"]["browser"]
    runs = ray.get(handle.health.remote())["runs_started"]
    ray.get(handle.inject_fault.remote("hang"))
    with pytest.raises(BrowserFailure) as err:       # its budget ends the hung script (terminateExecution)
        ray.get(handle.run.remote(art.key, minilm.tokenize(SENTENCES), fetch=["embedding"], timeout=1.0))
    assert err.value.category is FailureCategory.TIMEOUT, err.value
    back = ray.get(handle.resume.remote())                   # the loop was terminated: nothing to replace
    assert art.key in back["models"]
    after = ray.get(handle.health.remote())
    assert after["pids"]["browser"] == pid
    # The run that waited behind the loop reached the page after its deadline: it was never started.
    assert after["runs_started"] == runs
    _check_answer(handle, art, SENTENCES[:3])


def test_a_run_its_budget_cut_off_mid_way_cannot_be_resumed(served):
    """Terminating a script inside a model run leaves that run unfinished for good (and every later run
    of the model behind it): resume and reconnect refuse, and a restart serves again."""
    handle, art, load = served
    ray.get(handle.inject_fault.remote("slow", factor=20))   # the run is surely under way at its deadline
    try:
        with pytest.raises(BrowserFailure) as err:
            ray.get(handle.run.remote(art.key, minilm.tokenize(SENTENCES), fetch=["embedding"], timeout=1.0))
        assert err.value.category is FailureCategory.TIMEOUT, err.value
        with pytest.raises(BrowserFailure, match="cannot resume"):
            ray.get(handle.resume.remote())
        with pytest.raises(BrowserFailure, match="cannot reconnect"):     # the same stuck page: no
            ray.get(handle.reconnect.remote())
    finally:
        ray.get(handle.restart.remote())
        load()
    _check_answer(handle, art, SENTENCES[:2])


def test_loading_a_model_the_page_holds_is_idempotent(served):
    """A load whose answer was lost (a connection cut mid-load) is retried after the reconnect: the
    page answers it at once from the session it holds, concurrent loads of one key join one load."""
    handle, art, _ = served
    data = ray.put(np.fromfile(art.path, np.uint8))
    again = ray.get([handle.load_model.remote(art.key, data, art.sha256, "wasm") for _ in range(2)])
    assert all(r["alreadyLoaded"] for r in again), again
    for other in [b for b in ray.get(handle.health.remote())["backends"] if b != "wasm"]:
        with pytest.raises(InputError, match="already loaded on wasm"):
            ray.get(handle.load_model.remote(art.key, data, art.sha256, other))
    _check_answer(handle, art, SENTENCES[:1])


def test_a_bad_request_is_input_error_from_the_runtime_and_the_page_serves_on(served):
    handle, art, _ = served
    feeds = minilm.tokenize(SENTENCES[:1])
    with pytest.raises(InputError, match="missing"):
        ray.get(handle.run.remote(art.key, {"input_ids": feeds["input_ids"]}, fetch=["embedding"]))
    wrong_rank = dict(feeds, input_ids=feeds["input_ids"].reshape(-1))
    with pytest.raises(InputError):
        ray.get(handle.run.remote(art.key, wrong_rank, fetch=["embedding"]))
    with pytest.raises(InputError, match="not loaded"):
        ray.get(handle.run.remote("no-such-model", feeds))
    _check_answer(handle, art, SENTENCES[:1])


def test_a_lost_gpu_device_is_device_lost_and_a_restart_serves_again(served):
    """kill_gpu on a page whose model runs on WebGPU (SwiftShader here): the run is DEVICE_LOST, and so
    is the browser from then on (onnxruntime-web keeps its first device for the page's life, so only a
    new page can serve WebGPU again); a restart serves again."""
    handle, art, load = served
    info = ray.get(handle.health.remote())
    if "webgpu" not in info["backends"]:
        reason = f"no WebGPU adapter in this browser: {info['detail'].get('webgpuError', 'none reported')}"
        if os.environ.get("CI"):        # CI's Chromium has SwiftShader's adapter: its absence is a defect there
            pytest.fail(reason)
        pytest.skip(reason)
    key = art.key + "#webgpu"
    ray.get(handle.load_model.remote(key, ray.put(np.fromfile(art.path, np.uint8)), art.sha256, "webgpu"))
    feeds = minilm.tokenize(SENTENCES[:2])
    ray.get(handle.inject_fault.remote("kill_gpu"))
    with pytest.raises(BrowserFailure) as err:
        ray.get(handle.run.remote(key, feeds, fetch=["embedding"]))
    assert err.value.category is FailureCategory.DEVICE_LOST, err.value
    with pytest.raises(BrowserFailure) as err:
        ray.get(handle.health.remote())
    assert err.value.category is FailureCategory.DEVICE_LOST, err.value
    ray.get(handle.restart.remote())
    load()
    _check_answer(handle, art, SENTENCES[:1])
