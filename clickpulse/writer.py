"""The Writer actor: owns the ClickHouse client and does one INSERT per batch.

A batch's body is its requests' JSONEachRow lines joined once, sent as one INSERT through the
Writer's connection (aiochclient's `insert_file` over HTTP, or chDB in-process; see clickhouse.py). A failure is classified: connection trouble, time-outs and server-side errors are
retried with exponential backoff and full jitter for as long as the process runs, so a
ClickHouse outage delays rows instead of losing them (and, through MAX_BUFFER_EVENTS, makes
intake answer 503 or spool to disk). Where the server supports it, every insert carries a
deduplication token derived from its rows, so a retry or a replay that ClickHouse already has is
dropped by ClickHouse instead of stored twice.

A batch ClickHouse rejects as data is split in halves until the rows it cannot take are found;
the others are inserted, and each rejected row goes with its error to a quarantine: the
`<table>_quarantine` table, else `quarantine.ndjson` in the spool directory, else the error log.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import msgspec
from aiochclient import ChClientError

from clickpulse.clickhouse import ClickHouseConnection
from clickpulse.memory_limit import MemoryLimit
from clickpulse.messages import Batch, RowsRejected
from clickpulse.metrics import WriterMetrics
from clickpulse.schema import (
    ServerCapabilities,
    capabilities_for,
    database_ddl,
    quarantine_ddl,
    quarantine_table,
    table_ddl,
    table_exists_query,
)
from clickpulse.spool import Spool

log = logging.getLogger(__name__)

ERROR_KINDS = ("connection", "timeout", "server", "rejected", "schema")
INSERT_RESULTS = ("ok", "error")
DROP_REASONS = ("rejected", "shutdown")
QUARANTINE_DESTINATIONS = ("table", "file", "log")

# ClickHouse error codes meaning "this data can never be inserted as it is": the parse and
# conversion failures (CANNOT_PARSE_*, TYPE_MISMATCH, CANNOT_CONVERT_TYPE, INCORRECT_DATA, ...).
_REJECTED_DATA_CODES = frozenset({6, 25, 26, 27, 38, 41, 53, 69, 70, 72, 117, 131, 376})
_MISSING_SCHEMA_CODES = frozenset({60, 81})  # UNKNOWN_TABLE, UNKNOWN_DATABASE
_ERROR_CODE = re.compile(r"Code:\s*(\d+)")

BACKOFF_BASE_SECONDS = 0.1
BACKOFF_CAP_SECONDS = 5.0
HEALTH_CHECK_SECONDS = 5.0
# Past this many rejected rows in one batch, a failing half is quarantined whole instead of split
# further: a batch whose every row fails (a changed column type) costs dozens of inserts, not 2n.
SPLIT_ROW_LIMIT = 64
QUARANTINE_ATTEMPTS = 3
QUARANTINE_FILE = "quarantine.ndjson"


@dataclass(frozen=True)
class InsertFailure:
    kind: str
    retryable: bool
    detail: str


class TableMissing(Exception):
    """CLICKHOUSE_CREATE_TABLE=false and the table does not exist: its owner has to create it."""


class QuarantineRow(msgspec.Struct):
    quarantined_at: str
    error: str
    row: str


def classify_error(error: BaseException) -> InsertFailure:
    if isinstance(error, TableMissing):
        return InsertFailure("schema", True, str(error))
    if isinstance(error, TimeoutError):
        return InsertFailure("timeout", True, "ClickHouse did not answer in time")
    if isinstance(error, (aiohttp.ClientError, OSError)):
        return InsertFailure("connection", True, f"{type(error).__name__}: {error}")
    # aiochclient raises ChClientError, chDB a RuntimeError; both carry ClickHouse's own text.
    if isinstance(error, (ChClientError, RuntimeError)):
        text = str(error).strip()
        match = _ERROR_CODE.search(text)
        code = int(match.group(1)) if match else None
        first_line = text.splitlines()[0][:500] if text else "empty error"
        if code in _MISSING_SCHEMA_CODES:
            return InsertFailure("schema", True, first_line)
        if code in _REJECTED_DATA_CODES:
            return InsertFailure("rejected", False, first_line)
        return InsertFailure("server", True, first_line)
    return InsertFailure("server", True, f"{type(error).__name__}: {error}")


def backoff_seconds(attempt: int, draw: Callable[[float, float], float] = random.uniform) -> float:
    """Full jitter: anywhere between 0 and the exponential ceiling."""
    # The exponent is clamped: retries go on for as long as the process runs, and 0.1 * 2**1024
    # no longer fits in a float (OverflowError would kill the Writer after ~45 minutes of outage).
    return draw(0.0, min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2 ** min(attempt, 32)))


def deduplication_token(body: bytes) -> str:
    """Derived from the rows alone, so a retry or a replay of the same rows carries the same one."""
    return hashlib.blake2b(body, digest_size=16).hexdigest()


class _Stop:
    """Mailbox message: write what came before, then end `run()`."""


_STOP = _Stop()


class Writer:
    """Owns the ClickHouse connection (HTTP or embedded) and the batches handed to it.
    Talk to it through `submit()`/`stop()`."""

    def __init__(
        self,
        *,
        connection: ClickHouseConnection,
        database: str,
        table: str,
        timeout: float,
        metrics: WriterMetrics,
        memory: MemoryLimit,
        spool: Spool | None = None,
        quarantine_directory: Path | None = None,
        ready_grace: float = 15.0,
        inflight_batches: int = 2,
        create_table: bool = True,
    ) -> None:
        self._connection = connection
        self._database = database
        self._table = table
        self._create_table = create_table
        self._timeout = timeout
        self._metrics = metrics
        self._memory = memory
        self._spool = spool
        self._quarantine_directory = quarantine_directory
        self._ready_grace = ready_grace
        self._mailbox: asyncio.Queue[Batch | _Stop] = asyncio.Queue(maxsize=inflight_batches)
        self._capabilities: ServerCapabilities | None = None
        self._schema_ready = False
        self._last_ok_at: float | None = None
        self._last_error = "not connected yet"
        self._pending_events = 0
        self._stop_requested = asyncio.Event()
        metrics.up.set({}, 0)
        metrics.pending_events.set({}, 0)
        # Series from the start, so rate() sees the first error and alert expressions have data.
        for kind in ERROR_KINDS:
            metrics.insert_errors.add({"kind": kind}, 0)
        for result in INSERT_RESULTS:
            metrics.inserts.add({"result": result}, 0)
        for reason in DROP_REASONS:
            metrics.events_dropped.add({"reason": reason}, 0)
        for destination in QUARANTINE_DESTINATIONS:
            metrics.quarantined.add({"destination": destination}, 0)
        metrics.backend_info.set({"backend": connection.backend}, 1)

    # -- messages ---------------------------------------------------------------------------

    async def submit(self, batch: Batch) -> None:
        """Waits while the mailbox is full: that wait is the backpressure."""
        self._change_pending(batch.count)
        self._metrics.inflight_batches.inc({})
        await self._mailbox.put(batch)

    async def stop(self) -> None:
        """Asks `run()` to write every batch already submitted and return."""
        self._stop_requested.set()
        await self._mailbox.put(_STOP)

    # -- queries other actors may ask ---------------------------------------------------------

    @property
    def pending_events(self) -> int:
        return self._pending_events

    @property
    def capabilities(self) -> ServerCapabilities | None:
        return self._capabilities

    def not_ready_reason(self) -> str | None:
        """None when ClickHouse answered within the grace time and the schema exists."""
        where = self._connection.description
        if not self._schema_ready or self._last_ok_at is None:
            return f"clickhouse not reachable ({where}): {self._last_error}"
        age = asyncio.get_running_loop().time() - self._last_ok_at
        if age > self._ready_grace:
            return f"clickhouse has not answered for {age:.0f}s ({where}): {self._last_error}"
        return None

    async def query(self, sql: str) -> str:
        """Runs a read-only statement for `python -m clickpulse query`, as a table of text. Through
        the Writer because the embedded store admits one user: its own connection."""
        async with asyncio.timeout(self._timeout):
            return await self._connection.query_text(sql, self._database)

    # -- the task ---------------------------------------------------------------------------

    async def run(self) -> None:
        await self._connect()
        while True:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns a result that arrives
            # together with a cancellation and swallows the cancellation, so a shutdown that
            # cancels the Writer as a batch arrives would leave it retrying that batch forever.
            try:
                async with asyncio.timeout(HEALTH_CHECK_SECONDS):
                    message = await self._mailbox.get()
            except TimeoutError:
                await self._health_check()
                continue
            if isinstance(message, _Stop):
                return
            await self._write(message)
            self._metrics.inflight_batches.dec({})

    def abandon(self) -> int:
        """Called when shutdown ran out of time. Returns the events that are now lost: none
        with a spool (they are replayed at the next start), all pending ones without."""
        unwritten = self._pending_events
        self._change_pending(-unwritten)
        self._metrics.inflight_batches.set({}, 0)
        if self._spool is not None:
            return 0
        if unwritten:
            self._metrics.events_dropped.add({"reason": "shutdown"}, unwritten)
        return unwritten

    async def _connect(self) -> None:
        """Retries until the schema exists, or until a stop finds nothing left to write."""
        attempt = 0
        while not self._schema_ready:
            if self._stop_requested.is_set() and self._pending_events == 0:
                return
            try:
                await self._ensure_schema()
            except Exception as error:  # noqa: BLE001 - every failure here is retried
                failure = self._record_failure(error)
                delay = backoff_seconds(attempt)
                log.warning("%s not ready (%s); retrying in %.1fs", self._connection.description, failure.detail, delay)
                attempt += 1
                await self._sleep_unless_stopped(delay)

    async def _sleep_unless_stopped(self, delay: float) -> None:
        """A backoff pause that a stop request cuts short (once: after that, pauses are whole)."""
        if self._stop_requested.is_set():
            await asyncio.sleep(delay)
            return
        # Not wait_for: see run(); stop() wakes this pause just as the shutdown may cancel us.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._stop_requested.wait()

    async def _ensure_schema(self) -> None:
        connection = self._connection
        async with asyncio.timeout(self._timeout):
            version = await connection.query_value("SELECT version()")
        capabilities = capabilities_for(version)
        database = self._database
        settings = capabilities.create_settings
        async with asyncio.timeout(self._timeout):
            if self._create_table:
                await connection.execute(database_ddl(database), settings)
                await connection.execute(table_ddl(database, self._table, capabilities), settings)
                await connection.execute(quarantine_ddl(database, self._table), settings)
            elif not int(await connection.query_value(table_exists_query(database, self._table))):
                # Creating it here would make a plain MergeTree table where a Distributed (or any
                # other) table was meant to be, and the user may lack the CREATE grant anyway.
                raise TableMissing(
                    f"table {database}.{self._table} does not exist and "
                    "CLICKHOUSE_CREATE_TABLE=false: create it first"
                )
        if self._capabilities != capabilities:
            log.info(
                "ClickHouse %s, %s: table %s.%s ready (created_at %s, insert deduplication %s)",
                capabilities.version,
                connection.description,
                database,
                self._table,
                capabilities.timestamp_type,
                "on" if capabilities.deduplicates_inserts else "not supported: retries are at-least-once",
            )
        self._capabilities = capabilities
        self._schema_ready = True
        self._record_success()

    async def _health_check(self) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await self._connection.query_value("SELECT 1")
        except Exception as error:  # noqa: BLE001 - reported through readiness and metrics
            self._record_failure(error)
        else:
            self._record_success()

    async def _write(self, batch: Batch) -> None:
        deliveries = batch.deliveries
        body = deliveries[0].rows if len(deliveries) == 1 else b"".join(delivery.rows for delivery in deliveries)
        self._metrics.batch_bytes.observe({}, len(body))
        if self._spool is not None:
            try:
                await self._spool.begin_insert(batch)
            except OSError as error:  # the insert still goes ahead; a crash now may replay it differently
                log.warning("spool: cannot record the batch before inserting it: %s", error)
        rejected = await self._insert_or_split(body, batch.count, 0, [0])
        destination = await self._quarantine(rejected) if rejected else ""
        loop = asyncio.get_running_loop()
        self._metrics.end_to_end_latency.observe({}, loop.time() - batch.oldest_received_at)
        if self._spool is not None:
            self._spool.confirm(batch)
        self._finish_confirmations(batch, {index for index, _, _ in rejected}, destination)
        self._change_pending(-batch.count)
        self._memory.release(batch.count)

    async def _insert_or_split(
        self, body: bytes, count: int, first_row: int, rejected_so_far: list[int]
    ) -> list[tuple[int, bytes, str]]:
        """Inserts `body`; on a data rejection, bisects it. Returns the rejected rows as
        (row index in the batch, row, ClickHouse's error)."""
        failure = await self._insert_with_retries(body, count)
        if failure is None:
            return []
        lines = body.split(b"\n")[:count]
        if count == 1 or rejected_so_far[0] >= SPLIT_ROW_LIMIT:
            rejected_so_far[0] += count
            return [(first_row + index, line, failure.detail) for index, line in enumerate(lines)]
        half = count // 2
        left = await self._insert_or_split(b"\n".join(lines[:half]) + b"\n", half, first_row, rejected_so_far)
        right = await self._insert_or_split(
            b"\n".join(lines[half:]) + b"\n", count - half, first_row + half, rejected_so_far
        )
        return left + right

    async def _insert_with_retries(self, body: bytes, count: int) -> InsertFailure | None:
        """None once ClickHouse has the rows; the failure when it rejects them as data. Transient
        failures are retried without limit: only cancellation (shutdown) ends them."""
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            started = loop.time()
            try:
                if not self._schema_ready:
                    await self._ensure_schema()
                assert self._capabilities is not None
                token = deduplication_token(body) if self._capabilities.deduplicates_inserts else None
                async with asyncio.timeout(self._timeout):
                    await self._connection.insert(self._database, self._table, body, token)
            except Exception as error:  # noqa: BLE001 - classified below, never lost silently
                self._metrics.insert_duration.observe({}, loop.time() - started)
                self._metrics.inserts.inc({"result": "error"})
                failure = self._record_failure(error)
                if failure.kind == "schema":
                    self._schema_ready = False
                if not failure.retryable:
                    log.warning("ClickHouse rejected %d rows: %s", count, failure.detail)
                    return failure
                delay = backoff_seconds(attempt)
                attempt += 1
                self._metrics.retries.inc({})
                log.warning(
                    "insert of %d events failed (%s: %s); retry %d in %.2fs",
                    count, failure.kind, failure.detail, attempt, delay,
                )
                await asyncio.sleep(delay)
                continue
            self._metrics.insert_duration.observe({}, loop.time() - started)
            self._metrics.inserts.inc({"result": "ok"})
            self._metrics.rows_written.add({}, count)
            self._metrics.bytes_written.add({}, len(body))
            self._record_success()
            return None

    # -- quarantine -------------------------------------------------------------------------

    async def _quarantine(self, rejected: list[tuple[int, bytes, str]]) -> str:
        """Keeps each rejected row with its error; returns where they went."""
        now = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        rows = [QuarantineRow(now, error, line.decode(errors="replace")) for _, line, error in rejected]
        body = msgspec.json.Encoder().encode_lines(rows)
        for attempt in range(QUARANTINE_ATTEMPTS):
            try:
                async with asyncio.timeout(self._timeout):
                    await self._connection.insert(self._database, quarantine_table(self._table), body, None)
            except Exception as error:  # noqa: BLE001 - the file is the fallback
                last_error = classify_error(error).detail
                await asyncio.sleep(backoff_seconds(attempt))
            else:
                return self._quarantined("table", len(rows))
        log.error("cannot insert %d rejected rows into %s: %s", len(rows), quarantine_table(self._table), last_error)
        if self._quarantine_directory is not None:
            try:
                await asyncio.to_thread(self._append_quarantine_file, body)
            except OSError as error:
                log.error("cannot write %s: %s", self._quarantine_directory / QUARANTINE_FILE, error)
            else:
                return self._quarantined("file", len(rows))
        for row in rows:
            log.error("rejected row kept only in this log: %s", msgspec.json.encode(row).decode())
        self._metrics.events_dropped.add({"reason": "rejected"}, len(rows))
        return self._quarantined("log", len(rows))

    def _append_quarantine_file(self, body: bytes) -> None:
        assert self._quarantine_directory is not None
        with open(self._quarantine_directory / QUARANTINE_FILE, "ab") as quarantine:
            quarantine.write(body)
            quarantine.flush()
            os.fsync(quarantine.fileno())

    def _quarantined(self, destination: str, count: int) -> str:
        self._metrics.quarantined.add({"destination": destination}, count)
        return destination

    def _finish_confirmations(self, batch: Batch, rejected_rows: set[int], destination: str) -> None:
        first_row = 0
        for delivery in batch.deliveries:
            confirmation = delivery.confirmation
            if confirmation is not None and not confirmation.done():
                rejected = sum(1 for row in range(first_row, first_row + delivery.count) if row in rejected_rows)
                if rejected:
                    where = {
                        "table": quarantine_table(self._table),
                        "file": f"{QUARANTINE_FILE} in SPOOL_DIR",
                        "log": "error log only",
                    }[destination]
                    confirmation.set_exception(RowsRejected(rejected, delivery.count - rejected, where))
                else:
                    confirmation.set_result(delivery.count)
            first_row += delivery.count

    # -- bookkeeping ------------------------------------------------------------------------

    def _record_failure(self, error: BaseException) -> InsertFailure:
        failure = classify_error(error)
        self._metrics.insert_errors.inc({"kind": failure.kind})
        self._metrics.up.set({}, 0)
        self._last_error = f"{failure.kind}: {failure.detail}"
        return failure

    def _record_success(self) -> None:
        self._last_ok_at = asyncio.get_running_loop().time()
        self._metrics.up.set({}, 1)

    def _change_pending(self, delta: int) -> None:
        self._pending_events += delta
        self._metrics.pending_events.set({}, self._pending_events)
