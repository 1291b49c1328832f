"""Fault tests: real `python -m clickpulse` processes, a real ClickHouse server, and a TCP proxy
between them that the test cuts, slows or restores. Each test ends by comparing what clients were
told (the acknowledged event ids) with the rows ClickHouse has."""

from __future__ import annotations

import asyncio
import collections
import signal
import uuid
from pathlib import Path

import aiohttp
import pytest

from tests.integration.conftest import ServiceProcess, count_rows, eventually, make_event, metric_samples
from tests.servers import ClickHouseServer, TcpProxy

pytestmark = pytest.mark.integration


class LoadClients:
    """Bounded load: `senders` concurrent clients posting small batches with their own event ids
    until stopped. Records which ids were acknowledged, and every status seen."""

    def __init__(self, url: str, *, senders: int = 6, events_per_request: int = 5, query: str = "") -> None:
        self.url = url + "/events" + query
        self.senders = senders
        self.events_per_request = events_per_request
        self.acknowledged: set[str] = set()
        self.statuses: collections.Counter[int | str] = collections.Counter()
        self.retry_after_seen = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._send()) for _ in range(self.senders)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _send(self) -> None:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while not self._stop.is_set():
                events = [make_event(event_id=str(uuid.uuid4())) for _ in range(self.events_per_request)]
                try:
                    async with http.post(self.url, json=events) as response:
                        self.statuses[response.status] += 1
                        if response.status in (200, 202):
                            self.acknowledged.update(event["event_id"] for event in events)
                        elif response.status == 503:
                            assert response.headers["Retry-After"].isdigit()
                            assert "error" in await response.json()
                            self.retry_after_seen += 1
                            await asyncio.sleep(0.1)
                        else:
                            raise AssertionError(f"unexpected status {response.status}: {await response.text()}")
                except (aiohttp.ClientError, TimeoutError) as error:  # a killed service: not acknowledged
                    self.statuses[type(error).__name__] += 1
                    await asyncio.sleep(0.1)


async def stored_ids(server: ClickHouseServer, database: str) -> collections.Counter[str]:
    text = await server.aquery(f"SELECT toString(event_id) FROM {database}.events")
    return collections.Counter(text.split())


async def wait_for_ids(server: ClickHouseServer, database: str, expected: set[str], timeout: float = 30) -> collections.Counter[str]:
    stored: collections.Counter[str] = collections.Counter()

    async def all_there() -> bool:
        nonlocal stored
        stored = await stored_ids(server, database)
        return expected <= stored.keys()

    try:
        await eventually(all_there, timeout=timeout, interval=0.2)
    except AssertionError:
        missing = expected - stored.keys()
        raise AssertionError(f"{len(missing)} acknowledged events missing from ClickHouse, e.g. {sorted(missing)[:3]}") from None
    return stored


def duplicates(stored: collections.Counter[str]) -> int:
    return sum(count - 1 for count in stored.values())


async def deduplicates_inserts(server: ClickHouseServer) -> bool:
    from clickpulse.schema import capabilities_for

    return capabilities_for(await server.aquery("SELECT version()")).deduplicates_inserts


async def scrape_process(http: aiohttp.ClientSession, service: ServiceProcess) -> dict[str, float]:
    async with http.get(service.url + "/metrics") as response:
        return metric_samples(await response.text())


@pytest.fixture
async def proxy(clickhouse_server: ClickHouseServer):
    between = TcpProxy(clickhouse_server.http_port)
    await between.restore()
    yield between
    await between.cut()


def via(proxy: TcpProxy, database: str) -> str:
    return f"http://127.0.0.1:{proxy.port}/{database}"


