"""Bisection and quarantine: what happens to a batch ClickHouse rejects as data.

The batch is split in halves until the rows ClickHouse cannot take are found; the others are
inserted, and each rejected row goes with its error to a quarantine: the `<table>_quarantine`
table, else `quarantine.ndjson` in the spool directory, else the error log.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec

from clickpulse.clickhouse import ClickHouseConnection
from clickpulse.metrics import QuarantineDestination, WriterMetrics
from clickpulse.schema import quarantine_table
from clickpulse.writer.errors import backoff_seconds, classify_error
from clickpulse.writer.insert import Inserter

log = logging.getLogger("clickpulse.writer")

# Past this many rejected rows in one batch, a failing half is quarantined whole instead of split
# further: a batch whose every row fails (a changed column type) costs dozens of inserts, not 2n.
SPLIT_ROW_LIMIT = 64
QUARANTINE_ATTEMPTS = 3
QUARANTINE_FILE = "quarantine.ndjson"


@dataclass(frozen=True, slots=True)
class RejectedRow:
    index: int  # in the batch
    row: bytes
    error: str  # ClickHouse's


class QuarantineRow(msgspec.Struct):
    quarantined_at: str
    error: str
    row: str


class Splitter:
    def __init__(self, inserter: Inserter, split_row_limit: int = SPLIT_ROW_LIMIT) -> None:
        self._inserter = inserter
        self._split_row_limit = split_row_limit

    async def insert_or_split(self, body: bytes, count: int) -> list[RejectedRow]:
        """Inserts `body` (`count` JSONEachRow lines); on a data rejection, bisects it. Returns
        the rows ClickHouse would not take; every other row is in ClickHouse."""
        return await self._insert_part(body, count, 0, [0])

    async def _insert_part(self, body: bytes, count: int, first_row: int, rejected_so_far: list[int]) -> list[RejectedRow]:
        failure = await self._inserter.insert(body, count)
        if failure is None:
            return []
        lines = body.split(b"\n")[:count]
        if count == 1 or rejected_so_far[0] >= self._split_row_limit:
            rejected_so_far[0] += count
            return [RejectedRow(first_row + index, line, failure.detail) for index, line in enumerate(lines)]
        half = count // 2
        left = await self._insert_part(b"\n".join(lines[:half]) + b"\n", half, first_row, rejected_so_far)
        right = await self._insert_part(
            b"\n".join(lines[half:]) + b"\n", count - half, first_row + half, rejected_so_far
        )
        return left + right


class Quarantine:
    def __init__(
        self,
        *,
        connection: ClickHouseConnection,
        database: str,
        table: str,
        timeout: float,
        directory: Path | None,
        metrics: WriterMetrics,
        pause: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._connection = connection
        self._database = database
        self._table = quarantine_table(table)
        self._timeout = timeout
        self._directory = directory
        self._metrics = metrics
        self._pause = pause

    def describe(self, destination: QuarantineDestination) -> str:
        """Where a waiting client is told its rejected rows are."""
        if destination == "table":
            return self._table
        if destination == "file":
            return f"{QUARANTINE_FILE} in SPOOL_DIR"
        return "error log only"

    async def keep(self, rejected: list[RejectedRow]) -> QuarantineDestination:
        """Keeps each rejected row with its error; returns where they went."""
        now = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        rows = [QuarantineRow(now, entry.error, entry.row.decode(errors="replace")) for entry in rejected]
        body = msgspec.json.Encoder().encode_lines(rows)
        last_error = ""
        for attempt in range(QUARANTINE_ATTEMPTS):
            try:
                async with asyncio.timeout(self._timeout):
                    await self._connection.insert(self._database, self._table, body, None)
            except Exception as error:  # noqa: BLE001 - the file is the fallback
                last_error = classify_error(error).detail
                await self._pause(backoff_seconds(attempt))
            else:
                return self._counted("table", len(rows))
        log.error("cannot insert %d rejected rows into %s: %s", len(rows), self._table, last_error)
        if self._directory is not None:
            try:
                await asyncio.to_thread(self._append_to_file, self._directory / QUARANTINE_FILE, body)
            except OSError as error:
                log.error("cannot write %s: %s", self._directory / QUARANTINE_FILE, error)
            else:
                return self._counted("file", len(rows))
        for row in rows:
            log.error("rejected row kept only in this log: %s", msgspec.json.encode(row).decode())
        self._metrics.events_dropped.add({"reason": "rejected"}, len(rows))
        return self._counted("log", len(rows))

    @staticmethod
    def _append_to_file(path: Path, body: bytes) -> None:
        with open(path, "ab") as quarantine:
            quarantine.write(body)
            quarantine.flush()
            os.fsync(quarantine.fileno())

    def _counted(self, destination: QuarantineDestination, count: int) -> QuarantineDestination:
        self._metrics.quarantined.add({"destination": destination}, count)
        return destination
