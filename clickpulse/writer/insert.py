"""Insert with retries: one body, sent until ClickHouse has it or rejects it as data.

Transient failures (connection, time-out, server errors, a schema that vanished, refused
credentials) are retried with exponential backoff and full jitter for as long as the process
runs, so an outage delays rows instead of losing them; a memory limit only a few times. Where
the server supports it, every attempt carries the same deduplication token, derived from the
rows, so a retry or a replay ClickHouse already stored is dropped by ClickHouse instead of stored
twice; where it does not, a retry after an attempt that may have been stored first asks which
rows landed (landed.py) and sends only the others.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from clickpulse.clickhouse import ClickHouseConnection
from clickpulse.metrics import WriterMetrics
from clickpulse.writer.errors import InsertFailure, backoff_seconds, deduplication_token
from clickpulse.writer.landed import LandedCheck
from clickpulse.writer.readiness import Readiness

log = logging.getLogger("clickpulse.writer")


@dataclass(frozen=True, slots=True)
class Attempted:
    """How an insert ended: `failure` None when ClickHouse has every row. `body`/`count` are what
    was last sent; `positions` maps each of its rows to its row in the body asked for (None:
    the same rows), as rows found already stored are not sent again."""

    failure: InsertFailure | None
    body: bytes
    count: int
    positions: list[int] | None = None


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
        self._landed = LandedCheck(connection=connection, database=database, table=table, timeout=timeout, pause=pause)

    async def insert(self, body: bytes, count: int, *, maybe_landed: bool = False) -> Attempted:
        """Sends `body` until ClickHouse has the rows or refuses them as data (or as a limit the
        batch exceeds). Only cancellation (shutdown) ends the retries of a transient failure.
        `maybe_landed`: an earlier attempt (before a crash) may have been stored."""
        loop = asyncio.get_running_loop()
        metrics = self._metrics
        attempt = 0
        positions: list[int] | None = None
        check_landed, unanswered = maybe_landed, list[str]()
        while True:
            started = loop.time()
            query_id = None
            try:
                capabilities = self._readiness.capabilities
                if capabilities is None or not self._readiness.schema_ready:
                    capabilities = await self._readiness.ensure_schema()
                token = deduplication_token(body) if capabilities.deduplicates_inserts else None
                if check_landed and token is None:
                    remaining = await self._landed.remaining(body, count, unanswered)
                    check_landed = False
                    if remaining.count < count:
                        log.warning(
                            "%d of %d events of an unanswered insert had been stored; sending the other %d",
                            count - remaining.count, count, remaining.count,
                        )
                        metrics.rows_written.add({}, count - remaining.count)  # by the unanswered attempt
                        positions = [
                            positions[index] if positions is not None else index for index in remaining.indices
                        ]
                        body, count = remaining.body, remaining.count
                    if not count:
                        self._readiness.record_success()
                        return Attempted(None, body, count, positions)
                query_id = f"clickpulse-{uuid.uuid4().hex}"  # names this attempt in system.processes
                async with asyncio.timeout(self._timeout):
                    await self._connection.insert(self._database, self._table, body, token, query_id)
            except Exception as error:  # noqa: BLE001 - classified below, never lost silently
                metrics.insert_duration.observe({}, loop.time() - started)
                metrics.inserts.inc({"result": "error"})
                failure = self._readiness.record_failure(error)
                if failure.ambiguous and query_id is not None:
                    check_landed = True
                    unanswered.append(query_id)
                if not failure.retryable or (failure.retry_limit is not None and attempt >= failure.retry_limit):
                    log.warning("ClickHouse refused %d rows (%s): %s", count, failure.kind, failure.detail)
                    return Attempted(failure, body, count, positions)
                delay = backoff_seconds(attempt)
                attempt += 1
                metrics.retries.inc({})
                (log.error if failure.kind == "auth" else log.warning)(
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
            return Attempted(None, body, count, positions)

