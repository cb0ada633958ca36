"""Page isolation: a runtime page may reach only its own served origin.

Every request the page makes passes through a Playwright route: one under the page server's base URL
goes on, anything else is refused and its URL listed (health reports the list; the pool records it as
``PageRequestsBlocked``). A navigation away is answered ``204`` so the page stays where it is (an aborted
navigation would replace the runtime with an error page); a WebSocket is closed at once (the page has
no reason to open one). Routing turns Chromium's HTTP cache off for the page (Playwright's doing); a
cross-launch code cache was measured to gain nothing here anyway (docs/facts.md).

A browser opens its runtime page as it is launched, before Playwright is connected (the runtime's set-up
overlaps the driver's start): the route is attached once it is, so the page's first requests, for
webpool's own runtime files from its own origin, are not routed. Everything a model or a request brings
comes after.
"""

from __future__ import annotations

import asyncio

from playwright.async_api import CDPSession, Page, Route, WebSocketRoute

URL_SHOWN = 200         # characters of a refused URL kept


async def isolate(page: Page, base_url: str, blocked: list[str]) -> CDPSession:
    """Route every request of ``page``: under ``base_url`` it goes on, else it is refused and listed in
    ``blocked``. Returns the page's CDP session (opened here: three independent round trips at once, and a
    reconnect waits for all of them)."""

    async def route(r: Route) -> None:
        url = r.request.url
        if url.startswith(base_url):
            await r.continue_()
            return
        blocked.append(url[:URL_SHOWN])
        if r.request.is_navigation_request() and r.request.frame == page.main_frame:
            await r.fulfill(status=204)
        else:
            await r.abort("blockedbyclient")

    async def route_web_socket(ws: WebSocketRoute) -> None:
        blocked.append(ws.url[:URL_SHOWN])
        await ws.close(code=1008, reason="blocked by webpool")

    _, _, cdp = await asyncio.gather(
        page.route("**/*", route),
        page.route_web_socket(lambda _url: True, route_web_socket),
        page.context.new_cdp_session(page))
    return cdp
