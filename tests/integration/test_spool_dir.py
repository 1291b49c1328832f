"""The spool directory under the faults an operator meets: a second process started on it, the
directory deleted or replaced while the service runs, a full disk; and the memory a large
unconfirmed spool costs at start. Real `python -m clickpulse` processes, a real ClickHouse."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from pathlib import Path

import aiohttp
import pytest

from clickpulse.spool import encode_record, segment_name
from tests.integration.conftest import ServiceProcess, eventually, make_event, metric_samples
from tests.integration.test_faults import proxy, scrape_process, via, wait_for_ids  # noqa: F401 - proxy is a fixture
from tests.servers import ClickHouseServer, TcpProxy
from tests.support import free_port

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


def fill_spool(directory: Path, total_bytes: int, segment_bytes: int = 32 << 20) -> int:
    """One-event records (as a long outage leaves them), `total_bytes` of them; returns how many."""
    directory.mkdir(parents=True)
    received_ms = int(time.time() * 1000)
    number, chunk, size, written, records = 1, [], 0, 0, 0
    while written + size < total_bytes:
        record = encode_record(b'{"event_type":"page_view","user_id":"u%07d","value":1}\n' % records, 1, received_ms)
        records += 1
        chunk.append(record)
        size += len(record)
        if size >= segment_bytes:
            (directory / segment_name(number)).write_bytes(b"".join(chunk))
            number, chunk, written, size = number + 1, [], written + size, 0
    (directory / segment_name(number)).write_bytes(b"".join(chunk))
    return records


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
async def test_a_large_unconfirmed_spool_opens_in_a_small_fraction_of_its_bytes(start_service, tmp_path: Path) -> None:
    # 64 MiB of one-event records: the bookkeeping of one tuple or two per record took ~360 MiB
    # of RSS here; now it is per segment, plus the rows MAX_BUFFER_EVENTS/BYTES let into memory.
    spool = tmp_path / "spool"
    records = fill_spool(spool, 64 << 20)
    service = start_service(CLICKHOUSE_DSN=f"http://127.0.0.1:{free_port()}/default", SPOOL_DIR=str(spool),
                            SPOOL_MAX_BYTES="1GiB", CLICKHOUSE_TIMEOUT="1s")
    async with aiohttp.ClientSession() as http:
        async def opened() -> bool:
            try:
                async with http.get(service.url + "/metrics") as response:
                    return metric_samples(await response.text()).get("spool_unconfirmed_events") == records
            except aiohttp.ClientConnectionError:
                return False

        await eventually(opened, timeout=60, interval=0.2)
        await asyncio.sleep(2)  # forwarding fills the pipeline up to MAX_BUFFER_EVENTS meanwhile
        peak = peak_rss_mib(service.process.pid)
        samples = await scrape_process(http, service)
    assert samples["spool_unconfirmed_events"] == records
    assert samples["spool_oldest_unconfirmed_timestamp_seconds"] > 0
    assert peak < 160, f"VmHWM {peak:.0f} MiB with a 64 MiB spool of {records} records"
    service.kill()
