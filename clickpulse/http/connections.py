"""Connections, bounded: at most MAX_CONNECTIONS at once (beyond, the newcomer gets a 503 and is
closed), and a request head must arrive within HEAD_READ_TIMEOUT of its first byte (slowloris:
closed, counted as `timeout`). Idle keep-alive connections are aiohttp's own KEEPALIVE_TIMEOUT;
bodies are the edge's BODY_READ_TIMEOUT.

`GuardedSite` is aiohttp's TCPSite with one change: the connections it accepts are
`GuardedRequestHandler`s, aiohttp's handler with these two checks around it.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from clickpulse.http.responses import Rejections, json_response

_REFUSED_BODY = b'{"error":"too many connections (MAX_CONNECTIONS); retry later"}'
_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: " + str(len(_REFUSED_BODY)).encode() + b"\r\n\r\n" + _REFUSED_BODY
)


class ConnectionGuard:
    """The count of open connections, and those whose request head is still arriving. One timer
    sweeps those every quarter of HEAD_READ_TIMEOUT (so a slow head is closed within 1.25 times
    the limit): a timer per request cost more than the rest of the edge together."""

    def __init__(self, *, max_connections: int, head_timeout: float, rejections: Rejections) -> None:
        self.max_connections = max_connections
        self.head_timeout = head_timeout
        self.rejections = rejections
        self.open = 0
        self.awaiting_head: dict[GuardedRequestHandler, float] = {}  # → when its first byte came
        self._sweeper: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._sweeper = loop.call_later(self._period, self._sweep, loop)

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    @property
    def _period(self) -> float:
        return max(0.05, self.head_timeout / 4)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        deadline = loop.time() - self.head_timeout
        late = [handler for handler, since in self.awaiting_head.items() if since <= deadline]
        for handler in late:
            del self.awaiting_head[handler]
            handler.head_too_slow()
        self._sweeper = loop.call_later(self._period, self._sweep, loop)


class GuardedRequestHandler(RequestHandler):
    def __init__(self, manager: web.Server, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._counted = False
        # From the parsed head until its answer is written (aiohttp's queue holds the head
        # before): no head is awaited, so HEAD_READ_TIMEOUT does not apply. Known from
        # aiohttp's own two calls per request rather than from every route.
        self._in_request = False
        make_request = self._request_factory
        assert make_request is not None
        self._make_request = make_request
        self._request_factory = self._request_taken
        self._loop_time = kwargs["loop"].time

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self._guard
        if guard.open >= guard.max_connections:
            guard.rejections.count("overloaded")
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(_REFUSED)
            transport.close()
            return
        guard.open += 1
        self._counted = True
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._counted:
            self._counted = False
            self._guard.open -= 1
            self._guard.awaiting_head.pop(self, None)
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._counted:
            return
        awaiting_head = self._guard.awaiting_head
        if not self._in_request and not self._messages:
            awaiting_head.setdefault(self, self._loop_time())
        super().data_received(data)
        if self._messages:  # aiohttp parsed a whole head and queued the request
            awaiting_head.pop(self, None)

    def _request_taken(self, *args: Any) -> web.BaseRequest:
        """aiohttp's request factory, called when it takes a parsed head to answer it."""
        self._in_request = True
        return self._make_request(*args)

    def log_access(self, request: BaseRequest, response: web.StreamResponse, time: float | None) -> None:
        """Called by aiohttp once the answer is written: the next bytes start the next head."""
        self._in_request = False
        super().log_access(request, response, time)

    def head_too_slow(self) -> None:
        if not self._in_request and not self._messages and self.transport is not None:
            self._guard.rejections.count("timeout")
            self.force_close()

    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse or a handler that raised, logged by
        aiohttp as before; a handler's error is answered in JSON like every other error."""
        response = super().handle_error(request, status, exc, message)
        if status != 500:
            return response
        answer = json_response(500, {"error": "internal error; see the clickpulse log"})
        answer.force_close()
        return answer

    # Identity, not equality, makes a handler a key of `awaiting_head`.
    __hash__ = object.__hash__


class GuardedSite(web.TCPSite):
    def __init__(
        self, runner: web.AppRunner, host: str, port: int, *, guard: ConnectionGuard,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context)
        self._guard = guard

    async def start(self) -> None:
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        guard = self._guard
        options: dict[str, Any] = server._kwargs

        def accept() -> GuardedRequestHandler:
            return GuardedRequestHandler(server, loop=loop, guard=guard, **options)

        self._server = await loop.create_server(
            accept, self._host, self._port, ssl=self._ssl_context, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port,
        )
        guard.start(loop)

    async def stop(self) -> None:
        self._guard.stop()
        await super().stop()