async def test_outage_under_load_loses_nothing_and_duplicates_nothing(
    clickhouse_server: ClickHouseServer, clickhouse_database: str, proxy: TcpProxy, start_service, tmp_path: Path
) -> None:
    service = start_service(
        CLICKHOUSE_DSN=via(proxy, clickhouse_database), SPOOL_DIR=str(tmp_path / "spool"),
        BATCH_SIZE="200", FLUSH_INTERVAL="100ms", CLICKHOUSE_TIMEOUT="2s",
    )
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: service.is_ready(http), timeout=20)
        load = LoadClients(service.url)
        load.start()
        await asyncio.sleep(1.5)
        await proxy.cut()
        await asyncio.sleep(3)
        acknowledged_during_outage = len(load.acknowledged)
        await proxy.restore()
        await asyncio.sleep(1.5)
        await load.stop()
        stored = await wait_for_ids(clickhouse_server, clickhouse_database, load.acknowledged)
        samples = await scrape_process(http, service)
    assert acknowledged_during_outage > 0 and len(load.acknowledged) > acknowledged_during_outage
    assert set(stored) <= load.acknowledged, "rows that no client was told about"
    assert samples['clickhouse_insert_errors_total{kind="connection"}'] >= 1
    assert samples["events_dropped_total" + '{reason="shutdown"}'] == 0
    # With deduplication tokens (22.2+) ClickHouse drops a repeated batch; without (18.16) the
    # Writer asks which rows of an unanswered attempt landed before it sends the rest.
    assert duplicates(stored) == 0
    service.process.send_signal(signal.SIGTERM)
    assert await service.wait_exit(30) == 0


async def test_sigkill_under_load_with_disk_acks_loses_no_acknowledged_event(
    clickhouse_server: ClickHouseServer, clickhouse_database: str, proxy: TcpProxy, start_service, tmp_path: Path
) -> None:
    settings = dict(
        CLICKHOUSE_DSN=via(proxy, clickhouse_database), SPOOL_DIR=str(tmp_path / "spool"), ACK_MODE="disk",
        BATCH_SIZE="100000", FLUSH_INTERVAL="2s",
    )
    first = start_service(**settings)
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: first.is_ready(http), timeout=20)
        load = LoadClients(first.url)
        load.start()
        await asyncio.sleep(1.5)
        first.process.send_signal(signal.SIGKILL)
        await first.wait_exit(10)
        await load.stop()
        assert load.acknowledged, load.statuses
        second = start_service(**settings)
        stored = await wait_for_ids(clickhouse_server, clickhouse_database, load.acknowledged)
        samples = await scrape_process(http, second)
    assert samples["spool_replayed_events_total"] > 0
    assert samples["events_dropped_total" + '{reason="shutdown"}'] == 0
    assert len(stored) >= len(load.acknowledged)
    second.process.send_signal(signal.SIGTERM)
    assert await second.wait_exit(30) == 0


async def test_slow_clickhouse_bounds_memory_answers_503_then_recovers_by_itself(
    clickhouse_server: ClickHouseServer, clickhouse_database: str, proxy: TcpProxy, start_service
) -> None:
    limit = 2000
    service = start_service(
        CLICKHOUSE_DSN=via(proxy, clickhouse_database), MAX_BUFFER_EVENTS=str(limit), MAX_BATCH_EVENTS="100",
        BATCH_SIZE="500", FLUSH_INTERVAL="100ms", CLICKHOUSE_TIMEOUT="30s",
    )
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: service.is_ready(http), timeout=20)
        proxy.delay = 0.5
        load = LoadClients(service.url, events_per_request=50)
        load.start()
        held: list[float] = []
        for _ in range(40):
            held.append((await scrape_process(http, service))["pipeline_memory_events"])
            await asyncio.sleep(0.1)
        assert max(held) <= limit
        assert load.retry_after_seen > 0, load.statuses
        proxy.delay = 0
        await asyncio.sleep(1)
        await load.stop()
        stored = await wait_for_ids(clickhouse_server, clickhouse_database, load.acknowledged)
        assert set(stored) == load.acknowledged
        async with http.post(service.url + "/events", json=[make_event(1)]) as response:
            assert response.status == 202
        await eventually(lambda: service.is_ready(http), timeout=20)
    assert set(load.statuses) <= {202, 503}
    service.process.send_signal(signal.SIGTERM)
    assert await service.wait_exit(30) == 0


