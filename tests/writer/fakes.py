"""A fake ClickHouse connection and a recording ledger, for the Writer's units."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import msgspec
from aiochclient import ChClientError
from aioprometheus import Registry

from clickpulse.messages import Batch, Delivery
from clickpulse.metrics import WriterMetrics
from clickpulse.writer import Writer
from clickpulse.writer.insert import Inserter
from clickpulse.writer.quarantine import Quarantine, Splitter
from clickpulse.writer.readiness import Readiness

REJECTION = "Code: 27. DB::Exception: Cannot parse input: expected '\"' before: 'bad'"


@dataclass
class FakeClickHouse:
    """Takes rows unless a row holds `"bad"`; fails the first `transient_failures` inserts."""

    transient_failures: int = 0
    quarantine_fails: bool = False
    down: bool = False  # every request fails as a refused connection
    version: str = "24.8.1.1"
    names_rows: bool = False  # parse errors say "(at row N)", as ClickHouse's do
    inserts: list[tuple[str | None, bytes]] = field(default_factory=list)
    quarantined: list[bytes] = field(default_factory=list)
    statements: list[str] = field(default_factory=list)

    backend = "http"
    description = "a fake ClickHouse"

    async def query_value(self, sql: str) -> str:
        if self.down:
            raise aiohttp.ClientOSError(111, "Connection refused")
        return self.version if "version()" in sql else "1"

    async def execute(self, sql: str, settings: object) -> None:
        self.statements.append(sql)

    async def query_text(self, sql: str, database: str, output_format: str = "PrettyCompactMonoBlock") -> str:
        return ""

    async def close(self) -> None:
        pass

    async def insert(
        self, database: str, table: str, body: bytes, deduplication_token: str | None, query_id: str | None = None
    ) -> None:
        if self.down:
            raise aiohttp.ClientOSError(111, "Connection refused")
        if table.endswith("_quarantine"):
            if self.quarantine_fails:
                raise aiohttp.ClientOSError(111, "Connection refused")
            self.quarantined.append(body)
            return
        if self.transient_failures:
            self.transient_failures -= 1
            raise aiohttp.ClientOSError(104, "Connection reset by peer")
        if b'"bad"' in body:
            if self.names_rows:
                row = body.split(b"\n").index(next(line for line in body.split(b"\n") if b'"bad"' in line)) + 1
                raise ChClientError(f"{REJECTION}: (at row {row})")
            raise ChClientError(REJECTION)
        self.inserts.append((deduplication_token, body))

    @property
    def inserted_rows(self) -> list[bytes]:
        return [line for _, body in self.inserts for line in body.splitlines()]


@dataclass
class RecordingLedger:
    """Records what the Writer reports around each insert."""

    calls: list[tuple[str, Batch]] = field(default_factory=list)
    fail_before_insert: bool = False

    async def before_insert(self, batch: Batch) -> None:
        self.calls.append(("before_insert", batch))
        if self.fail_before_insert:
            raise OSError(28, "No space left on device")

    async def after_insert(self, batch: Batch) -> None:
        self.calls.append(("after_insert", batch))


async def no_pause(seconds: float) -> None:
    await asyncio.sleep(0)


@dataclass
class WriterParts:
    clickhouse: FakeClickHouse
    metrics: WriterMetrics
    readiness: Readiness
    inserter: Inserter
    splitter: Splitter
    quarantine: Quarantine
    ledger: RecordingLedger

    def writer(self) -> Writer:
        return Writer(
            readiness=self.readiness, splitter=self.splitter, quarantine=self.quarantine,
            ledger=self.ledger, metrics=self.metrics,
        )


def writer_parts(
    clickhouse: FakeClickHouse | None = None,
    *,
    quarantine_directory: Path | None = None,
    small_group: int = 4,
    clock: list[float] | None = None,
) -> WriterParts:
    clickhouse = clickhouse or FakeClickHouse()
    metrics = WriterMetrics(Registry())
    readiness = Readiness(
        connection=clickhouse, database="analytics", table="events", create_table=True,
        timeout=1.0, ready_grace=15.0, metrics=metrics,
        clock=(lambda: clock[0]) if clock is not None else None,
    )
    inserter = Inserter(
        connection=clickhouse, database="analytics", table="events", timeout=1.0,
        readiness=readiness, metrics=metrics, pause=no_pause,
    )
    quarantine = Quarantine(
        connection=clickhouse, database="analytics", table="events", timeout=1.0,
        directory=quarantine_directory, metrics=metrics, pause=no_pause,
    )
    return WriterParts(
        clickhouse, metrics, readiness, inserter, Splitter(inserter, small_group), quarantine, RecordingLedger()
    )


def row(name: str) -> bytes:
    return msgspec.json.encode({"event_type": name}) + b"\n"


def delivery(*names: str, confirmed: bool = True) -> Delivery:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[int] | None = loop.create_future() if confirmed else None
    return Delivery(b"".join(row(name) for name in names), len(names), loop.time(), None, future)
