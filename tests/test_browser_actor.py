"""BrowserActor on real Ray and real Chromium: models run in the page and match numpy references."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import ray

from actors import priority
from actors.browser import BrowserFailure
from actors.browser_actor import BrowserActor
from events.errors import InputError
from sharding.coordinator import ShardChain, ShardStage, generate_tokens
from sharding.models import llama, llama_onnx, minilm
from sharding.models.registry import artifacts

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."]


def _pids_alive(pids) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] != "Z":   # zombies are dead, just not reaped yet
                    alive.append(pid)
        except (ProcessLookupError, FileNotFoundError):
            pass
    return alive


@pytest.fixture(scope="module")
def browser(ray_local):
    handle = BrowserActor.remote("test-browser", "chromium", 1)
    info = ray.get(handle.start.remote())
    yield handle, info
    health = ray.get(handle.health.remote())
    temp = health["temp_dir"]
    ray.get(handle.close.remote())
    ray.kill(handle)
    # Nothing left behind: no browser process, no temp folder.
    assert _pids_alive(health["pids"].values()) == []
    assert not os.path.exists(temp)


def _load(handle, art, backend="wasm"):
    data = np.fromfile(art.path, np.uint8)
    return ray.get(handle.load_model.remote(art.key, ray.put(data), art.sha256, backend))


def test_capabilities_reported(browser):
    _, info = browser
    assert "wasm" in info["backends"]
    assert info["detail"]["crossOriginIsolated"] is True
    # A backend the browser cannot use is left out with the reason (README, Limits: Linux Chromium exposes
    # navigator.ml but cannot create a WebNN context).
    assert "webnn" in info["backends"] or info["detail"]["webnnError"]
    assert info["pid"] > 0


def test_no_renderer_runs_the_browsers_own_ui(browser):
    """Chromium preloads its omnibox popups (WebUI) in a renderer of their own even when headless: ~0.9 s of CPU
    and ~50 MiB a start (docs/facts.md). The launch flags turn them off; a Chromium that renames the features
    brings that renderer back, and this fails."""
    handle, _ = browser
    renderers = {name: pid for name, pid in ray.get(handle.process_ids.remote()).items()
                 if name.startswith("renderer")}
    assert renderers
    for name, pid in renderers.items():
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert b"--top-chrome-webui" not in f.read(), (name, pid)     # one string: Chromium sets its title


def test_minilm_matches_numpy_reference(browser):
    handle, _ = browser
    [art] = artifacts("all-minilm-l6-v2")
    _load(handle, art)
    feeds = minilm.tokenize(SENTENCES)
    out = ray.get(handle.run.remote(art.key, feeds, fetch=["embedding"]))["outputs"]["embedding"]
    ref = minilm.reference_embed(SENTENCES)
    assert out.shape == (3, minilm.EMBED_DIM)
    assert np.abs(out - ref).max() <= 1e-4
    cosine = float(out[0] @ out[1])
    assert cosine == pytest.approx(0.7553, abs=0.002)


def test_bad_input_is_a_typed_error_and_the_browser_keeps_serving(browser):
    handle, _ = browser
    [art] = artifacts("all-minilm-l6-v2")
    _load(handle, art)          # loaded already when the module runs in order (a reload of held bytes is cheap)
    feeds = minilm.tokenize(SENTENCES[:1])
    with pytest.raises(InputError, match="not loaded"):
        ray.get(handle.run.remote("no-such-model", feeds))
    bad = dict(feeds, input_ids=feeds["input_ids"].astype(np.float32))     # wrong dtype
    with pytest.raises(InputError):
        ray.get(handle.run.remote(art.key, bad, fetch=["embedding"]))
    # JavaScript-looking input is data, not code.
    with pytest.raises(InputError, match="not loaded"):
        ray.get(handle.run.remote('"); window.close(); //', feeds))
    with pytest.raises(InputError, match="sha256"):
        ray.get(handle.load_model.remote("tampered", ray.put(np.zeros(10, np.uint8)), art.sha256))
    with pytest.raises(InputError, match="variant"):           # a fault's own options are checked too
        ray.get(handle.inject_fault.remote("corrupt_output", variant=4))
    with pytest.raises(InputError, match="unknown fault"):
        ray.get(handle.inject_fault.remote("corrupt_everything"))
    out = ray.get(handle.run.remote(art.key, feeds, fetch=["embedding"]))["outputs"]["embedding"]
    assert np.abs(out - minilm.reference_embed(SENTENCES[:1])).max() <= 1e-4


def test_tiny_llama_in_page_equals_cpu_onnxruntime(browser):
    handle, _ = browser
    model = llama.tiny_llama(seed=0)
    prompt = model.encode("hello webpool")
    [art] = artifacts("tiny-llama")
    _load(handle, art)
    stage = ShardStage("test-browser", handle, art)

    result = asyncio.run(generate_tokens(ShardChain([stage], "s1"), prompt, 12, eos_id=None))
    shard = llama_onnx.build_shards(model, [(0, model.config.n_layers)])
    expected = llama_onnx.ort_greedy_generate(shard, prompt, 12)
    assert result["token_ids"] == expected[:12]
    assert ray.get(handle.drop_state.remote(stage.state_id("s1")))


def test_webgpu_agrees_with_wasm_where_available(browser):
    """Where the browser reports WebGPU (here SwiftShader, a software adapter), the same models agree."""
    handle, info = browser
    if "webgpu" not in info["backends"]:
        reason = f"no WebGPU adapter in this browser: {info['detail'].get('webgpuError', 'none reported')}"
        if os.environ.get("CI"):        # CI's Chromium has SwiftShader's adapter: its absence is a defect there
            pytest.fail(reason)
        pytest.skip(reason)
    [art] = artifacts("all-minilm-l6-v2")
    ray.get(handle.load_model.remote(art.key + "#webgpu", ray.put(np.fromfile(art.path, np.uint8)), art.sha256,
                                     "webgpu"))
    feeds = minilm.tokenize(SENTENCES[:2])
    out = ray.get(handle.run.remote(art.key + "#webgpu", feeds, fetch=["embedding"]))["outputs"]["embedding"]
    assert np.abs(out - minilm.reference_embed(SENTENCES[:2])).max() <= 1e-3
    ray.get(handle.unload_model.remote(art.key + "#webgpu"))

    model = llama.tiny_llama(seed=0)
    [tiny] = artifacts("tiny-llama")
    tiny_gpu = ShardStage("test-browser", handle, tiny.__class__(tiny.model, "webgpu", tiny.path, tiny.sha256,
                                                                    tiny.meta))
    ray.get(handle.load_model.remote(tiny_gpu.artifact.key, ray.put(np.fromfile(tiny.path, np.uint8)),
                                     tiny.sha256, "webgpu"))
    prompt = model.encode("hello webpool")
    result = asyncio.run(generate_tokens(ShardChain([tiny_gpu], "s-gpu"), prompt, 8, eos_id=None))
    expected = llama_onnx.ort_greedy_generate(llama_onnx.build_shards(model, [(0, model.config.n_layers)]), prompt, 8)
    assert result["token_ids"] == expected[:8]
    ray.get(handle.unload_model.remote(tiny_gpu.artifact.key))


def test_crashed_page_is_detected_not_a_zombie(ray_local):
    handle = BrowserActor.remote("crash-browser", "chromium", 1)
    ray.get(handle.start.remote())
    ray.get(handle.inject_fault.remote("crash_page"))
    with pytest.raises(BrowserFailure) as err:
        ray.get(handle.health.remote())
    assert err.value.category.value == "crash"
    ray.get(handle.close.remote())
    ray.kill(handle)


def _spare_pid(handle, models: list[str], timeout: float = 60.0) -> int:
    """The spare process's PID once it is ready and holds ``models`` (it is prepared in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        health = ray.get(handle.health.remote())
        if health["spare_pid"] is not None and health["spare_models"] == models:
            return health["spare_pid"]
        assert time.monotonic() < deadline, f"no spare process holding {models} came up: {health['spare_pid']}"
        time.sleep(0.05)


