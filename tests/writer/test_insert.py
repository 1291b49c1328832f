"""Inserter: one body sent until ClickHouse has it (retries with one token) or rejects it."""

from __future__ import annotations

from aiochclient import ChClientError

from clickpulse.writer.errors import deduplication_token
from tests.writer.fakes import FakeClickHouse, row, writer_parts


async def test_a_clean_body_is_inserted_once_with_its_token_after_the_schema_is_made() -> None:
    parts = writer_parts()
    body = row("a") + row("b")

    assert await parts.inserter.insert(body, 2) is None

    assert parts.clickhouse.inserts == [(deduplication_token(body), body)]
    assert any("CREATE TABLE" in statement for statement in parts.clickhouse.statements)
    assert parts.metrics.rows_written.get({}) == 2
    assert parts.metrics.inserts.get({"result": "ok"}) == 1


async def test_transient_failures_are_retried_with_the_same_token() -> None:
    parts = writer_parts(FakeClickHouse(transient_failures=3))
    body = row("a")

    assert await parts.inserter.insert(body, 1) is None

    assert parts.clickhouse.inserts == [(deduplication_token(body), body)]
    assert parts.metrics.retries.get({}) == 3
    assert parts.metrics.insert_errors.get({"kind": "connection"}) == 3
    assert parts.metrics.inserts.get({"result": "error"}) == 3


async def test_a_rejection_as_data_is_returned_and_not_retried() -> None:
    parts = writer_parts()

    failure = await parts.inserter.insert(row("bad"), 1)

    assert failure is not None and failure.kind == "rejected" and not failure.retryable
    assert parts.metrics.retries.get({}) == 0
    assert parts.clickhouse.inserts == []


async def test_a_server_without_deduplication_gets_no_token() -> None:
    parts = writer_parts(FakeClickHouse(version="18.16.1"))

    assert await parts.inserter.insert(row("a"), 1) is None

    assert parts.clickhouse.inserts == [(None, row("a"))]


class VanishingTable(FakeClickHouse):
    """The table is dropped once, under a running Writer."""

    dropped = True

    async def insert(self, database: str, table: str, body: bytes, deduplication_token: str | None) -> None:
        if self.dropped:
            self.dropped = False
            raise ChClientError("Code: 60. DB::Exception: Table analytics.events doesn't exist.")
        await super().insert(database, table, body, deduplication_token)


async def test_a_missing_table_is_created_again_before_the_retry() -> None:
    clickhouse = VanishingTable()
    parts = writer_parts(clickhouse)
    await parts.readiness.ensure_schema()
    created = len(clickhouse.statements)

    assert await parts.inserter.insert(row("a"), 1) is None

    assert len(clickhouse.statements) > created  # the DDL ran again
    assert parts.metrics.insert_errors.get({"kind": "schema"}) == 1
    assert clickhouse.inserted_rows == [row("a").strip()]
