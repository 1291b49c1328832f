"""Service.stop without a ClickHouse server: the drain must end within SHUTDOWN_TIMEOUT (plus the
closing of files and connections) whatever is still in flight. The DSN points at a port nothing
listens on, so every ClickHouse request fails as a refused connection."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from clickpulse.config import load_config
from clickpulse.service import Service
from tests.servers import free_port

EVENT = {"event_type": "click", "source": "web", "created_at": "2024-05-01T12:00:00Z"}


@contextlib.asynccontextmanager
async def service_without_clickhouse(**settings: str) -> AsyncIterator[Service]:
    environ = {
        "CLICKHOUSE_DSN": f"http://127.0.0.1:{free_port()}/analytics",
        "HTTP_HOST": "127.0.0.1",
        "HTTP_PORT": "0",
        **settings,
    }
    service = Service(load_config([], environ))
    await service.start()
    try:
        yield service
    finally:
        if not service.stopping:
            await service.stop()


async def stop_within(service: Service, seconds: float) -> tuple[int, float]:
    """Runs service.stop(); fails (instead of hanging the suite) if it takes longer than `seconds`."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    stopping = asyncio.create_task(service.stop())
    done, _ = await asyncio.wait([stopping], timeout=seconds)
    if not done:
        service.abort()  # let the test end
        pytest.fail(f"Service.stop() did not return within {seconds}s")
    return stopping.result(), loop.time() - started


@pytest.mark.parametrize("spool", [False, True], ids=["no-spool", "spool"])
async def test_stop_ends_within_shutdown_timeout_while_a_wait_true_request_is_in_flight(
    tmp_path: Path, spool: bool
) -> None:
    # A ?wait=true request waits for ClickHouse up to ACK_TIMEOUT (30 s); ClickHouse is down.
    # The drain of in-flight HTTP requests used to take up to 2 x 5 s whatever SHUTDOWN_TIMEOUT
    # said; and once it had used up the deadline, the Writer was stopped and cancelled at the
    # same moment, swallowed the cancellation and retried forever: stop() never returned.
    settings = {"SHUTDOWN_TIMEOUT": "1s", "ACK_TIMEOUT": "30s", "FLUSH_INTERVAL": "50ms"}
    if spool:
        settings["SPOOL_DIR"] = str(tmp_path / "spool")
    async with service_without_clickhouse(**settings) as service:
        async with aiohttp.ClientSession() as http:
            waiting = asyncio.create_task(
                http.post(f"http://127.0.0.1:{service.port}/events?wait=true", json=EVENT)
            )
            await asyncio.sleep(0.3)  # accepted, flushed, with the Writer, which cannot write it
            assert not waiting.done()

            lost, took = await stop_within(service, 15.0)

            with contextlib.suppress(aiohttp.ClientError):
                (await waiting).release()
    assert took < 2.5, f"stop() took {took:.1f}s with SHUTDOWN_TIMEOUT=1s"
    assert lost == (0 if spool else 1)


async def test_every_acknowledged_event_a_drain_without_a_spool_loses_is_counted_as_dropped() -> None:
    # ClickHouse is down: the Writer holds two batches in its mailbox, the Batcher is stuck handing
    # it the third, and two more requests wait in the Batcher's mailbox. All five were answered
    # 202; a drain that runs out of SHUTDOWN_TIMEOUT loses all five, and events_dropped_total must
    # say so, not only the three the Writer had.
    settings = {"SHUTDOWN_TIMEOUT": "1s", "BATCH_SIZE": "1", "FLUSH_INTERVAL": "1h"}
    async with service_without_clickhouse(**settings) as service:
        async with aiohttp.ClientSession() as http:
            for _ in range(5):
                async with http.post(f"http://127.0.0.1:{service.port}/events", json=EVENT) as response:
                    assert response.status == 202
        await asyncio.sleep(0.1)
        pipeline = service.pipeline
        assert (pipeline.writer.pending_events, pipeline.batcher.held_events) == (3, 2)

        lost, _ = await stop_within(service, 10.0)

    assert lost == 5
    assert service.metrics.writer.events_dropped.get({"reason": "shutdown"}) == 5


@pytest.mark.parametrize("spool", [False, True], ids=["no-spool", "spool"])
async def test_when_the_actors_die_a_request_waiting_for_clickhouse_is_answered_503_at_once(
    tmp_path: Path, spool: bool
) -> None:
    settings = {"ACK_TIMEOUT": "30s", "FLUSH_INTERVAL": "50ms"}
    if spool:
        settings["SPOOL_DIR"] = str(tmp_path / "spool")
    async with service_without_clickhouse(**settings) as service:
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{service.port}"
            waiting = asyncio.create_task(http.post(url + "/events?wait=true", json=EVENT))
            await asyncio.sleep(0.3)  # with the Writer, which cannot write it
            assert not waiting.done()
            started = asyncio.get_running_loop().time()

            service.abort()  # every actor task ends, as if they had crashed

            async with await waiting as response:
                assert response.status == 503
                assert int(response.headers["Retry-After"]) > 0
                assert "error" in await response.json()
            answered_after = asyncio.get_running_loop().time() - started
            async with http.get(url + "/readyz") as response:
                assert response.status == 503
                assert "actor is not running" in (await response.json())["reason"]
    assert answered_after < 2.0, f"answered after {answered_after:.1f}s, not at once"
    assert service.failed.is_set()  # serve() exits 1 on this
