"""The whole pipeline in one process against a real ClickHouse server: rows counted in
ClickHouse, status codes and metric samples scraped from /metrics."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import msgspec
import pytest

from tests.integration.conftest import count_rows, eventually, wait_for_rows, make_event, running_service, scrape
from tests.servers import ClickHouseServer, TcpProxy
from tests.support import free_port

pytestmark = pytest.mark.integration


def base_url(service) -> str:
    return f"http://127.0.0.1:{service.port}"


async def test_flush_by_size_writes_whole_requests_and_keeps_the_rest_until_shutdown(
    clickhouse_server: ClickHouseServer, clickhouse_database: str
) -> None:
    dsn = clickhouse_server.dsn(clickhouse_database)
    async with running_service(dsn, BATCH_SIZE="100", FLUSH_INTERVAL="1h") as service, aiohttp.ClientSession() as http:
        url = base_url(service) + "/events"
        for request_number in range(6):
            async with http.post(url, json=[make_event(request_number * 40 + i) for i in range(40)]) as response:
                assert response.status == 202
                assert await response.json() == {"status": "accepted", "accepted": 40}
        # 40+40 fill a batch as far as whole requests go: flushed when the third did not fit.
        assert await wait_for_rows(clickhouse_server, clickhouse_database, 160) == 160
        samples = await scrape(http, base_url(service))
        assert samples['batch_flush_total{trigger="size"}'] == 2
        assert samples["batch_size"] == 80
        assert samples["buffer_events"] == 80
        # A request larger than BATCH_SIZE is never split: it is one batch of its own.
        async with http.post(url, json=[make_event(1000 + i) for i in range(250)]) as response:
            assert response.status == 202
        assert await wait_for_rows(clickhouse_server, clickhouse_database, 490) == 490
        async with http.post(url, json=[make_event(2000 + i) for i in range(30)]) as response:
            assert response.status == 202
        samples = await scrape(http, base_url(service))
        assert samples['batch_flush_total{trigger="size"}'] == 4
        assert samples["batch_size"] == 250
        assert samples["clickhouse_rows_written_total"] == 490
        lost = await service.stop()
    assert lost == 0
    assert await count_rows(clickhouse_server, clickhouse_database) == 520
    assert service.metrics.batcher.batch_flushes.get({"trigger": "shutdown"}) == 1


async def test_flush_by_interval_writes_a_small_batch_without_waiting_for_size(
    clickhouse_server: ClickHouseServer, clickhouse_database: str
) -> None:
    dsn = clickhouse_server.dsn(clickhouse_database)
    async with running_service(dsn, BATCH_SIZE="10000", FLUSH_INTERVAL="200ms") as service, aiohttp.ClientSession() as http:
        await eventually(lambda: service.not_ready_reason() is None)
        started = asyncio.get_running_loop().time()
        for index in range(3):
            async with http.post(base_url(service) + "/events", json=make_event(index)) as response:
                assert response.status == 202
                assert await response.json() == {"status": "accepted"}
        assert await wait_for_rows(clickhouse_server, clickhouse_database, 3) == 3
        assert asyncio.get_running_loop().time() - started < 5
        samples = await scrape(http, base_url(service))
        assert samples['batch_flush_total{trigger="interval"}'] == 1
        assert samples.get('batch_flush_total{trigger="size"}', 0) == 0
        assert samples['http_requests_total{method="POST",path="/events",status="202"}'] == 3
        assert samples["events_received_total"] == 3


async def test_awkward_strings_and_properties_round_trip_exactly(
    clickhouse_server: ClickHouseServer, clickhouse_database: str
) -> None:
    awkward = [
        'quote " and \' apostrophe',
        "back\\slash \\n not a newline",
        "new\nline and\r\ncarriage",
        "tab\there",
        "emoji 😀 and 中文",
        "nul\x00byte",
        "}{ ] [ , : json punctuation",
    ]
    events = [
        make_event(i, event_type=text, source=text, user_id=text, properties={"text": text, "n": i, "ok": True, "f": 1.5})
        for i, text in enumerate(awkward)
    ]
    dsn = clickhouse_server.dsn(clickhouse_database)
    async with running_service(dsn, FLUSH_INTERVAL="100ms") as service, aiohttp.ClientSession() as http:
        async with http.post(base_url(service) + "/events", data=msgspec.json.encode(events),
                             headers={"Content-Type": "application/json"}) as response:
            assert response.status == 202
        assert await wait_for_rows(clickhouse_server, clickhouse_database, len(events)) == len(events)
    rows_text = await clickhouse_server.aquery(
        f"SELECT event_type, source, user_id, properties FROM {clickhouse_database}.events "
        "ORDER BY value FORMAT JSONEachRow"
    )
    rows = [json.loads(line) for line in rows_text.splitlines()]
    assert [row["event_type"] for row in rows] == awkward
    assert [row["source"] for row in rows] == awkward
    assert [row["user_id"] for row in rows] == awkward
    assert [json.loads(row["properties"]) for row in rows] == [
        {"text": text, "n": i, "ok": True, "f": 1.5} for i, text in enumerate(awkward)
    ]


async def test_timestamps_with_offsets_are_stored_in_utc(
    clickhouse_server: ClickHouseServer, clickhouse_database: str
) -> None:
    cases = {
        "2024-05-01T12:00:00Z": 1714564800,
        "2024-05-01T14:00:00+02:00": 1714564800,
        "2024-05-01T06:30:00-05:30": 1714564800,
        "2024-05-01T12:00:00.999Z": 1714564800,  # DateTime on 18.16 keeps whole seconds
        "1970-01-01T00:00:00Z": 0,
        "2105-12-31T23:59:59Z": 4291747199,
    }
    events = [make_event(i, created_at=text) for i, text in enumerate(cases)]
    dsn = clickhouse_server.dsn(clickhouse_database)
    async with running_service(dsn, FLUSH_INTERVAL="100ms") as service, aiohttp.ClientSession() as http:
        async with http.post(base_url(service) + "/events", json=events) as response:
            assert response.status == 202
        assert await wait_for_rows(clickhouse_server, clickhouse_database, len(events)) == len(events)
        keeps_milliseconds = service.pipeline.writer.readiness.capabilities.keeps_milliseconds
    text = await clickhouse_server.aquery(
        f"SELECT toUnixTimestamp(created_at) FROM {clickhouse_database}.events ORDER BY value"
    )
    stored = [int(line) for line in text.split()]
    assert stored == list(cases.values())
    if keeps_milliseconds:  # a 20.1+ server: the milliseconds survive too
        millis = await clickhouse_server.aquery(
            f"SELECT toUnixTimestamp64Milli(created_at) FROM {clickhouse_database}.events WHERE value = 3"
        )
        assert int(millis) == 1714564800999


async def test_an_invalid_event_in_a_batch_stores_nothing_from_that_request(
    clickhouse_server: ClickHouseServer, clickhouse_database: str
) -> None:
    dsn = clickhouse_server.dsn(clickhouse_database)
    async with running_service(dsn, FLUSH_INTERVAL="50ms") as service, aiohttp.ClientSession() as http:
        url = base_url(service) + "/events"
        bad_batches = [
            ([make_event(0), make_event(1), make_event(2), make_event(3, source="  ")], "$[3].source"),
            ([make_event(0), make_event(1, created_at="1969-12-31T23:59:59Z")], "$[1]"),
            ([make_event(0), make_event(1, colour="red")], "colour"),
        ]
        for batch, named in bad_batches:
            async with http.post(url, json=batch) as response:
                assert response.status == 400
                body = await response.json()
                assert named in body["error"]
        ndjson = b"\n".join(msgspec.json.encode(e) for e in [make_event(0), make_event(1, value="x")])
        async with http.post(url, data=ndjson, headers={"Content-Type": "application/x-ndjson"}) as response:
            assert response.status == 400
            assert "$[1].value" in (await response.json())["error"]
        # A good request afterwards proves the pipeline flushed: only it is stored.
        async with http.post(url, json=[make_event(7), make_event(8)]) as response:
            assert response.status == 202
        assert await wait_for_rows(clickhouse_server, clickhouse_database, 2) == 2
        samples = await scrape(http, base_url(service))
        assert samples['requests_rejected_total{reason="invalid"}'] == 4
        assert samples["events_received_total"] == 2


async def test_error_statuses_are_json_and_counted_by_route_template(
    clickhouse_server: ClickHouseServer, clickhouse_database: str
) -> None:
    dsn = clickhouse_server.dsn(clickhouse_database)
    async with running_service(dsn, MAX_BODY_BYTES="2000", MAX_BATCH_EVENTS="5") as service, aiohttp.ClientSession() as http:
        url = base_url(service)
        async with http.post(url + "/events", data=b"x" * 2001, headers={"Content-Type": "application/json"}) as response:
            assert response.status == 413
            assert "MAX_BODY_BYTES" in (await response.json())["error"]
        async with http.post(url + "/events", json=[make_event(i) for i in range(6)]) as response:
            assert response.status == 413
            assert "MAX_BATCH_EVENTS" in (await response.json())["error"]
        async with http.post(url + "/events", data=b"{}", headers={"Content-Type": "application/xml"}) as response:
            assert response.status == 415
        async with http.get(url + "/events") as response:
            assert response.status == 405
            assert "POST" in response.headers["Allow"]
            assert "error" in await response.json()
        async with http.get(url + "/user-42-secret") as response:
            assert response.status == 404
            assert "error" in await response.json()
        async with http.get(url + "/healthz") as response:
            assert (response.status, await response.json()) == (200, {"status": "ok"})
        await eventually(lambda: service.not_ready_reason() is None)
        async with http.get(url + "/readyz") as response:
            assert response.status == 200
        async with http.get(url + "/metrics") as response:
            metrics_text = await response.text()
        samples = await scrape(http, url)
    assert "user-42-secret" not in metrics_text
    assert samples['http_requests_total{method="POST",path="/events",status="413"}'] == 2
    assert samples['http_requests_total{method="POST",path="/events",status="415"}'] == 1
    assert samples['requests_rejected_total{reason="too_large"}'] == 2
    assert samples['requests_rejected_total{reason="unsupported_type"}'] == 1
    assert any(key.startswith("http_requests_total") and 'status="404"' in key and 'path="unmatched"' in key for key in samples)
    assert await count_rows(clickhouse_server, clickhouse_database) == 0


async def test_clickhouse_down_at_start_then_up_loses_nothing(
    clickhouse_server: ClickHouseServer, clickhouse_database: str
) -> None:
    proxy = TcpProxy(clickhouse_server.http_port, port=free_port())
    dsn = f"http://127.0.0.1:{proxy.port}/{clickhouse_database}"
    async with running_service(dsn, FLUSH_INTERVAL="100ms", CLICKHOUSE_TIMEOUT="2s") as service, aiohttp.ClientSession() as http:
        url = base_url(service)
        async with http.get(url + "/healthz") as response:
            assert response.status == 200
        async with http.get(url + "/readyz") as response:
            assert response.status == 503
            assert "clickhouse" in (await response.json())["reason"]
        async with http.post(url + "/events", json=[make_event(i) for i in range(40)]) as response:
            assert response.status == 202
        await proxy.restore()
        assert await wait_for_rows(clickhouse_server, clickhouse_database, 40, timeout=20) == 40

        async def ready() -> bool:
            async with http.get(url + "/readyz") as response:
                return response.status == 200

        await eventually(ready, timeout=10)
        samples = await scrape(http, url)
        assert samples['clickhouse_insert_errors_total{kind="connection"}'] >= 1
        assert samples["clickhouse_up"] == 1
    await proxy.cut()


async def test_a_full_pipeline_answers_503_with_retry_after_and_never_drops(
    clickhouse_server: ClickHouseServer, clickhouse_database: str
) -> None:
    proxy = TcpProxy(clickhouse_server.http_port, port=free_port())  # never restored until the end
    dsn = f"http://127.0.0.1:{proxy.port}/{clickhouse_database}"
    settings = dict(BATCH_SIZE="10", FLUSH_INTERVAL="50ms", MAX_BUFFER_EVENTS="50", MAX_BATCH_EVENTS="10",
                    CLICKHOUSE_TIMEOUT="1s")
    accepted = 0
    statuses: dict[int, int] = {}
    async with running_service(dsn, **settings) as service, aiohttp.ClientSession() as http:
        url = base_url(service) + "/events"
        for round_number in range(20):
            async with http.post(url, json=[make_event(round_number * 10 + i) for i in range(10)]) as response:
                statuses[response.status] = statuses.get(response.status, 0) + 1
                if response.status == 202:
                    accepted += 10
                else:
                    assert response.status == 503
                    assert response.headers["Retry-After"].isdigit()
                    assert "error" in await response.json()
        assert statuses.get(503), statuses
        assert set(statuses) <= {202, 503}
        samples = await scrape(http, base_url(service))
        assert samples['requests_rejected_total{reason="overloaded"}'] == statuses[503]
        await proxy.restore()
        assert await wait_for_rows(clickhouse_server, clickhouse_database, accepted, timeout=20) == accepted
    assert await count_rows(clickhouse_server, clickhouse_database) == accepted
    await proxy.cut()
