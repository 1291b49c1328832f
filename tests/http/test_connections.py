"""GuardedRequestHandler in a real aiohttp server (GuardedSite): what it answers when a handler
raises, and that every request it serves is counted by the access-log hook."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from clickpulse.http.app import HttpApp
from clickpulse.http.connections import ConnectionGuard, GuardedSite
from clickpulse.intake import MemoryIntake
from clickpulse.memory_limit import MemoryLimit
from clickpulse.metrics import PipelineMetrics
from tests.support import free_port


@pytest.fixture
async def guarded() -> AsyncIterator[tuple[str, PipelineMetrics]]:
    metrics = PipelineMetrics()
    http = HttpApp(
        intake=MemoryIntake(memory=MemoryLimit(10, 1 << 20), to_batcher=lambda delivery: None),
        max_body_bytes=1024, max_batch_events=10, ack_mode="memory", ack_timeout=1.0,
        not_ready_reason=lambda: None, pipeline_down=asyncio.get_running_loop().create_future(), metrics=metrics,
    )
    app = http.build()

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("a bug")

    app.router.add_get("/broken", broken)
    # The catch-all was added by build(): a route added after it is still resolved first by path.
    runner = web.AppRunner(app, handle_signals=False, **http.server_options())
    await runner.setup()
    port = free_port()
    guard = ConnectionGuard(max_connections=10, head_timeout=5.0, rejections=http.rejections)
    await GuardedSite(runner, "127.0.0.1", port, guard=guard).start()
    try:
        yield f"http://127.0.0.1:{port}", metrics
    finally:
        await runner.cleanup()


async def test_a_handler_that_raises_is_a_json_500_counted_by_route(guarded: tuple[str, PipelineMetrics]) -> None:
    url, metrics = guarded
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/broken") as response:
            assert response.status == 500
            assert response.content_type == "application/json"
            assert (await response.json()) == {"error": "internal error; see the clickpulse log"}
        async with session.get(url + "/healthz") as response:
            assert response.status == 200
    text = metrics.render().decode()
    assert 'http_requests_total{method="GET",path="/broken",status="500"} 1' in text
    assert 'http_requests_total{method="GET",path="/healthz",status="200"} 1' in text
