"""The Writer: an actor (actor.py) built from units that each do one job and can be read and
tested on their own: errors.py (classification, backoff, tokens), readiness.py (schema and
readiness), insert.py (insert with retries), quarantine.py (bisection and the quarantine)."""

from __future__ import annotations

from pathlib import Path

from clickpulse.clickhouse import ClickHouseConnection
from clickpulse.metrics import WriterMetrics
from clickpulse.ports import Ledger
from clickpulse.writer.actor import Writer
from clickpulse.writer.insert import Inserter
from clickpulse.writer.quarantine import Quarantine, Splitter
from clickpulse.writer.readiness import Readiness

__all__ = ["Writer", "build_writer"]


def build_writer(
    *,
    connection: ClickHouseConnection,
    database: str,
    table: str,
    create_table: bool,
    timeout: float,
    ready_grace: float,
    quarantine_directory: Path | None,
    ledger: Ledger,
    metrics: WriterMetrics,
) -> Writer:
    readiness = Readiness(
        connection=connection, database=database, table=table, create_table=create_table,
        timeout=timeout, ready_grace=ready_grace, metrics=metrics,
    )
    inserter = Inserter(
        connection=connection, database=database, table=table, timeout=timeout, readiness=readiness, metrics=metrics
    )
    quarantine = Quarantine(
        connection=connection, database=database, table=table, timeout=timeout,
        directory=quarantine_directory, metrics=metrics,
    )
    return Writer(
        readiness=readiness, splitter=Splitter(inserter), quarantine=quarantine, ledger=ledger, metrics=metrics
    )
