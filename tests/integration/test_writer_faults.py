"""The Writer's promises under faults, against the real servers: a batch that can never be
inserted as a whole does not stall the pipeline, the quarantine is exact, a stalled server does
not get a batch twice, refused credentials are loud and lose nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from pathlib import Path

import aiohttp
import pytest

from tests.integration.conftest import count_rows, eventually, make_event
from tests.integration.test_faults import LoadClients, duplicates, scrape_process, wait_for_ids
from tests.servers import APP_PASSWORD, APP_USER, ClickHouseServer

pytestmark = pytest.mark.integration


async def test_a_stalled_server_gets_no_batch_twice(
    clickhouse_server: ClickHouseServer, clickhouse_database: str, start_service
) -> None:
    # ClickHouse stops answering (SIGSTOP) for longer than several CLICKHOUSE_TIMEOUTs under load:
    # every timed-out attempt is executed once it resumes. 18.16 has no deduplication tokens.
    service = start_service(
        CLICKHOUSE_DSN=clickhouse_server.dsn(clickhouse_database),
        BATCH_SIZE="200", FLUSH_INTERVAL="100ms", CLICKHOUSE_TIMEOUT="1s",
    )
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: service.is_ready(http), timeout=20)
        load = LoadClients(service.url)
        load.start()
        await asyncio.sleep(1.0)
        os.kill(clickhouse_server.process.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(6)
        finally:
            os.kill(clickhouse_server.process.pid, signal.SIGCONT)
        await asyncio.sleep(1.5)
        await load.stop()
        stored = await wait_for_ids(clickhouse_server, clickhouse_database, load.acknowledged, timeout=60)
        samples = await scrape_process(http, service)
    assert samples['clickhouse_insert_errors_total{kind="timeout"}'] >= 2  # it did retry
    assert set(stored) <= load.acknowledged
    assert duplicates(stored) == 0
    service.process.send_signal(signal.SIGTERM)
    assert await service.wait_exit(30) == 0


async def test_after_a_schema_change_every_insertable_row_lands_and_every_other_is_quarantined(
    clickhouse_server: ClickHouseServer, clickhouse_database: str, start_service
) -> None:
    service = start_service(CLICKHOUSE_DSN=clickhouse_server.dsn(clickhouse_database), FLUSH_INTERVAL="50ms")
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: service.is_ready(http), timeout=20)
        await clickhouse_server.aquery(
            f"ALTER TABLE {clickhouse_database}.events MODIFY COLUMN user_id Nullable(UInt64)"
        )
        events = [
            make_event(i, event_id=str(uuid.uuid4()), user_id=str(i) if i % 2 == 0 else f"user-{i}")
            for i in range(400)
        ]
        async with http.post(service.url + "/events?wait=true", json=events) as response:
            assert response.status == 422
            body = await response.json()
        samples = await scrape_process(http, service)
    assert (body["rejected"], body["written"]) == (200, 200)
    stored = await clickhouse_server.aquery(f"SELECT toString(event_id) FROM {clickhouse_database}.events")
    assert set(stored.split()) == {event["event_id"] for event in events[0::2]}
    quarantined = await clickhouse_server.aquery(f"SELECT row FROM {clickhouse_database}.events_quarantine FORMAT TSV")
    assert len(quarantined.splitlines()) == 200
    assert all(event["event_id"] in quarantined for event in events[1::2])
    assert samples['events_quarantined_total{destination="table"}'] == 200
    service.process.send_signal(signal.SIGTERM)
    assert await service.wait_exit(30) == 0


async def test_a_wrong_password_is_an_error_naming_the_dsn_readyz_503_and_nothing_is_lost(
    clickhouse_server: ClickHouseServer, clickhouse_database: str, start_service, tmp_path: Path
) -> None:
    # Made with the right credentials first, so that only the password is wrong.
    await clickhouse_server.aquery(f"CREATE DATABASE IF NOT EXISTS {clickhouse_database}")
    wrong = f"http://{APP_USER}:not-the-password-7x@127.0.0.1:{clickhouse_server.http_port}/{clickhouse_database}"
    settings = dict(SPOOL_DIR=str(tmp_path / "spool"), FLUSH_INTERVAL="50ms", LOG_FORMAT="text", SHUTDOWN_TIMEOUT="2s")
    service = start_service(CLICKHOUSE_DSN=wrong, **settings)
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: service.status(http, "/healthz"), timeout=20)
        events = [make_event(i, event_id=str(uuid.uuid4())) for i in range(5)]
        async with http.post(service.url + "/events", json=events) as response:
            assert response.status == 202  # spooled: written once the DSN is fixed
        async with http.get(service.url + "/readyz") as response:
            assert response.status == 503
            reason = (await response.json())["reason"]
        await eventually(lambda: "CLICKHOUSE_DSN" in service.log, timeout=10)
        service.process.send_signal(signal.SIGTERM)
        assert await service.wait_exit(30) == 0
        log = service.log
        assert "CLICKHOUSE_DSN" in reason and "refused" in reason
        assert APP_USER not in reason
        assert any(" ERROR " in line and "CLICKHOUSE_DSN" in line for line in log.splitlines())
        assert "not-the-password-7x" not in log and "not-the-password-7x" not in reason
        assert "Traceback" not in log
        fixed = f"http://{APP_USER}:{APP_PASSWORD}@127.0.0.1:{clickhouse_server.http_port}/{clickhouse_database}"
        fixed = fixed.replace(APP_PASSWORD, __import__("urllib.parse").parse.quote(APP_PASSWORD, safe=""))
        again = start_service(CLICKHOUSE_DSN=fixed, **settings)
        await eventually(lambda: count_rows(clickhouse_server, clickhouse_database), timeout=20)
        await wait_for_ids(clickhouse_server, clickhouse_database, {event["event_id"] for event in events})
    again.process.send_signal(signal.SIGTERM)
    assert await again.wait_exit(30) == 0
