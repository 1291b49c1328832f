"""Schema and readiness: creates (or checks) the database and tables, learns what the server can
do, and remembers when ClickHouse last answered, for /readyz and `clickhouse_up`.

Every other Writer unit reports its successes and failures here, so readiness is one account of
every request made to ClickHouse.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from clickpulse.clickhouse import ClickHouseConnection
from clickpulse.metrics import WriterMetrics
from clickpulse.schema import (
    ServerCapabilities,
    add_column_ddl,
    added_columns,
    capabilities_for,
    column_exists_query,
    database_ddl,
    quarantine_ddl,
    table_ddl,
    table_exists_query,
)
from clickpulse.writer.errors import InsertFailure, TableMissing, classify_error

log = logging.getLogger("clickpulse.writer")


class Readiness:
    def __init__(
        self,
        *,
        connection: ClickHouseConnection,
        database: str,
        table: str,
        create_table: bool,
        timeout: float,
        ready_grace: float,
        metrics: WriterMetrics,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._connection = connection
        self._database = database
        self._table = table
        self._create_table = create_table
        self._timeout = timeout
        self._ready_grace = ready_grace
        self._metrics = metrics
        self._clock = clock
        self._capabilities: ServerCapabilities | None = None
        self._schema_ready = False
        self._last_ok_at: float | None = None
        self._last_error = "not connected yet"
        self._refused = False  # the last answer refused the credentials or grants: not ready at once

    @property
    def schema_ready(self) -> bool:
        return self._schema_ready

    @property
    def capabilities(self) -> ServerCapabilities | None:
        return self._capabilities

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    async def ensure_schema(self) -> ServerCapabilities:
        """Creates (or checks) what the Writer inserts into; raises what the server raised."""
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
                await self._add_missing_columns(capabilities)
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
        self.record_success()
        return capabilities

    async def _add_missing_columns(self, capabilities: ServerCapabilities) -> None:
        """A table made by an earlier version gains the columns added since (schema.ADDED_COLUMNS)."""
        connection, database, table = self._connection, self._database, self._table
        for column, column_type in added_columns(capabilities):
            if not int(await connection.query_value(column_exists_query(database, table, column))):
                await connection.execute(
                    add_column_ddl(database, table, column, column_type, capabilities), capabilities.create_settings
                )
                log.info("table %s.%s: added column %s %s", database, table, column, column_type)

    async def health_check(self) -> None:
        """While idle: does ClickHouse still answer?"""
        try:
            async with asyncio.timeout(self._timeout):
                await self._connection.query_value("SELECT 1")
        except Exception as error:  # noqa: BLE001 - reported through readiness and metrics
            self.record_failure(error)
        else:
            self.record_success()

    def record_failure(self, error: BaseException) -> InsertFailure:
        failure = classify_error(error)
        self._metrics.insert_errors.inc({"kind": failure.kind})
        self._metrics.up.set({}, 0)
        self._last_error = f"{failure.kind}: {failure.detail}"
        self._refused = failure.kind == "auth"
        if failure.kind == "schema":
            self._schema_ready = False  # dropped under us: created again before the next insert
        return failure

    def record_success(self) -> None:
        self._last_ok_at = self._now()
        self._refused = False
        self._metrics.up.set({}, 1)

    def not_ready_reason(self) -> str | None:
        """None when ClickHouse answered within the grace time and the schema exists."""
        where = self._connection.description
        if self._refused:
            return f"clickhouse refused the credentials ({where}): {self._last_error}; fix CLICKHOUSE_DSN"
        if not self._schema_ready or self._last_ok_at is None:
            return f"clickhouse not reachable ({where}): {self._last_error}"
        age = self._now() - self._last_ok_at
        if age > self._ready_grace:
            return f"clickhouse has not answered for {age:.0f}s ({where}): {self._last_error}"
        return None
