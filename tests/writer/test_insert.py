"""Inserter: one body sent until ClickHouse has it (retries with one token) or rejects it."""

from __future__ import annotations

import uuid

import msgspec
from aiochclient import ChClientError

from clickpulse.writer.errors import deduplication_token
from tests.writer.fakes import FakeClickHouse, row, writer_parts


async def test_a_clean_body_is_inserted_once_with_its_token_after_the_schema_is_made() -> None:
    parts = writer_parts()
    body = row("a") + row("b")

    assert (await parts.inserter.insert(body, 2)).failure is None

    assert parts.clickhouse.inserts == [(deduplication_token(body), body)]
    assert any("CREATE TABLE" in statement for statement in parts.clickhouse.statements)
    assert parts.metrics.rows_written.get({}) == 2
    assert parts.metrics.inserts.get({"result": "ok"}) == 1


async def test_transient_failures_are_retried_with_the_same_token() -> None:
    parts = writer_parts(FakeClickHouse(transient_failures=3))
    body = row("a")

    assert (await parts.inserter.insert(body, 1)).failure is None

    assert parts.clickhouse.inserts == [(deduplication_token(body), body)]
    assert parts.metrics.retries.get({}) == 3
    assert parts.metrics.insert_errors.get({"kind": "connection"}) == 3
    assert parts.metrics.inserts.get({"result": "error"}) == 3


async def test_a_rejection_as_data_is_returned_and_not_retried() -> None:
    parts = writer_parts()

    failure = (await parts.inserter.insert(row("bad"), 1)).failure

    assert failure is not None and failure.kind == "rejected" and not failure.retryable
    assert parts.metrics.retries.get({}) == 0
    assert parts.clickhouse.inserts == []


async def test_a_server_without_deduplication_gets_no_token() -> None:
    parts = writer_parts(FakeClickHouse(version="18.16.1"))

    assert (await parts.inserter.insert(row("a"), 1)).failure is None

    assert parts.clickhouse.inserts == [(None, row("a"))]


class VanishingTable(FakeClickHouse):
    """The table is dropped once, under a running Writer."""

    dropped = True

    async def insert(
        self, database: str, table: str, body: bytes, deduplication_token: str | None, query_id: str | None = None
    ) -> None:
        if self.dropped:
            self.dropped = False
            raise ChClientError("Code: 60. DB::Exception: Table analytics.events doesn't exist.")
        await super().insert(database, table, body, deduplication_token, query_id)


async def test_a_missing_table_is_created_again_before_the_retry() -> None:
    clickhouse = VanishingTable()
    parts = writer_parts(clickhouse)
    await parts.readiness.ensure_schema()
    created = len(clickhouse.statements)

    assert (await parts.inserter.insert(row("a"), 1)).failure is None

    assert len(clickhouse.statements) > created  # the DDL ran again
    assert parts.metrics.insert_errors.get({"kind": "schema"}) == 1
    assert clickhouse.inserted_rows == [row("a").strip()]


class StallingOldServer(FakeClickHouse):
    """ClickHouse 18.16 (no deduplication tokens) whose first answer is lost: the attempt is
    stored (all of it, or its first `stored_rows` rows), then the client times out."""

    stored_rows: int | None = None
    lost_answers = 1

    async def insert(
        self, database: str, table: str, body: bytes, deduplication_token: str | None, query_id: str | None = None
    ) -> None:
        await super().insert(database, table, body, deduplication_token, query_id)
        if self.lost_answers:
            self.lost_answers -= 1
            if self.stored_rows is not None:  # only part of it landed
                kept = body.split(b"\n")[: self.stored_rows]
                self.inserts[-1] = (deduplication_token, b"".join(line + b"\n" for line in kept))
            raise TimeoutError

    async def query_value(self, sql: str) -> str:
        if "system.processes" in sql:
            return "0"
        if "groupArray(toString(event_id))" in sql:
            stored = [msgspec.json.decode(line)["event_id"] for line in self.inserted_rows]
            return ",".join(event_id for event_id in stored if f"'{event_id}'" in sql)
        return await super().query_value(sql)


def event_rows(count: int) -> bytes:
    return b"".join(
        msgspec.json.encode({"event_id": str(uuid.UUID(int=index)), "created_at": "2024-05-01T12:00:00Z"}) + b"\n"
        for index in range(count)
    )


async def test_a_retry_after_a_lost_answer_sends_nothing_the_server_already_stored() -> None:
    clickhouse = StallingOldServer(version="18.16.1")
    parts = writer_parts(clickhouse)

    attempted = await parts.inserter.insert(event_rows(10), 10)

    assert attempted.failure is None
    assert len(clickhouse.inserted_rows) == 10  # once, not twice
    assert len(clickhouse.inserts) == 1


async def test_a_retry_after_a_partly_stored_attempt_sends_only_the_missing_rows() -> None:
    clickhouse = StallingOldServer(version="18.16.1")
    clickhouse.stored_rows = 4
    parts = writer_parts(clickhouse)

    attempted = await parts.inserter.insert(event_rows(10), 10)

    assert attempted.failure is None
    assert sorted(clickhouse.inserted_rows) == sorted(event_rows(10).splitlines())
    assert attempted.positions == list(range(4, 10))


async def test_a_replayed_batch_is_looked_up_before_its_first_attempt() -> None:
    clickhouse = StallingOldServer(version="18.16.1")
    clickhouse.lost_answers = 0
    body = event_rows(3)
    clickhouse.inserts.append((None, body))  # stored before the crash

    attempted = await writer_parts(clickhouse).inserter.insert(body, 3, maybe_landed=True)

    assert attempted.failure is None and attempted.count == 0
    assert len(clickhouse.inserts) == 1


async def test_a_memory_limit_is_given_up_after_its_retries() -> None:
    class OutOfMemory(FakeClickHouse):
        async def insert(
            self, database: str, table: str, body: bytes, deduplication_token: str | None, query_id: str | None = None
        ) -> None:
            raise ChClientError("Code: 241. DB::Exception: Memory limit (for query) exceeded")

    parts = writer_parts(OutOfMemory())

    attempted = await parts.inserter.insert(row("a"), 1)

    assert attempted.failure is not None and attempted.failure.kind == "limit"
    assert parts.metrics.retries.get({}) == 3
