"""The HTTP layer under test: the real application and intake port (the memory intake, or a
real Spool on tmp_path), with a recording stand-in for the Batcher's mailbox behind them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import aiohttp
import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web_runner import BaseRunner

from clickpulse.config import EnrichIp
from clickpulse.http.app import HttpApp
from clickpulse.http.enrich import Enricher
from clickpulse.http.edge import Edge
from clickpulse.http.keys import KeyStore
from clickpulse.http.origins import OriginPatterns
from clickpulse.http.ratelimit import parse_networks
from clickpulse.http.responses import Rejections
from clickpulse.intake import MemoryIntake
from clickpulse.memory_limit import MemoryLimit
from clickpulse.messages import AckMode, Delivery
from clickpulse.metrics import PipelineMetrics
from clickpulse.ports import BufferingPath
from clickpulse.spool import Spool
from tests.support import MailboxRecorder

MAX_BODY_BYTES = 4096
MAX_BATCH_EVENTS = 5
MEMORY_CAPACITY = 20
ACK_TIMEOUT = 0.1
CREATED_AT = "2024-05-06T07:08:09Z"


def event_object(index: int = 0, **fields: object) -> dict[str, object]:
    event: dict[str, object] = {"event_type": f"type_{index}", "source": "web", "created_at": CREATED_AT}
    event.update(fields)
    return event


def encode(payload: object) -> bytes:
    return msgspec.json.encode(payload)


def ndjson(events: list[dict[str, object]]) -> bytes:
    return b"".join(encode(event) + b"\n" for event in events)


def event_types(rows: bytes) -> list[str]:
    return [msgspec.json.decode(line)["event_type"] for line in rows.splitlines()]


@dataclass
class FakeBatcher(MailboxRecorder):
    """Stands in for Batcher.put (records each Delivery) and the pipeline's not_ready_reason.
    `on_delivery`, when set, runs on every delivery: a test's stand-in for the Writer's confirmation."""

    not_ready: str | None = None

    def not_ready_reason(self) -> str | None:
        return self.not_ready

    @property
    def submitted_types(self) -> list[list[str]]:
        return [event_types(delivery.rows) for delivery in self.deliveries]

    async def wait_for_deliveries(self, count: int, timeout: float = 1.0) -> None:
        await self.wait_for(count, timeout)

@dataclass
class App:
    client: TestClient
    pipeline: FakeBatcher
    http: HttpApp
    metrics: PipelineMetrics
    memory: MemoryLimit
    intake: BufferingPath
    pipeline_down: asyncio.Future[None]

    async def post(
        self, body: bytes, content_type: str | None = "application/json", query: str = "",
        headers: dict[str, str] | None = None, **kwargs: object,
    ) -> aiohttp.ClientResponse:
        url = "/events" + (f"?{query}" if query else "")
        headers = dict(headers or {})
        if content_type is None:
            return await self.client.post(url, data=body, skip_auto_headers={"Content-Type"}, headers=headers, **kwargs)
        headers["Content-Type"] = content_type
        return await self.client.post(url, data=body, headers=headers, **kwargs)

    async def metrics_text(self) -> str:
        response = await self.client.get("/metrics")
        assert response.status == 200
        return await response.text()


MakeApp = Callable[..., Awaitable[App]]


class ServiceLikeServer(TestServer):
    """aiohttp's TestServer, but like the Service's AppRunner: handlers are not cancelled when
    the client hangs up (aiohttp's default), so the tests see what production sees."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        kwargs.pop("handler_cancellation", None)
        return await super()._make_runner(**kwargs)


async def serve_app(aiohttp_client: Callable[..., Awaitable[TestClient]], http: HttpApp) -> TestClient:
    """A test client on a server with the service's own server options (auto_decompress off)."""
    server = ServiceLikeServer(http.build())
    await server.start_server(**http.server_options())
    return await aiohttp_client(server)


@pytest.fixture
async def make_app(aiohttp_client: Callable[..., Awaitable[TestClient]]) -> AsyncIterator[MakeApp]:
    built: list[App] = []
    spool_tasks: list[asyncio.Task[None]] = []

    async def make(
        *,
        ack_mode: AckMode = "memory",
        ack_timeout: float = ACK_TIMEOUT,
        memory_capacity: int = MEMORY_CAPACITY,
        spool_dir: Path | None = None,
        spool_max_bytes: int = 1 << 20,
        enqueue_wait: float = 1.0,
        keys_file: Path | None = None,
        cors_origins: tuple[str, ...] = (),
        rate_limit: float | None = None,
        rate_burst: int | None = None,
        trusted_proxies: str = "",
        max_inflight_body_bytes: int = 0,
        body_timeout: float = 30.0,
        clock: Callable[[], float] | None = None,
        query: Callable[[str], Awaitable[str]] | None = None,
        enrich_ip: EnrichIp = "true",
        segment_max_message_bytes: int = 32 * 1024,
        segment_max_batch_bytes: int = 500 * 1024,
    ) -> App:
        pipeline = FakeBatcher()
        metrics = PipelineMetrics()
        memory = MemoryLimit(memory_capacity, 1 << 30)
        intake: BufferingPath
        if spool_dir is not None:
            spool = Spool(
                directory=spool_dir,
                max_bytes=spool_max_bytes,
                segment_bytes=1 << 20,
                memory=memory,
                deliver=pipeline.put,
                metrics=metrics.spool,
            )
            await spool.open()
            spool_tasks.append(asyncio.create_task(spool.run()))
            intake = spool
        else:
            intake = MemoryIntake(memory=memory, to_batcher=pipeline.put, enqueue_wait=enqueue_wait)
        pipeline_down: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        rejections = Rejections(metrics.receiver)
        edge = Edge(
            keys=KeyStore(keys_file), cors_origins=OriginPatterns.parse(cors_origins), rate_limit=rate_limit,
            rate_burst=rate_burst, trusted_proxies=parse_networks(trusted_proxies), max_body_bytes=MAX_BODY_BYTES,
            max_inflight_body_bytes=max_inflight_body_bytes, body_timeout=body_timeout, rejections=rejections,
            metrics=metrics.receiver, **({"clock": clock} if clock is not None else {}),
        )
        http = HttpApp(
            edge=edge,
            rejections=rejections,
            query=query,
            intake=intake,
            max_body_bytes=MAX_BODY_BYTES,
            max_batch_events=MAX_BATCH_EVENTS,
            ack_mode=ack_mode,
            ack_timeout=ack_timeout,
            not_ready_reason=pipeline.not_ready_reason,
            pipeline_down=pipeline_down,
            metrics=metrics,
            enricher=Enricher(enrich_ip),
            segment_max_message_bytes=segment_max_message_bytes,
            segment_max_batch_bytes=segment_max_batch_bytes,
        )
        client = await serve_app(aiohttp_client, http)
        app = App(client, pipeline, http, metrics, memory, intake, pipeline_down)
        built.append(app)
        return app

    yield make
    for task in spool_tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    for app in built:
        await app.intake.close()
        # Whatever a test did, nothing may have ended in a 500.
        assert 'status="500"' not in app.metrics.render().decode()


@pytest.fixture
async def app(make_app: MakeApp) -> App:
    return await make_app()


async def json_error(response: aiohttp.ClientResponse, status: int) -> str:
    """Checks an error response is JSON with an `error` string and returns it."""
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    payload = await response.json()
    assert isinstance(payload, dict)
    assert isinstance(payload.get("error"), str) and payload["error"]
    return payload["error"]


def confirm_all(delivery: Delivery) -> None:
    """The Writer's part when ClickHouse took every row."""
    assert delivery.confirmation is not None
    delivery.confirmation.set_result(delivery.count)
