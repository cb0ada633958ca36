"""A loopback TCP relay between Playwright and a browser's DevTools port.

Playwright talks CDP to the browser through this relay instead of connecting to the browser's port
itself. The relay is a plain byte pipe (the WebSocket handshake and frames pass through untouched);
it exists so that a lost connection can be made real: ``cut()`` closes both ends of every relayed
connection, exactly what a dropped TCP connection looks like to each side, while the browser process
and its page live on. The ``disconnect`` fault uses it, so the handler that classifies a lost
connection in production is the one the fault exercises.

Bytes are forwarded from the protocol callbacks (no task per chunk); a slow reader pauses its peer's
reading, so neither side buffers without bound.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)


class _End(asyncio.Protocol):
    """One socket of a relayed pair; whatever it receives is written to its peer."""

    def __init__(self, relay: CdpRelay, accepted: bool) -> None:
        self.relay = relay
        self.accepted = accepted          # the client's side (it needs an upstream side joined to it)
        self.transport: asyncio.Transport | None = None
        self.peer: _End | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.relay._ends.add(self)
        if self.accepted:
            # The client's bytes wait in the kernel until the upstream side is there.
            transport.pause_reading()
            asyncio.get_running_loop().create_task(self.relay._join(self))

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)

    def eof_received(self) -> bool:
        return False                      # a half-close ends the pair: CDP has no use for one

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay._ends.discard(self)
        self.transport = None
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class CdpRelay:
    """Relays connections on a loopback port of its own to ``127.0.0.1:upstream_port``.

    Guarantees: bytes pass unchanged and in order in both directions; ``cut()`` closes every
    connection relayed so far (both sides) and leaves the relay listening, so a client can connect
    again (a reconnect); ``retarget()`` points new connections at another port (a restarted browser).
    """

    def __init__(self) -> None:
        self.upstream_port = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._ends: set[_End] = set()

    async def start(self, upstream_port: int) -> int:
        """Listen on a free loopback port; returns it."""
        self.upstream_port = upstream_port
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _End(self, accepted=True), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def retarget(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port

    async def _join(self, client: _End) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(lambda: _End(self, accepted=False), "127.0.0.1",
                                                       self.upstream_port)
        except OSError as exc:
            log.info("relay: browser port %d refused: %s", self.upstream_port, exc)
            if client.transport is not None:
                client.transport.close()
            return
        if client.transport is None:                  # the client left meanwhile
            upstream.transport.close()
            return
        client.peer, upstream.peer = upstream, client
        client.transport.resume_reading()

    def cut(self) -> int:
        """Close every relayed connection, both sides, as a dropped connection would; returns how many
        sockets were closed."""
        ends = list(self._ends)
        for end in ends:
            if end.transport is not None:
                end.transport.abort()
        return len(ends)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