async def test_a_row_clickhouse_rejects_goes_to_quarantine_and_the_others_land(
    clickhouse_server: ClickHouseServer, clickhouse_database: str, start_service
) -> None:
    service = start_service(CLICKHOUSE_DSN=clickhouse_server.dsn(clickhouse_database), FLUSH_INTERVAL="50ms")
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: service.is_ready(http), timeout=20)
        # Stricter than what clickpulse validates: user_id must now be a number.
        await clickhouse_server.aquery(
            f"ALTER TABLE {clickhouse_database}.events MODIFY COLUMN user_id Nullable(UInt64)"
        )
        events = [make_event(i, user_id=str(100 + i), event_id=str(uuid.uuid4())) for i in range(10)]
        events[6]["user_id"] = "not-a-number"
        async with http.post(service.url + "/events?wait=true", json=events) as response:
            assert response.status == 422
            body = await response.json()
        assert (body["rejected"], body["written"]) == (1, 9)
        assert "quarantine" in body["error"]
        assert await count_rows(clickhouse_server, clickhouse_database) == 9
        quarantined = await clickhouse_server.aquery(
            f"SELECT error, row FROM {clickhouse_database}.events_quarantine FORMAT TSV"
        )
        # ?wait=true: a 200 means the rows are already queryable.
        good = [make_event(50 + i, user_id=str(50 + i)) for i in range(3)]
        async with http.post(service.url + "/events?wait=true", json=good) as response:
            assert (response.status, await response.json()) == (200, {"status": "written", "written": 3})
        assert await count_rows(clickhouse_server, clickhouse_database) == 12
        samples = await scrape_process(http, service)
    error, row = quarantined.strip().split("\t")
    assert "Cannot parse" in error or "Code:" in error
    assert events[6]["event_id"] in row and "not-a-number" in row
    assert samples['events_quarantined_total{destination="table"}'] == 1
    assert samples['clickhouse_insert_errors_total{kind="rejected"}'] >= 1
    service.process.send_signal(signal.SIGTERM)
    assert await service.wait_exit(30) == 0


async def test_wait_true_answers_504_when_clickhouse_cannot_confirm_in_time_and_still_writes(
    clickhouse_server: ClickHouseServer, clickhouse_database: str, proxy: TcpProxy, start_service
) -> None:
    service = start_service(
        CLICKHOUSE_DSN=via(proxy, clickhouse_database), FLUSH_INTERVAL="50ms", ACK_TIMEOUT="1s", CLICKHOUSE_TIMEOUT="2s",
    )
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: service.is_ready(http), timeout=20)
        await proxy.cut()
        async with http.post(service.url + "/events?wait=true", json=[make_event(1), make_event(2)]) as response:
            assert response.status == 504
            assert "not confirmed" in (await response.json())["error"]
        await proxy.restore()
        assert await eventually(lambda: count_rows(clickhouse_server, clickhouse_database), timeout=20) == 2
    service.process.send_signal(signal.SIGTERM)
    assert await service.wait_exit(30) == 0


async def test_an_unusable_spool_directory_answers_503_and_keeps_serving(
    clickhouse_server: ClickHouseServer, clickhouse_database: str, start_service, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the spool's parent should be")
    service = start_service(CLICKHOUSE_DSN=clickhouse_server.dsn(clickhouse_database), SPOOL_DIR=str(blocker / "spool"))
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: service.status(http, "/healthz"), timeout=20)
        async with http.post(service.url + "/events", json=make_event(1)) as response:
            assert response.status == 503
            assert response.headers["Retry-After"].isdigit()
            error = (await response.json())["error"]
        async with http.get(service.url + "/readyz") as response:
            assert response.status == 503
            assert "spool" in (await response.json())["reason"]
        assert await service.status(http, "/healthz") == 200
    assert "spool" in error and "Not a directory" in error
    assert service.process.poll() is None
    assert await count_rows(clickhouse_server, clickhouse_database) == 0
    service.process.send_signal(signal.SIGTERM)
    assert await service.wait_exit(30) == 0


