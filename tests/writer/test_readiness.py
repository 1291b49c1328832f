"""Readiness: the schema, and /readyz's account of when ClickHouse last answered."""

from __future__ import annotations

import aiohttp
import pytest
from aioprometheus import Registry

from clickpulse.metrics import WriterMetrics
from clickpulse.writer.errors import TableMissing
from clickpulse.writer.readiness import Readiness
from tests.writer.fakes import FakeClickHouse, writer_parts


async def test_not_ready_until_the_schema_is_made_then_ready() -> None:
    parts = writer_parts()
    assert parts.readiness.not_ready_reason() == "clickhouse not reachable (a fake ClickHouse): not connected yet"
    assert parts.metrics.up.get({}) == 0

    capabilities = await parts.readiness.ensure_schema()

    assert capabilities.deduplicates_inserts
    assert parts.readiness.schema_ready
    assert parts.readiness.not_ready_reason() is None
    assert parts.metrics.up.get({}) == 1


async def test_not_ready_once_clickhouse_has_not_answered_for_longer_than_the_grace() -> None:
    clock = [100.0]
    parts = writer_parts(clock=clock)
    await parts.readiness.ensure_schema()
    parts.clickhouse.down = True

    clock[0] += 10.0
    await parts.readiness.health_check()
    assert parts.readiness.not_ready_reason() is None  # within CLICKHOUSE_DOWN_GRACE (15 s)
    assert parts.metrics.up.get({}) == 0

    clock[0] += 10.0
    reason = parts.readiness.not_ready_reason()
    assert reason is not None and reason.startswith("clickhouse has not answered for 20s (a fake ClickHouse): connection:")


async def test_a_schema_failure_makes_the_schema_not_ready_again() -> None:
    parts = writer_parts()
    await parts.readiness.ensure_schema()

    failure = parts.readiness.record_failure(RuntimeError("Code: 60. DB::Exception: Table x doesn't exist."))

    assert failure.kind == "schema"
    assert not parts.readiness.schema_ready


async def test_without_create_table_a_missing_table_is_table_missing() -> None:
    class NoTable(FakeClickHouse):
        async def query_value(self, sql: str) -> str:
            return "0" if "system.tables" in sql or "EXISTS" in sql.upper() else await super().query_value(sql)

    clickhouse = NoTable()
    readiness = Readiness(
        connection=clickhouse, database="analytics", table="events", create_table=False,
        timeout=1.0, ready_grace=15.0, metrics=WriterMetrics(Registry()),
    )

    with pytest.raises(TableMissing, match="CLICKHOUSE_CREATE_TABLE=false"):
        await readiness.ensure_schema()
    assert clickhouse.statements == []  # nothing created


async def test_a_refused_connection_is_reported_as_the_reason() -> None:
    parts = writer_parts()
    parts.readiness.record_failure(aiohttp.ClientOSError(111, "Connection refused"))

    reason = parts.readiness.not_ready_reason()
    assert reason is not None and "connection: ClientOSError" in reason
