"""The loopback HTTP server that each browser actor owns.

It serves, under an unguessable path prefix on 127.0.0.1, the worker page, the in-page runtime, the
onnxruntime-web files and model bytes held in memory. Everything is same-origin with the page, and
every response carries COOP/COEP/CORP so the page is cross-origin isolated (threaded wasm works).
Model bytes come from the Ray object store as a read-only buffer and are served without copying.
"""

from __future__ import annotations

import logging
import secrets
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from actors.constants import ORT_WEB_DIST, ORT_WEB_FILES, PAGE_DIR

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger(__name__)

ISOLATION_HEADERS = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}
BLOB_CHUNK = 1 << 20
CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm"}


class PageServer:
    """Serves one browser's page and its models; bound to 127.0.0.1 on an ephemeral port."""

    def __init__(self) -> None:
        self.prefix = "/" + secrets.token_urlsafe(18)
        self._blobs: dict[str, memoryview] = {}
        self._static: dict[str, Path] = {
            "index.html": PAGE_DIR / "index.html",
            "runtime.js": PAGE_DIR / "runtime.js",
            **{f"ort/{name}": ORT_WEB_DIST / name for name in ORT_WEB_FILES},
        }
        missing = [str(p) for p in self._static.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"webpool runtime files missing: {', '.join(missing)} (run `npm ci` in the repository root)"
            )
        self._runner: web.AppRunner | None = None
        self._socket: socket.socket | None = None
        self.port = 0

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.origin}{self.prefix}/"

    def bind(self) -> None:
        """Take the port now (``base_url`` is known from here on); requests wait in the socket's backlog until
        ``start`` serves them, so a browser can be launched at the page's URL while the server sets up."""
        if self._socket is None:
            self._socket = socket.create_server(("127.0.0.1", 0), backlog=128)
            self._socket.setblocking(False)
            self.port = self._socket.getsockname()[1]

    async def start(self) -> None:
        self.bind()
        # aiohttp is imported here, not with the module: the pool's process imports this module (through the
        # browser actor's class) but never serves a page, and the import is ~0.13 CPU-s of every pool's start.
        from aiohttp import web

        app = web.Application()
        app.router.add_get(self.prefix + "/{path:.+}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, self._socket).start()

    async def stop(self) -> None:
        self._blobs.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._socket is not None:     # bound and never served, or already closed by the cleanup: either way
            self._socket.close()
            self._socket = None

    def put_blob(self, name: str, data: memoryview) -> str:
        """Make ``data`` fetchable by the page; returns its URL. The view is kept until ``drop_blob``."""
        key = secrets.token_urlsafe(12)
        self._blobs[f"blobs/{key}"] = data
        return f"{self.base_url}blobs/{key}"

    def drop_blob(self, url: str) -> None:
        self._blobs.pop(url.removeprefix(self.base_url), None)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        path = request.match_info["path"]
        if path in self._static:
            file = self._static[path]
            return web.FileResponse(
                file, headers={**ISOLATION_HEADERS, "Content-Type": CONTENT_TYPES[file.suffix]}
            )
        blob = self._blobs.get(path)
        if blob is not None:
            # In chunks, each awaited: one write of the whole body would copy what the socket did not take at
            # once (hundreds of MB) in one go, stalling this actor's loop for ~0.6 s (it must answer probes).
            response = web.StreamResponse(headers={**ISOLATION_HEADERS, "Content-Type": "application/octet-stream"})
            response.content_length = len(blob)
            await response.prepare(request)
            for at in range(0, len(blob), BLOB_CHUNK):
                await response.write(blob[at:at + BLOB_CHUNK])
            await response.write_eof()
            return response
        log.warning("page server: refused unknown path", extra={"path": path})
        return web.Response(status=404, headers=ISOLATION_HEADERS)