async def test_a_full_spool_answers_503_and_every_acknowledged_event_lands_after_the_outage(
    clickhouse_server: ClickHouseServer, clickhouse_database: str, proxy: TcpProxy, start_service, tmp_path: Path
) -> None:
    service = start_service(
        CLICKHOUSE_DSN=via(proxy, clickhouse_database), SPOOL_DIR=str(tmp_path / "spool"), SPOOL_MAX_BYTES="64KiB",
        MAX_BUFFER_EVENTS="200", MAX_BATCH_EVENTS="50", BATCH_SIZE="100", FLUSH_INTERVAL="50ms",
        CLICKHOUSE_TIMEOUT="2s",
    )
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: service.is_ready(http), timeout=20)
        await proxy.cut()
        acknowledged: set[str] = set()
        full_error = ""
        for index in range(400):
            events = [make_event(index, event_id=str(uuid.uuid4())) for _ in range(5)]
            async with http.post(service.url + "/events", json=events) as response:
                if response.status == 503:
                    full_error = (await response.json())["error"]
                    assert response.headers["Retry-After"].isdigit()
                    break
                assert response.status == 202
                acknowledged.update(event["event_id"] for event in events)
        assert "full" in full_error and "SPOOL_MAX_BYTES" in full_error
        async with http.get(service.url + "/readyz") as response:
            assert response.status == 503
        await proxy.restore()
        stored = await wait_for_ids(clickhouse_server, clickhouse_database, acknowledged)
        assert set(stored) == acknowledged

        async def accepting_again() -> bool:
            async with http.post(service.url + "/events", json=make_event(1)) as response:
                return response.status == 202

        await eventually(accepting_again, timeout=20)
        samples = await scrape_process(http, service)
    assert samples["spool_full_rejections_total"] >= 1
    service.process.send_signal(signal.SIGTERM)
    assert await service.wait_exit(30) == 0


async def test_a_torn_spool_tail_is_truncated_and_the_intact_records_replayed(
    clickhouse_server: ClickHouseServer, clickhouse_database: str, proxy: TcpProxy, start_service, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    settings = dict(CLICKHOUSE_DSN=via(proxy, clickhouse_database), SPOOL_DIR=str(spool), FLUSH_INTERVAL="50ms",
                    CLICKHOUSE_TIMEOUT="2s")
    first = start_service(**settings)
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: first.is_ready(http), timeout=20)
        await proxy.cut()
        acknowledged: set[str] = set()
        for index in range(5):
            events = [make_event(index, event_id=str(uuid.uuid4())) for _ in range(4)]
            async with http.post(first.url + "/events?ack=disk", json=events) as response:
                assert response.status == 202
            acknowledged.update(event["event_id"] for event in events)
        first.process.send_signal(signal.SIGKILL)
        await first.wait_exit(10)
        segments = sorted(spool.glob("segment-*.log"))
        with open(segments[-1], "ab") as segment:  # a record cut short by the crash
            segment.write(b"CPR1\xff\x00\x00\x00\x04\x00\x00\x00partial")
        await proxy.restore()
        second = start_service(**settings)
        stored = await wait_for_ids(clickhouse_server, clickhouse_database, acknowledged)
        samples = await scrape_process(http, second)
    assert set(stored) == acknowledged
    assert samples["spool_corrupt_records_total"] == 1
    assert samples["spool_replayed_events_total"] == 20
    assert "torn tail" in second.log
    second.process.send_signal(signal.SIGTERM)
    assert await second.wait_exit(30) == 0
