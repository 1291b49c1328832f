"""The Writer actor: owns the ClickHouse client and does one INSERT per batch.

Each batch is encoded once (msgspec → JSONEachRow) and sent with `insert_file`. A failure is
classified: connection trouble, time-outs and server-side errors are retried with exponential
backoff and full jitter for as long as the process runs, so a ClickHouse outage delays rows
instead of losing them (and, through the bounded mailboxes, makes intake answer 503). Only a
batch that ClickHouse rejects as data is dropped, counted and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from aiochclient import ChClient, ChClientError

from clickpulse.batcher import Batch
from clickpulse.config import ClickHouseTarget
from clickpulse.events import RowEncoder
from clickpulse.metrics import WriterMetrics
from clickpulse.schema import ServerCapabilities, capabilities_for, database_ddl, insert_query, table_ddl

log = logging.getLogger(__name__)

ERROR_KINDS = ("connection", "timeout", "server", "rejected", "schema")

# ClickHouse error codes meaning "this data can never be inserted as it is": the parse and
# conversion failures (CANNOT_PARSE_*, TYPE_MISMATCH, CANNOT_CONVERT_TYPE, INCORRECT_DATA, ...).
_REJECTED_DATA_CODES = frozenset({6, 25, 26, 27, 38, 41, 53, 69, 70, 72, 117, 131, 376})
_MISSING_SCHEMA_CODES = frozenset({60, 81})  # UNKNOWN_TABLE, UNKNOWN_DATABASE
_ERROR_CODE = re.compile(r"Code:\s*(\d+)")

# ClickHouse may parse ISO 8601 timestamps with offsets only in best-effort mode on old servers.
INSERT_SETTINGS = {"date_time_input_format": "best_effort"}
BACKOFF_BASE_SECONDS = 0.1
BACKOFF_CAP_SECONDS = 5.0
HEALTH_CHECK_SECONDS = 5.0
READY_WITHIN_SECONDS = 15.0


@dataclass(frozen=True)
class InsertFailure:
    kind: str
    retryable: bool
    detail: str


def classify_error(error: BaseException) -> InsertFailure:
    if isinstance(error, TimeoutError):
        return InsertFailure("timeout", True, "ClickHouse did not answer in time")
    if isinstance(error, (aiohttp.ClientError, OSError)):
        return InsertFailure("connection", True, f"{type(error).__name__}: {error}")
    if isinstance(error, ChClientError):
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


class _Stop:
    """Mailbox message: write what came before, then end `run()`."""


_STOP = _Stop()


class Writer:
    """Owns the ChClient and the batches handed to it. Talk to it through `submit()`/`stop()`."""

    def __init__(
        self,
        *,
        target: ClickHouseTarget,
        table: str,
        session: aiohttp.ClientSession,
        timeout: float,
        metrics: WriterMetrics,
        inflight_batches: int = 2,
    ) -> None:
        self._target = target
        self._table = table
        self._session = session
        self._timeout = timeout
        self._metrics = metrics
        self._mailbox: asyncio.Queue[Batch | _Stop] = asyncio.Queue(maxsize=inflight_batches)
        self._client = self._new_client()
        self._insert_client = self._new_client(**INSERT_SETTINGS)
        self._insert_query = insert_query(target.database, table)
        self._encoder = RowEncoder()
        self._capabilities: ServerCapabilities | None = None
        self._schema_ready = False
        self._last_ok_at: float | None = None
        self._last_error = "not connected yet"
        self._pending_events = 0
        self._stop_requested = asyncio.Event()
        metrics.up.set({}, 0)
        metrics.pending_events.set({}, 0)

    # -- messages ---------------------------------------------------------------------------

    async def submit(self, batch: Batch) -> None:
        """Waits while the mailbox is full: that wait is the backpressure."""
        self._change_pending(len(batch.events))
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
        """None when ClickHouse answered within READY_WITHIN_SECONDS and the schema exists."""
        if not self._schema_ready or self._last_ok_at is None:
            return f"clickhouse not reachable: {self._last_error}"
        age = asyncio.get_running_loop().time() - self._last_ok_at
        if age > READY_WITHIN_SECONDS:
            return f"clickhouse has not answered for {age:.0f}s: {self._last_error}"
        return None

    # -- the task ---------------------------------------------------------------------------

    async def run(self) -> None:
        await self._connect()
        while True:
            try:
                message = await asyncio.wait_for(self._mailbox.get(), HEALTH_CHECK_SECONDS)
            except TimeoutError:
                await self._health_check()
                continue
            if isinstance(message, _Stop):
                return
            await self._write(message)

    def abandon(self) -> int:
        """Called when shutdown ran out of time: counts and returns the events never written."""
        lost = self._pending_events
        if lost:
            self._metrics.events_dropped.add({"reason": "shutdown"}, lost)
            self._change_pending(-lost)
        return lost

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
                log.warning("ClickHouse at %s not ready (%s); retrying in %.1fs", self._target.redacted, failure.detail, delay)
                attempt += 1
                await self._sleep_unless_stopped(delay)

    async def _sleep_unless_stopped(self, delay: float) -> None:
        """A backoff pause that a stop request cuts short (once: after that, pauses are whole)."""
        if self._stop_requested.is_set():
            await asyncio.sleep(delay)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_requested.wait(), delay)

    async def _ensure_schema(self) -> None:
        async with asyncio.timeout(self._timeout):
            version = await self._client.fetchval("SELECT version()")
        capabilities = capabilities_for(str(version))
        ddl_client = self._new_client(**capabilities.create_settings)
        async with asyncio.timeout(self._timeout):
            await ddl_client.execute(database_ddl(self._target.database))
            await ddl_client.execute(table_ddl(self._target.database, self._table, capabilities))
        if self._capabilities != capabilities:
            log.info(
                "ClickHouse %s at %s: table %s.%s ready (created_at %s)",
                capabilities.version,
                self._target.redacted,
                self._target.database,
                self._table,
                capabilities.timestamp_type,
            )
        self._capabilities = capabilities
        self._schema_ready = True
        self._record_success()

    async def _health_check(self) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await self._client.fetchval("SELECT 1")
        except Exception as error:  # noqa: BLE001 - reported through readiness and metrics
            self._record_failure(error)
        else:
            self._record_success()

    async def _write(self, batch: Batch) -> None:
        body = self._encoder.encode(batch.events)
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            started = loop.time()
            try:
                if not self._schema_ready:
                    await self._ensure_schema()
                async with asyncio.timeout(self._timeout):
                    await self._insert_client.insert_file(self._insert_query, body)
            except Exception as error:  # noqa: BLE001 - classified below, never lost silently
                self._metrics.insert_duration.observe({}, loop.time() - started)
                self._metrics.inserts.inc({"result": "error"})
                failure = self._record_failure(error)
                if failure.kind == "schema":
                    self._schema_ready = False
                if not failure.retryable:
                    log.error(
                        "ClickHouse rejected a batch of %d events; they are dropped: %s", len(batch.events), failure.detail
                    )
                    self._metrics.events_dropped.add({"reason": "rejected"}, len(batch.events))
                    self._change_pending(-len(batch.events))
                    return
                delay = backoff_seconds(attempt)
                attempt += 1
                log.warning(
                    "insert of %d events failed (%s: %s); retry %d in %.2fs",
                    len(batch.events), failure.kind, failure.detail, attempt, delay,
                )
                await asyncio.sleep(delay)
                continue
            self._metrics.insert_duration.observe({}, loop.time() - started)
            self._metrics.inserts.inc({"result": "ok"})
            self._metrics.rows_written.add({}, len(batch.events))
            self._metrics.bytes_written.add({}, len(body))
            self._change_pending(-len(batch.events))
            self._record_success()
            return

    # -- bookkeeping ------------------------------------------------------------------------

    def _new_client(self, **settings: object) -> ChClient:
        return ChClient(
            self._session,
            url=self._target.url,
            user=self._target.user,
            password=self._target.password,
            database=None,  # every query names its database, which may not exist yet
            **settings,
        )

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
