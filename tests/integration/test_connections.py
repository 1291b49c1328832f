"""Bounded whatever clients do, against `python -m clickpulse`: hundreds of slow uploaders,
slowloris heads, more connections than MAX_CONNECTIONS. The process's RSS is read from /proc."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

import aiohttp
import pytest

from tests.integration.conftest import eventually, metric_samples
from tests.servers import ClickHouseServer

pytestmark = pytest.mark.integration

SLOW_UPLOADERS = 400
HEAD = b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1048576\r\n\r\n"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def scrape(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with http.get(url + "/metrics") as response:
        return metric_samples(await response.text())


async def test_hundreds_of_slow_uploaders_hold_bounded_memory_and_are_timed_out(
    clickhouse_server: ClickHouseServer, clickhouse_database: str, start_service
) -> None:
    service = start_service(
        CLICKHOUSE_DSN=clickhouse_server.dsn(clickhouse_database), BODY_READ_TIMEOUT="4s",
        MAX_INFLIGHT_BODY_BYTES="64MiB",
    )
    writers: list[asyncio.StreamWriter] = []
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: service.is_ready(http), timeout=20)
        before = rss_mib(service.process.pid)
        answers: list[asyncio.Task[bytes]] = []
        for _ in range(SLOW_UPLOADERS):
            reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
            writer.write(HEAD + b"[")
            writers.append(writer)
            answers.append(asyncio.create_task(reader.read(200)))
        peak = before
        for _ in range(6):  # a byte every half second each: slow, never finishing in time
            await asyncio.sleep(0.5)
            for writer in writers:
                with contextlib.suppress(ConnectionError):
                    writer.write(b" ")
            peak = max(peak, rss_mib(service.process.pid))
        done = await asyncio.wait_for(asyncio.gather(*answers, return_exceptions=True), 20)
        statuses = [answer[9:12] if isinstance(answer, bytes) else b"err" for answer in done]
        samples = await scrape(http, service.url)
        after = rss_mib(service.process.pid)
    for writer in writers:
        writer.close()
    # 64 MiB of in-flight room for 1 MiB bodies: 64 are read (and time out), the rest are 503 at once.
    assert statuses.count(b"408") == 64, statuses
    assert statuses.count(b"503") == SLOW_UPLOADERS - 64
    assert samples['requests_rejected_total{reason="timeout"}'] == 64
    assert samples['requests_rejected_total{reason="overloaded"}'] == SLOW_UPLOADERS - 64
    print(f"\nRSS with {SLOW_UPLOADERS} slow uploaders: before {before:.1f} MiB, peak {peak:.1f} MiB, "
          f"after {after:.1f} MiB")
    assert peak - before < 64, (before, peak)
    service.process.send_signal(signal.SIGTERM)
    assert await service.wait_exit(30) == 0
    assert "Traceback" not in service.log and " ERROR " not in service.log


async def test_slowloris_heads_are_closed_and_counted(
    clickhouse_server: ClickHouseServer, clickhouse_database: str, start_service
) -> None:
    service = start_service(CLICKHOUSE_DSN=clickhouse_server.dsn(clickhouse_database), HEAD_READ_TIMEOUT="1s")
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: service.is_ready(http), timeout=20)
        connections = [await asyncio.open_connection("127.0.0.1", service.port) for _ in range(200)]
        for _, writer in connections:
            writer.write(b"POST /events HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        closed = await asyncio.wait_for(asyncio.gather(*(reader.read() for reader, _ in connections)), 10)
        assert closed == [b""] * 200
        samples = await scrape(http, service.url)
        # A healthy keep-alive client is not disturbed by the head time limit.
        async with http.post(service.url + "/events", json={"event_type": "a", "source": "b",
                                                            "created_at": "2024-05-01T00:00:00Z"}) as response:
            assert response.status == 202
    for _, writer in connections:
        writer.close()
    assert samples['requests_rejected_total{reason="timeout"}'] == 200


async def test_the_head_time_limit_spares_a_slow_body_and_a_later_head_on_a_kept_connection(
    clickhouse_server: ClickHouseServer, clickhouse_database: str, start_service
) -> None:
    """HEAD_READ_TIMEOUT runs from a head's first byte to its end, nothing else: not while a
    body arrives slowly after a whole head, and not from bytes of an earlier request."""
    service = start_service(CLICKHOUSE_DSN=clickhouse_server.dsn(clickhouse_database), HEAD_READ_TIMEOUT="1s")
    body = b'{"event_type":"a","source":"b","created_at":"2024-05-01T00:00:00Z"}'
    head = (b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: service.is_ready(http), timeout=20)
    reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
    writer.write(head + body[:10])  # the head whole, the body begun
    await writer.drain()
    for start in range(10, len(body), 10):  # the rest over 2.4 s, well past the head limit
        await asyncio.sleep(0.4)
        writer.write(body[start:start + 10])
        await writer.drain()
    first = await asyncio.wait_for(reader.readuntil(b"}"), 5)
    assert first.startswith(b"HTTP/1.1 202")
    await asyncio.sleep(1.5)  # idle past the head limit: aiohttp's keep-alive, not the head's
    writer.write(head[:20])  # the next head in two parts, within the limit of its own first byte
    await asyncio.sleep(0.5)
    writer.write(head[20:] + body)
    second = await asyncio.wait_for(reader.readuntil(b"}"), 5)
    writer.close()
    assert second.startswith(b"HTTP/1.1 202")


async def test_beyond_max_connections_a_newcomer_gets_503(
    clickhouse_server: ClickHouseServer, clickhouse_database: str, start_service
) -> None:
    service = start_service(CLICKHOUSE_DSN=clickhouse_server.dsn(clickhouse_database), MAX_CONNECTIONS="20")
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: service.is_ready(http), timeout=20)
    held = [await asyncio.open_connection("127.0.0.1", service.port) for _ in range(20)]
    await asyncio.sleep(0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in answer and b"MAX_CONNECTIONS" in answer
    for _, held_writer in held:
        held_writer.close()
    await asyncio.sleep(0.2)
    async with aiohttp.ClientSession() as http, http.get(service.url + "/healthz") as response:
        assert response.status == 200  # the slots came back