# Where this user may give a thread the normal policy back, work for later runs in the background.
BACKGROUND = {os.SCHED_IDLE} if priority.can_restore() else {os.SCHED_OTHER}


def _until_policies(pid: int, wanted: set[int], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while (now := priority.policies_of(pid)) != wanted:
        assert time.monotonic() < deadline, f"threads of {pid}: policies {now}, not {wanted}"
        time.sleep(0.02)


def test_a_standby_is_built_in_the_background_for_at_most_its_bound(ray_local):
    """actors/priority.py: a browser started with ``background_s`` (as a standby is) runs every thread of every
    process at the idle policy, and at the normal one once that long has passed since its start, with no
    request. (The bound counts the launch: 6 s leaves room for a launch on a loaded machine.)"""
    handle = BrowserActor.remote("background-browser", "chromium", 1)
    try:
        info = ray.get(handle.start.remote(background_s=6.0))
        assert info["background"] is (BACKGROUND == {os.SCHED_IDLE}) and priority.policies_of(info["pid"]) == BACKGROUND
        _until_policies(info["pid"], {os.SCHED_OTHER})
        assert ray.get(handle.health.remote())["background"] is False
    finally:
        ray.get(handle.close.remote())
        ray.kill(handle)


def test_a_background_start_beside_work_that_keeps_every_core_busy_ends_at_its_bound(ray_local):
    """The bound runs from the start's beginning: in the background, a Chromium launched beside normal work that
    keeps every core busy gets no CPU. Its start used to wait out the DevTools port's 15 s and fail, so a pool's
    standby never came (seen beside two busy loops). Real busy loops, one per core, ended by PID."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    handle = BrowserActor.remote("busy-background-browser", "chromium", 1)
    try:
        info = ray.get(handle.start.remote(background_s=1.0), timeout=120)
        assert info["background"] is False and priority.policies_of(info["pid"]) == {os.SCHED_OTHER}, info
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
        ray.get(handle.close.remote())
        ray.kill(handle)


def test_a_restart_takes_the_spare_process_which_holds_only_the_browsers_own_models(ray_local):
    """Also: a browser started in the background (a standby) stays there through loads and standby runs, and
    its first run that is not a standby's gives it the normal policy; its spare runs at the normal one."""
    handle = BrowserActor.remote("spare-browser", "chromium", 1, spare_process=True)
    info = ray.get(handle.start.remote(background_s=600.0))
    assert info["background"] is (BACKGROUND == {os.SCHED_IDLE}) and priority.policies_of(info["pid"]) == BACKGROUND
    [art] = artifacts("all-minilm-l6-v2")
    feeds = minilm.tokenize(SENTENCES)
    ref = minilm.reference_embed(SENTENCES)
    try:
        _load(handle, art)
        # A spare is kept once the browser has served: a load alone (a standby warming up) starts none, nor
        # does a run on a standby (a hedge's copy), which leaves it in the background too.
        assert ray.get(handle.health.remote())["spare_expected"] is False
        ray.get(handle.run.remote(art.key, feeds, fetch=["embedding"], standby=True))
        assert ray.get(handle.health.remote())["spare_expected"] is False
        assert priority.policies_of(info["pid"]) == BACKGROUND
        ray.get(handle.run.remote(art.key, feeds, fetch=["embedding"]))
        _until_policies(info["pid"], {os.SCHED_OTHER})
        spare = _spare_pid(handle, [art.key])
        assert priority.policies_of(spare) == {os.SCHED_OTHER}
        health = ray.get(handle.health.remote())
        assert health["spare_expected"] is True
        # README: the spare is not counted against memory_limit_mb: its processes are not the browser's
        # (whose PSS the ceiling is checked against), and its memory is reported apart.
        assert spare not in health["pids"].values() and health["spare_memory_bytes"] > 0
        assert health["memory_bytes"] > 0
        old = ray.get(handle.health.remote())["pid"]
        assert spare != old
        ray.get(handle.inject_fault.remote("kill_browser"))
        info = ray.get(handle.restart.remote())
        assert info["from_spare"] is True and info["pid"] == spare
        # The process taken over holds the browser's model (same verified bytes) and nothing else: no
        # generation state, no run has been made in it.
        health = ray.get(handle.health.remote())
        assert health["models"] == [art.key] and health["states"] == [] and health["runs_started"] == 0
        assert health["spare_pid"] is None
        assert _load(handle, art)["alreadyLoaded"] is True
        out = ray.get(handle.run.remote(art.key, feeds, fetch=["embedding"]))["outputs"]["embedding"]
        assert np.abs(out - ref).max() <= 1e-4
        spare = _spare_pid(handle, [art.key])      # the next spare, for the next restart
        # A spare that died meanwhile is not taken: the restart launches, serves, and a new spare follows. (Dead,
        # not only sent SIGKILL: a process takes a moment to exit on busy cores.)
        os.kill(spare, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _pids_alive([spare]):
            assert time.monotonic() < deadline, "the spare never exited"
            time.sleep(0.01)
        ray.get(handle.inject_fault.remote("kill_browser"))
        info = ray.get(handle.restart.remote())
        assert info["from_spare"] is False and info["pid"] != spare
        assert not _load(handle, art).get("alreadyLoaded")
        out = ray.get(handle.run.remote(art.key, feeds, fetch=["embedding"]))["outputs"]["embedding"]
        assert np.abs(out - ref).max() <= 1e-4
        assert _spare_pid(handle, [art.key]) != spare
        # A model the browser drops leaves its spare too.
        assert ray.get(handle.unload_model.remote(art.key))
        spare = _spare_pid(handle, [])
    finally:
        health = ray.get(handle.health.remote())
        ray.get(handle.close.remote())
        ray.kill(handle)
    assert _pids_alive([*health["pids"].values(), spare]) == []
    assert not os.path.exists(health["temp_dir"])


def test_a_browser_type_that_cannot_be_driven_falls_back_and_says_so(monkeypatch, caplog):
    """README: Firefox (no CDP) or a type not installed falls back along chromium -> chrome -> edge, logged;
    none installed is a BrowserNotFoundError that says how to install one."""
    import logging

    from actors import chromium

    with caplog.at_level(logging.WARNING, logger="actors.chromium"):
        exe = chromium.resolve_browser("firefox")
    assert exe.browser_type in chromium.SUPPORTED_TYPES and os.access(exe.path, os.X_OK)
    assert f"browser type firefox is not available; using {exe.browser_type}" in caplog.text
    # The order: whichever of chromium -> chrome -> edge is installed first (only these two here).
    tried: list[str] = []

    def only(installed: set[str]):
        def find(browser_type: str):
            tried.append(browser_type)
            return chromium.BrowserExecutable(browser_type, f"/opt/{browser_type}") if browser_type in installed \
                else None
        return find

    monkeypatch.setattr(chromium, "find_executable", only({"chrome", "edge"}))
    assert chromium.resolve_browser("firefox").browser_type == "chrome"
    assert tried == ["firefox", "chromium", "chrome"]
    tried.clear()
    monkeypatch.setattr(chromium, "find_executable", only({"edge"}))
    assert chromium.resolve_browser("chromium").browser_type == "edge"
    assert tried == ["chromium", "chrome", "edge"]
    monkeypatch.setattr(chromium, "find_executable", lambda _type: None)
    with pytest.raises(chromium.BrowserNotFoundError, match="apt-get install chromium"):
        chromium.resolve_browser("chromium")


def test_a_distribution_launcher_script_is_replaced_by_the_binary_behind_it(tmp_path, monkeypatch):
    """Debian's /usr/bin/chromium is a shell script that execs /usr/lib/chromium/chromium: webpool launches the
    binary itself (no script, no /etc/chromium.d flags). Anything that is not such a script is kept as found."""
    import shutil as sh

    from actors import chromium

    (tmp_path / "bin").mkdir()
    (tmp_path / "lib" / "chromium").mkdir(parents=True)
    monkeypatch.setattr(chromium, "LAUNCHER_LIB_ROOT", str(tmp_path / "lib"))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.delenv("WEBPOOL_CHROMIUM", raising=False)
    script = tmp_path / "bin" / "chromium"
    script.write_text('#!/bin/sh\nexec /usr/lib/chromium/chromium "$@"\n')
    script.chmod(0o755)
    assert chromium.find_executable("chromium").path == str(script)     # no binary behind it: kept
    binary = tmp_path / "lib" / "chromium" / "chromium"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    assert chromium.find_executable("chromium").path == str(script)     # not an ELF binary: kept
    sh.copyfile("/bin/true", binary)
    binary.chmod(0o755)
    assert chromium.find_executable("chromium").path == str(binary)     # the binary behind the script
    script.unlink()
    sh.copyfile("/bin/true", script)
    script.chmod(0o755)
    assert chromium.find_executable("chromium").path == str(script)     # a binary on PATH is launched as found
    assert chromium.unwrapped(str(tmp_path / "missing")) == str(tmp_path / "missing")
