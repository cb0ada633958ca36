"""Real faults, made to happen in a browser on purpose: the fault matrix of the tests, the benchmarks and
the CLI (``webpool inject``). Each one is the real thing (a process SIGKILLed, a page crashed over CDP, a
connection cut at the relay, a script that never yields), so what follows is the production path.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

from actors.browser import BrowserCore
from actors.constants import EXFILTRATE_COUNT_WAIT, HANG_ARM_WAIT, HEALTH_TIMEOUT, LOAD_MODEL_TIMEOUT
from events.errors import BrowserFailure, InputError, show

FAULTS = ("crash_page", "kill_renderer", "kill_browser", "kill_gpu", "hang", "disconnect", "exhaust_memory",
          "corrupt_output", "exfiltrate", "slow")
CORRUPT_VARIANTS = 3     # the ways a page can be wrong (actors/page/runtime.js, corrupt)

# What hostile model code would try: send data out by fetch, open a WebSocket, navigate away. ``url`` is
# an argument, never part of the source.
_EXFILTRATE_JS = """async (url) => {
    const out = {};
    try { await fetch(url, {method: "POST", body: "secret"}); out.fetch = "reached"; }
    catch (e) { out.fetch = "blocked"; }
    out.websocket = await new Promise((resolve) => {
        let ws;
        try { ws = new WebSocket(url.replace(/^http/, "ws")); } catch (e) { resolve("refused"); return; }
        ws.onopen = () => resolve("open");
        ws.onclose = (e) => resolve("closed " + e.code);
        ws.onerror = () => resolve("error");
    });
    setTimeout(() => { location.href = url; }, 0);
    return out;
}"""


async def inject_fault(core: BrowserCore, kind: str, mb: int = 256,
                       url: str = "http://127.0.0.1:9/exfiltrate", factor: float = 6.0,
                       variant: int = 1) -> dict[str, Any]:
    """Make a real fault happen in ``core``'s browser (for tests, benchmarks and the CLI).

    crash_page: CDP Page.crash; kill_renderer / kill_browser / kill_gpu: SIGKILL of that process;
    hang: ``while(true){}`` in the page, queued ahead of any later call; disconnect: cut the CDP connection
    at the relay (the browser lives on);
    exhaust_memory: the page allocates and touches ``mb`` MiB beyond the browser's memory ceiling;
    corrupt_output: the page returns wrong numbers from then on (a dissenter for voting); browsers given
    different ``variant`` s (1-3) are also wrong differently (no majority), and ``variant=0`` ends the fault;
    exfiltrate: the page tries to send data to ``url`` by fetch, WebSocket and navigation (all blocked);
    slow: the page's CPU is throttled ``factor`` times (CDP Emulation.setCPUThrottlingRate): a degraded
    browser that still answers correctly.
    """
    if kind not in FAULTS:
        raise InputError("kind", f"unknown fault {kind!r}; one of {', '.join(FAULTS)}")
    assert core.page is not None and core.browser is not None and core.proc is not None
    pids = await core.process_ids() if kind.startswith("kill_") else {}
    if kind == "crash_page":
        session = await core.page.context.new_cdp_session(core.page)
        # The send never resolves once the page is gone: fire and forget.
        asyncio.ensure_future(session.send("Page.crash")).add_done_callback(lambda f: f.exception())
    elif kind == "kill_browser":
        os.kill(core.proc.pid, signal.SIGKILL)
    elif kind in ("kill_renderer", "kill_gpu"):
        wanted = "renderer" if kind == "kill_renderer" else "GPU"
        victims = [pid for name, pid in pids.items() if name.split(":")[0] == wanted]
        if not victims:
            raise InputError("kind", f"browser {core.browser_id} has no {wanted} process to kill")
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
    elif kind == "hang":
        # Armed by an answered call, run as the page's next task: when this returns the loop is queued in
        # the page ahead of any later call, so the call after a hang meets the hang. (A loop sent without
        # waiting could reach the page after a call sent later: that call's run then started first.) A page
        # busy with a run answers when the run yields; one already hung never does: the loop stays queued.
        arming = asyncio.ensure_future(core.page.evaluate("() => { setTimeout(() => { while (true) {} }, 0); }"))
        arming.add_done_callback(lambda f: f.cancelled() or f.exception())
        await asyncio.wait([arming], timeout=HANG_ARM_WAIT)
    elif kind == "exhaust_memory":
        try:
            await core._call("allocateBallast", [int(mb)], LOAD_MODEL_TIMEOUT)
        except BrowserFailure as exc:      # the renderer ran out of memory before the ceiling was seen
            return {"fault": kind, "browser_id": core.browser_id, "effect": str(exc).splitlines()[0]}
    elif kind == "corrupt_output":
        if isinstance(variant, bool) or not isinstance(variant, int) or not 0 <= variant <= CORRUPT_VARIANTS:
            raise InputError("variant", f"must be an int in [0, {CORRUPT_VARIANTS}], got {show(variant)}")
        await core._call("setCorrupt", [variant], HEALTH_TIMEOUT)
    elif kind == "slow":
        if isinstance(factor, bool) or not isinstance(factor, int | float) or not 1 <= factor <= 100:
            raise InputError("factor", f"must be a number in [1, 100], got {show(factor)}")
        assert core.page_cdp is not None
        await core.page_cdp.send("Emulation.setCPUThrottlingRate", {"rate": float(factor)})
    elif kind == "exfiltrate":
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise InputError("url", f"must be an http(s) URL, got {show(url)}")
        before = len(core.blocked_requests)
        attempts = await core.page.evaluate(_EXFILTRATE_JS, url)
        # The navigation starts after the script returns and is counted when its route is aborted:
        # return once all three attempts are counted, so a health check right after sees them.
        deadline = time.monotonic() + EXFILTRATE_COUNT_WAIT
        while len(core.blocked_requests) - before < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return {"fault": kind, "browser_id": core.browser_id, "attempts": attempts,
                "blocked": len(core.blocked_requests) - before}
    elif kind == "disconnect":
        # Both ends of Playwright's connection are closed under it, the browser untouched: what follows
        # (the disconnected event, the probe of the browser's own port) is the production path.
        assert core.relay is not None
        return {"fault": kind, "browser_id": core.browser_id, "sockets_closed": core.relay.cut()}
    return {"fault": kind, "browser_id": core.browser_id, "pids": pids}
