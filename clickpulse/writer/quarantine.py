"""Bisection and quarantine: what happens to a batch ClickHouse rejects as data.

The batch is cut until exactly the rows ClickHouse cannot take are found; the others are
inserted, and each rejected row goes with its error to a quarantine: the `<table>_quarantine`
table, else `quarantine.ndjson` in the spool directory, else the error log.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec

from clickpulse.clickhouse import ClickHouseConnection
from clickpulse.metrics import QuarantineDestination, WriterMetrics
from clickpulse.schema import quarantine_table
from clickpulse.writer.errors import backoff_seconds, classify_error
from clickpulse.writer.insert import Inserter

log = logging.getLogger("clickpulse.writer")

# A failing part this small, whose error names no row, is inserted row by row.
SMALL_GROUP = 4
_AT_ROW = re.compile(r"\(at row (\d+)\)")
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
    """Finds exactly the rows ClickHouse will not take: every other row is inserted.

    A failing part is cut where ClickHouse says the error is ("(at row N)", which its row
    formats report for a row they cannot parse): the rows before it, the row alone, the rows
    after it. Without a row number it is cut in halves, and parts of SMALL_GROUP rows or fewer
    are inserted row by row. A row is quarantined only once it failed alone, so no insertable row
    is ever quarantined. Cost: for r rejected rows among n, about 2r inserts when ClickHouse
    names the rows, about r·log2(n) when it does not."""

    def __init__(self, inserter: Inserter, small_group: int = SMALL_GROUP) -> None:
        self._inserter = inserter
        self._small_group = small_group

    async def insert_or_split(self, body: bytes, count: int, *, maybe_landed: bool = False) -> list[RejectedRow]:
        """Inserts `body` (`count` JSONEachRow lines). Returns the rows ClickHouse would not
        take, by index in `body`; every other row is in ClickHouse. `maybe_landed`: an earlier
        attempt, before a crash, may have been stored."""
        rejected: list[RejectedRow] = []
        # A range, not a list: a batch is tens of thousands of rows, and their indices are only
        # looked at when ClickHouse refuses some of them.
        await self._insert_part(body, count, range(count), rejected, maybe_landed)
        rejected.sort(key=lambda entry: entry.index)
        return rejected

    async def _insert_part(
        self, body: bytes, count: int, indices: Sequence[int], rejected: list[RejectedRow], maybe_landed: bool = False
    ) -> None:
        attempted = await self._inserter.insert(body, count, maybe_landed=maybe_landed)
        failure = attempted.failure
        if failure is None:
            return
        if attempted.positions is not None:  # some rows had landed: the rest is what failed
            indices = [indices[position] for position in attempted.positions]
        lines = attempted.body.split(b"\n")[: attempted.count]
        if len(lines) == 1:
            rejected.append(RejectedRow(indices[0], lines[0], failure.detail))
            return
        row = failing_row(failure.detail)
        if row is not None and row <= len(lines):
            cuts = [(0, row - 1), (row - 1, row), (row, len(lines))]
        elif len(lines) <= self._small_group:
            cuts = [(index, index + 1) for index in range(len(lines))]
        else:
            half = len(lines) // 2
            cuts = [(0, half), (half, len(lines))]
        for start, end in cuts:
            if start < end:
                part = b"".join(line + b"\n" for line in lines[start:end])
                await self._insert_part(part, end - start, indices[start:end], rejected)


def failing_row(detail: str) -> int | None:
    """The 1-based row ClickHouse names in a parse error, if it names one."""
    match = _AT_ROW.search(detail)
    return int(match.group(1)) if match and int(match.group(1)) >= 1 else None


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
