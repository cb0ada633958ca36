"""Page isolation: a page can reach only its own served origin. Outside fetches, WebSockets (even to
a live server on loopback) and navigations away are blocked, counted, and the browser keeps serving.

The probe runs in-process on BrowserCore (the object the actor wraps) so the test can act as hostile
code inside the page; the production API has no way to run caller-supplied JavaScript.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time

import numpy as np
import pytest

from actors.browser import BrowserCore
from sharding.models import minilm
from sharding.models.registry import artifacts


@pytest.fixture
def listener():
    """A real TCP server on loopback that records whether anything connected to it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(4)
    connected: list[tuple] = []

    def accept():
        try:
            conn, peer = server.accept()
            conn.settimeout(1)
            try:
                data = conn.recv(300)
            except OSError:
                data = b""
            connected.append((peer, data))
            conn.close()
        except OSError:
            pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1], connected
    server.close()
    thread.join(5)


async def _probe_page(core: BrowserCore, port: int) -> dict:
    """Hostile code in ``core``'s page: a fetch, a WebSocket and a navigation to ``port``; then the page must
    still serve MiniLM correctly."""
    before = len(core.blocked_requests)
    result = await core.page.evaluate("""async (port) => {
        const out = {};
        try { await fetch(`http://127.0.0.1:${port}/steal`); out.fetch = "reached"; }
        catch (e) { out.fetch = "blocked"; }
        out.ws = await new Promise((resolve) => {
            const ws = new WebSocket(`ws://127.0.0.1:${port}/x`);
            ws.onopen = () => resolve("open");
            ws.onclose = (e) => resolve("closed " + e.code);
            ws.onerror = () => resolve("error");
        });
        return out;
    }""", port)
    url_before = core.page.url
    await core.page.evaluate("(port) => { location.href = `http://127.0.0.1:${port}/away`; }", port)
    # The navigation is counted when its route is aborted, after evaluate returns.
    deadline = time.monotonic() + 10
    while len(core.blocked_requests) - before < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    result["url_kept"] = core.page.url == url_before
    result["blocked"] = len(core.blocked_requests) - before
    [art] = artifacts("all-minilm-l6-v2")
    await core.load_model(art.key, np.fromfile(art.path, np.uint8), art.sha256, "wasm")
    out = await core.run(art.key, minilm.tokenize(["still serving"]), fetch=["embedding"])
    result["embedding"] = out["outputs"]["embedding"]
    result["health_blocked"] = (await core.health())["blocked_requests"]
    return result


async def _probe(port: int) -> dict:
    core = BrowserCore("isolation-browser")
    await core.start()
    try:
        return await _probe_page(core, port)
    finally:
        await core.close()


# What a page can leave behind, in each place a page stores something, and what a later page finds there.
LEAVE = """async () => {
    localStorage.setItem("left", "secret");
    sessionStorage.setItem("left", "secret");
    document.cookie = "left=secret; max-age=3600";
    await new Promise((resolve, reject) => {
        const open = indexedDB.open("left", 1);
        open.onupgradeneeded = () => open.result.createObjectStore("s");
        open.onsuccess = () => { open.result.close(); resolve(); };
        open.onerror = () => reject(open.error);
    });
    await (await caches.open("left")).put("/left", new Response("secret"));
    globalThis.left = "secret";
}"""
FIND = """async () => ({
    local: localStorage.getItem("left"), session: sessionStorage.getItem("left"), cookie: document.cookie,
    indexedDB: (await indexedDB.databases()).map((d) => d.name), caches: await caches.keys(),
    global: globalThis.left ?? null,
})"""


async def _restart_from_the_spare(port: int) -> dict:
    core = BrowserCore("isolation-spare", spare_process=True)
    await core.start()
    try:
        [art] = artifacts("all-minilm-l6-v2")
        await core.load_model(art.key, np.fromfile(art.path, np.uint8), art.sha256, "wasm")
        await core.run(art.key, minilm.tokenize(["first"]), fetch=["embedding"])     # served: a spare is kept
        await core.page.evaluate(LEAVE)
        left = await core.page.evaluate(FIND)
        deadline = time.monotonic() + 60
        while not core.spares.ready():
            assert time.monotonic() < deadline, "no spare process came up"
            await asyncio.sleep(0.05)
        info = await core.restart()
        return {"from_spare": info["from_spare"], "left": left, "found": await core.page.evaluate(FIND),
                "probe": await _probe_page(core, port)}
    finally:
        await core.close()


def test_outside_requests_websockets_and_navigation_are_blocked(listener):
    port, connected = listener
    tmpdir = os.environ.get("TMPDIR")
    result = asyncio.run(_probe(port))
    # The browser pointed TMPDIR into its own folder while it ran; closed, it leaves this process as it was
    # (what the process starts next must not inherit a removed folder).
    assert os.environ.get("TMPDIR") == tmpdir
    assert result["fetch"] == "blocked"
    assert result["ws"] != "open"
    assert result["url_kept"], "navigation away was blocked"
    # No request reached the outside server: not one byte. (Chromium may still open a speculative TCP
    # connection without sending anything when a navigation starts; see the README's limits.)
    assert all(data == b"" for _peer, data in connected), connected
    assert result["blocked"] >= 3 and result["health_blocked"] >= 3     # counted, visible in health
    assert np.abs(result["embedding"] - minilm.reference_embed(["still serving"])).max() <= 1e-4


