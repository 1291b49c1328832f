"""HttpClickHouse's insert on the wire: what a ClickHouse server receives (here an aiohttp server
that keeps the request; tests/integration/test_clickhouse.py sends to a real ClickHouse)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from clickpulse.clickhouse import INSERT_SLICE_BYTES, HttpClickHouse
from clickpulse.config import parse_dsn


async def test_an_insert_body_of_many_slices_arrives_whole_in_order_with_its_content_length(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> None:
    received: list[tuple[dict[str, str], bytes]] = []

    async def insert(request: web.Request) -> web.Response:
        received.append((dict(request.headers), await request.read()))
        return web.Response(text="")

    app = web.Application(client_max_size=64 * INSERT_SLICE_BYTES)
    app.router.add_post("/", insert)
    server = await aiohttp_server(app)
    # Every byte value, and a length that ends part-way into a slice.
    body = bytes(range(256)) * (INSERT_SLICE_BYTES * 7 // 2 // 256) + b"tail\n"
    async with aiohttp.ClientSession() as session:
        connection = HttpClickHouse(parse_dsn(f"http://127.0.0.1:{server.port}/analytics"), session)
        await connection.insert("analytics", "events", body, None, "q-1")
        await connection.insert("analytics", "events", b'{"a":1}\n', None, "q-2")  # shorter than one slice

    (headers, first), (short_headers, second) = received
    assert first == body
    assert headers["Content-Length"] == str(len(body))
    assert "Transfer-Encoding" not in headers
    assert second == b'{"a":1}\n'
    assert short_headers["Content-Length"] == "8"
