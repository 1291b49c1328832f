"""The spool directory under the faults an operator meets: a second process started on it, the
directory deleted or replaced while the service runs, a full disk; and the memory a large
unconfirmed spool costs at start. Real `python -m clickpulse` processes, a real ClickHouse."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
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


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 2 MiB tmpfs: smaller than one spool segment. Needs root (CI runs as root)."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


async def test_a_disk_smaller_than_a_segment_fills_reports_it_and_recovers_by_itself(
    clickhouse_server: ClickHouseServer, clickhouse_database: str, proxy: TcpProxy, start_service, small_disk: Path
) -> None:
    service = start_service(
        CLICKHOUSE_DSN=via(proxy, clickhouse_database), SPOOL_DIR=str(small_disk / "spool"), SPOOL_MAX_BYTES="64MiB",
        ACK_MODE="disk", FLUSH_INTERVAL="50ms", CLICKHOUSE_TIMEOUT="2s",
    )
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: service.is_ready(http), timeout=20)
        await proxy.cut()
        acknowledged: set[str] = set()
        full_error = ""
        for index in range(2000):
            events = [make_event(index, event_id=str(uuid.uuid4()), properties={"pad": "x" * 200}) for _ in range(20)]
            async with http.post(service.url + "/events", json=events) as response:
                if response.status == 503:
                    full_error = (await response.json())["error"]
                    break
                assert response.status == 202, await response.text()
                acknowledged.update(event["event_id"] for event in events)
        assert "disk is full" in full_error, full_error
        async with http.get(service.url + "/readyz") as response:
            assert response.status == 503
            assert "disk full" in (await response.json())["reason"]
        await proxy.restore()
        stored = await wait_for_ids(clickhouse_server, clickhouse_database, acknowledged, timeout=60)
        assert set(stored) == acknowledged

        # And again, twice the disk's size: each time the disk fills, the confirmed active segment
        # is deleted, so each request is taken, at worst after a few 503s while ClickHouse catches up.
        again: set[str] = set()
        refused = 0
        for index in range(2 * len(acknowledged) // 20):
            events = [make_event(index, event_id=str(uuid.uuid4()), properties={"pad": "x" * 200}) for _ in range(20)]
            for _ in range(100):
                async with http.post(service.url + "/events", json=events) as response:
                    if response.status == 202:
                        break
                    assert response.status == 503, await response.text()
                    refused += 1
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"still refused after {index} requests: {await response.text()}")
            again.update(event["event_id"] for event in events)
        await wait_for_ids(clickhouse_server, clickhouse_database, acknowledged | again, timeout=60)
        await eventually(lambda: service.is_ready(http), timeout=20)
    service.process.send_signal(signal.SIGTERM)
    assert await service.wait_exit(30) == 0


@pytest.mark.parametrize("how", ["rm -rf", "mv and mkdir"])
async def test_a_spool_dir_deleted_or_replaced_while_running_answers_503_never_202(
    clickhouse_server: ClickHouseServer, clickhouse_database: str, start_service, tmp_path: Path, how: str
) -> None:
    spool = tmp_path / "spool"
    service = start_service(CLICKHOUSE_DSN=clickhouse_server.dsn(clickhouse_database), SPOOL_DIR=str(spool),
                            ACK_MODE="disk", FLUSH_INTERVAL="50ms")
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: service.is_ready(http), timeout=20)
        acknowledged = await post_acknowledged(http, service, 3)
        await wait_for_ids(clickhouse_server, clickhouse_database, acknowledged)
        if how == "rm -rf":
            shutil.rmtree(spool)
        else:
            spool.rename(tmp_path / "moved")
            spool.mkdir()
        statuses, errors = [], []
        for index in range(5):
            async with http.post(service.url + "/events", json=[make_event(index)]) as response:
                statuses.append(response.status)
                errors.append((await response.json()).get("error", ""))
                assert response.headers.get("Retry-After", "").isdigit()
        async with http.get(service.url + "/readyz") as response:
            readiness = (response.status, (await response.json()).get("reason", ""))
        healthy = await service.status(http, "/healthz")
    assert statuses == [503] * 5, (statuses, errors)
    assert all("spool directory" in error for error in errors), errors
    assert readiness[0] == 503 and "spool directory gone" in readiness[1], readiness
    assert healthy == 200
    if how == "mv and mkdir":
        assert list(spool.iterdir()) == []  # nothing created in the directory put in its place
        assert (tmp_path / "moved" / "ledger.log").exists()
    service.process.send_signal(signal.SIGTERM)
    assert await service.wait_exit(30) in (0, 1)