def test_the_page_a_restart_takes_from_the_spare_is_isolated_and_holds_nothing_of_the_old_one(listener):
    """README: a spare's page is isolated like any other, and nothing an earlier page stored (storage,
    cookies, IndexedDB, Cache Storage, globals) reaches the page that serves after a restart from it."""
    port, connected = listener
    result = asyncio.run(_restart_from_the_spare(port))
    assert result["from_spare"] is True
    assert result["left"] == {"local": "secret", "session": "secret", "cookie": "left=secret", "indexedDB": ["left"],
                              "caches": ["left"], "global": "secret"}, "the old page stored what it left"
    assert result["found"] == {"local": None, "session": None, "cookie": "", "indexedDB": [], "caches": [],
                               "global": None}
    probe = result["probe"]
    assert probe["fetch"] == "blocked" and probe["ws"] != "open" and probe["url_kept"]
    assert all(data == b"" for _peer, data in connected), connected
    assert probe["blocked"] >= 3 and probe["health_blocked"] >= 3
    assert np.abs(probe["embedding"] - minilm.reference_embed(["still serving"])).max() <= 1e-4


def test_devtools_listen_on_loopback_only_and_the_sandbox_is_off_only_as_root(monkeypatch, tmp_path):
    """README's security notes: DevTools on 127.0.0.1 at a port the kernel picks; Chromium's sandbox stays on
    unless webpool runs as root (where Chromium refuses to start with it)."""
    from actors import chromium

    monkeypatch.setattr(chromium.os, "geteuid", lambda: 1000)
    flags = chromium.chromium_flags(tmp_path)
    assert "--remote-debugging-address=127.0.0.1" in flags and "--remote-debugging-port=0" in flags
    assert "--no-sandbox" not in flags and f"--user-data-dir={tmp_path}" in flags
    monkeypatch.setattr(chromium.os, "geteuid", lambda: 0)
    assert "--no-sandbox" in chromium.chromium_flags(tmp_path)


def test_the_page_server_serves_only_its_own_files_under_its_secret_prefix():
    """README: the page server listens on 127.0.0.1 under an unguessable path prefix and serves only its page,
    runtime, onnxruntime-web files and the model bytes it was handed (until dropped); anything else is a 404."""
    import urllib.error
    import urllib.request

    from actors.page_server import PageServer

    async def fetch(url: str) -> int:
        def get() -> int:
            try:
                with urllib.request.urlopen(url, timeout=10) as answer:
                    return answer.status
            except urllib.error.HTTPError as err:
                return err.code
        return await asyncio.to_thread(get)

    async def main() -> None:
        a, b = PageServer(), PageServer()
        assert a.prefix != b.prefix and len(a.prefix) > 20
        await a.start()
        try:
            assert a.origin.startswith("http://127.0.0.1:")
            blob = a.put_blob("model", memoryview(b"weights"))
            assert await fetch(a.base_url + "runtime.js") == 200 and await fetch(blob) == 200
            for outside in (f"{a.origin}/runtime.js", f"{a.origin}{b.prefix}/runtime.js",
                            a.base_url + "../actors/constants.py", a.base_url + "%2e%2e/README.md",
                            a.base_url + "blobs/guessed", a.base_url + "index.html/.."):
                assert await fetch(outside) == 404, outside
            a.drop_blob(blob)
            assert await fetch(blob) == 404
        finally:
            await a.stop()

    asyncio.run(main())


def test_a_request_sent_between_bind_and_start_is_served_once_the_server_starts():
    """The browser is launched at the page's URL when the server has only bound its port (BrowserCore.start sets
    the server up meanwhile): a request that arrives before ``start`` waits in the socket's backlog and is then
    answered, with the isolation headers. A server bound and stopped without serving frees its port."""
    import urllib.request

    from actors.page_server import ISOLATION_HEADERS, PageServer

    async def main() -> None:
        server = PageServer()
        server.bind()
        assert server.port > 0
        early = asyncio.ensure_future(asyncio.to_thread(urllib.request.urlopen, server.base_url + "runtime.js",
                                                        timeout=10))
        await asyncio.sleep(0.2)
        assert not early.done(), "answered before the server was started"
        await server.start()
        try:
            with await early as answer:
                assert answer.status == 200 and answer.read(1)
                assert all(answer.headers[k] == v for k, v in ISOLATION_HEADERS.items())
        finally:
            await server.stop()

        unused = PageServer()
        unused.bind()
        port = unused.port
        await unused.stop()
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))       # free again

    asyncio.run(main())
