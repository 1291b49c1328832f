"""POST /query (embedded store only): read-only statements, leading comments allowed, formats."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from aiohttp.test_utils import TestClient

from clickpulse.http.app import HttpApp
from clickpulse.http.query_guard import QueryRefused, check_query
from clickpulse.intake import MemoryIntake
from clickpulse.memory_limit import MemoryLimit
from clickpulse.metrics import PipelineMetrics


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1",
        "-- how many?\nselect count() FROM events",
        "/* a */ /* b\n c */ -- d\n  WITH x AS (SELECT 1) SELECT * FROM x",
        "select(1)",
    ],
)
def test_leading_comments_do_not_make_a_reading_statement_refused(sql: str) -> None:
    assert check_query(sql) == sql


@pytest.mark.parametrize(
    "sql", ["-- only a comment", "/* unterminated SELECT 1", "DROP TABLE events -- SELECT", "/* SELECT */ DROP TABLE events"]
)
def test_what_is_not_one_reading_statement_behind_its_comments_is_refused(sql: str) -> None:
    with pytest.raises(QueryRefused):
        check_query(sql)


async def test_a_leading_comment_is_answered_and_a_write_behind_one_refused(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
) -> None:
    asked: list[tuple[str, str]] = []

    async def query(sql: str, output_format: str) -> str:
        asked.append((sql, output_format))
        return "result\n"

    http = HttpApp(
        intake=MemoryIntake(memory=MemoryLimit(10, 1 << 30), to_batcher=lambda message: None),
        max_body_bytes=1024, max_batch_events=10, ack_mode="memory", ack_timeout=1.0,
        not_ready_reason=lambda: None, pipeline_down=asyncio.get_running_loop().create_future(),
        metrics=PipelineMetrics(), query=query,
    )
    client = await aiohttp_client(http.build())
    response = await client.post("/query", data=b"-- per type\nSELECT 1")
    assert (response.status, await response.text()) == (200, "result\n")
    response = await client.post("/query?format=JSONCompact", data=b"/* x */ SELECT 2")
    assert response.status == 200
    assert asked == [("-- per type\nSELECT 1", "PrettyCompactMonoBlock"), ("/* x */ SELECT 2", "JSONCompact")]
    refused = await client.post("/query", data=b"/* SELECT */ DROP TABLE events")
    assert refused.status == 400 and "only statements that read" in (await refused.json())["error"]
    bad_format = await client.post("/query?format=Native", data=b"SELECT 1")
    assert bad_format.status == 400 and "format must be one of" in (await bad_format.json())["error"]
    assert len(asked) == 2


async def test_a_query_over_max_body_bytes_is_a_json_413_and_counted(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
) -> None:
    async def query(sql: str, output_format: str) -> str:
        raise AssertionError("never asked")

    metrics = PipelineMetrics()
    http = HttpApp(
        intake=MemoryIntake(memory=MemoryLimit(10, 1 << 30), to_batcher=lambda message: None),
        max_body_bytes=1024, max_batch_events=10, ack_mode="memory", ack_timeout=1.0,
        not_ready_reason=lambda: None, pipeline_down=asyncio.get_running_loop().create_future(),
        metrics=metrics, query=query,
    )
    client = await aiohttp_client(http.build())
    response = await client.post("/query", data=b"SELECT " + b"1" * 2048)
    assert response.status == 413
    assert "MAX_BODY_BYTES" in (await response.json())["error"]
    assert metrics.receiver.requests_rejected.get({"reason": "too_large"}) == 1
