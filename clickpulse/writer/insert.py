"""Insert with retries: one body, sent until ClickHouse has it or rejects it as data.

Transient failures (connection, time-out, server errors, a schema that vanished) are retried
with exponential backoff and full jitter for as long as the process runs, so an outage delays
rows instead of losing them. Where the server supports it, every attempt carries the same
deduplication token, derived from the rows, so a retry or a replay ClickHouse already stored is
dropped by ClickHouse instead of stored twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from clickpulse.clickhouse import ClickHouseConnection
from clickpulse.metrics import WriterMetrics
from clickpulse.writer.errors import InsertFailure, backoff_seconds, deduplication_token
from clickpulse.writer.readiness import Readiness

log = logging.getLogger("clickpulse.writer")


class Inserter:
    def __init__(
        self,
        *,
        connection: ClickHouseConnection,
        database: str,
        table: str,
        timeout: float,
        readiness: Readiness,
        metrics: WriterMetrics,
        pause: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._connection = connection
        self._database = database
        self._table = table
        self._timeout = timeout
        self._readiness = readiness
        self._metrics = metrics
        self._pause = pause

    async def insert(self, body: bytes, count: int) -> InsertFailure | None:
        """None once ClickHouse has the rows; the failure when it rejects them as data. Only
        cancellation (shutdown) ends the retries of a transient failure."""
        loop = asyncio.get_running_loop()
        metrics = self._metrics
        attempt = 0
        while True:
            started = loop.time()
            try:
                capabilities = self._readiness.capabilities
                if capabilities is None or not self._readiness.schema_ready:
                    capabilities = await self._readiness.ensure_schema()
                token = deduplication_token(body) if capabilities.deduplicates_inserts else None
                async with asyncio.timeout(self._timeout):
                    await self._connection.insert(self._database, self._table, body, token)
            except Exception as error:  # noqa: BLE001 - classified below, never lost silently
                metrics.insert_duration.observe({}, loop.time() - started)
                metrics.inserts.inc({"result": "error"})
                failure = self._readiness.record_failure(error)
                if not failure.retryable:
                    log.warning("ClickHouse rejected %d rows: %s", count, failure.detail)
                    return failure
                delay = backoff_seconds(attempt)
                attempt += 1
                metrics.retries.inc({})
                log.warning(
                    "insert of %d events failed (%s: %s); retry %d in %.2fs",
                    count, failure.kind, failure.detail, attempt, delay,
                )
                await self._pause(delay)
                continue
            duration = loop.time() - started
            metrics.insert_duration.observe({}, duration)
            metrics.inserts.inc({"result": "ok"})
            log.debug(
                "insert into %s.%s: %d rows, %d bytes in %.3fs (attempt %d)",
                self._database, self._table, count, len(body), duration, attempt + 1,
            )
            metrics.rows_written.add({}, count)
            metrics.bytes_written.add({}, len(body))
            self._readiness.record_success()
            return None
