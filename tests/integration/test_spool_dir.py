"""The spool directory under the faults an operator meets: a second process started on it, the
directory deleted or replaced while the service runs, a full disk; and the memory a large
unconfirmed spool costs at start. Real `python -m clickpulse` processes, a real ClickHouse."""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path

import aiohttp
import pytest

from tests.integration.conftest import ServiceProcess, eventually, make_event
from tests.integration.test_faults import proxy, via, wait_for_ids  # noqa: F401 - proxy is a fixture
from tests.servers import ClickHouseServer, TcpProxy

pytestmark = pytest.mark.integration


async def post_acknowledged(http: aiohttp.ClientSession, service: ServiceProcess, requests: int, query: str = "?ack=disk") -> set[str]:
    acknowledged: set[str] = set()
    for index in range(requests):
        events = [make_event(index, event_id=str(uuid.uuid4())) for _ in range(3)]
        async with http.post(service.url + "/events" + query, json=events) as response:
            assert response.status == 202, await response.text()
        acknowledged.update(event["event_id"] for event in events)
    return acknowledged


async def test_a_second_process_on_the_spool_dir_exits_2_naming_the_holder_and_touches_nothing(
    clickhouse_server: ClickHouseServer, clickhouse_database: str, proxy: TcpProxy, start_service, tmp_path: Path
) -> None:
    settings = dict(CLICKHOUSE_DSN=via(proxy, clickhouse_database), SPOOL_DIR=str(tmp_path / "spool"),
                    ACK_MODE="disk", FLUSH_INTERVAL="50ms", CLICKHOUSE_TIMEOUT="2s")
    first = start_service(**settings)
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: first.is_ready(http), timeout=20)
        acknowledged = await post_acknowledged(http, first, 5)
        await wait_for_ids(clickhouse_server, clickhouse_database, acknowledged)  # the active segment is all confirmed
        second = start_service(**settings)
        try:
            status = await second.wait_exit(20)
        except Exception:  # the old code: it runs, having recovered the first one's directory
            status = None
        if status is None:
            await eventually(lambda: second.is_ready(http), timeout=20)
            second.kill()
        await proxy.cut()
        acknowledged |= await post_acknowledged(http, first, 5)  # fsynced, then the first one crashes
        first.process.send_signal(signal.SIGKILL)
        await first.wait_exit(10)
        await proxy.restore()
        third = start_service(**settings)
        await wait_for_ids(clickhouse_server, clickhouse_database, acknowledged)
    lines = second.log.strip().splitlines()
    assert status == 2, second.log
    assert len(lines) == 1 and "in use" in lines[0] and f"pid {first.process.pid}" in lines[0], lines
    assert first.url in lines[0]
    third.process.send_signal(signal.SIGTERM)
    assert await third.wait_exit(30) == 0
