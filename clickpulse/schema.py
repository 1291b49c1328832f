"""The events table: one DDL template, rendered for what the connected server supports."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

# ORDER BY (event_type, created_at): analytics queries filter by event type and a time range,
# so those two decide which granules ClickHouse reads. PARTITION BY month keeps parts few and
# lets old months be dropped whole (ALTER TABLE ... DROP PARTITION) for retention.
TABLE_DDL_TEMPLATE = """\
CREATE TABLE IF NOT EXISTS {database}.{table}{on_cluster}
(
    event_id    UUID,
    event_type  LowCardinality(String),
    source      LowCardinality(String),
    user_id     Nullable(String),
    value       Nullable(Float64),
    created_at  {timestamp_type},
    properties  String,
    source_key  LowCardinality(String),
    anonymous_id  Nullable(String),
    received_at  {timestamp_type},
    context  String,
    original_timestamp  Nullable({timestamp_type})
)
ENGINE = {engine}
PARTITION BY toYYYYMM(created_at)
ORDER BY (event_type, created_at){settings}
"""

# Columns added after the first release, with their types: tables created before gain them at
# start (`add_column_ddl`). `{timestamp_type}` is the server's (`added_columns`).
# source_key: the name of the ingest key that sent the row ('' without).
# anonymous_id, received_at, context, original_timestamp: the Segment-compatible /v1 API (and
# received_at and context, the enrichment of every endpoint); see README "Send with an existing SDK".
ADDED_COLUMNS: tuple[tuple[str, str], ...] = (
    ("source_key", "LowCardinality(String)"),
    ("anonymous_id", "Nullable(String)"),
    ("received_at", "{timestamp_type}"),
    ("context", "String"),
    ("original_timestamp", "Nullable({timestamp_type})"),
)

# Rows ClickHouse refused as data, with its error, for a person to inspect and replay.
QUARANTINE_DDL_TEMPLATE = """\
CREATE TABLE IF NOT EXISTS {database}.{table}
(
    quarantined_at  DateTime('UTC'),
    error           String,
    row             String
)
ENGINE = MergeTree
ORDER BY quarantined_at
"""

# How many recent inserts a plain MergeTree table remembers to drop a repeated one: the retry of
# an insert whose answer was lost, or the replay of the batch in flight at a crash.
DEDUPLICATION_WINDOW = 1000

DATABASE_DDL_TEMPLATE = "CREATE DATABASE IF NOT EXISTS {database}"


@dataclass(frozen=True)
class ServerCapabilities:
    """What differs between ClickHouse 18.16 (CI) and the 24.x-26.x servers users run."""

    version: str
    timestamp_type: str
    create_settings: dict[str, int]
    # insert_deduplication_token and non_replicated_deduplication_window (22.2+).
    deduplicates_inserts: bool = False

    @property
    def keeps_milliseconds(self) -> bool:
        return self.timestamp_type.startswith("DateTime64")


def parse_version(version: str) -> tuple[int, int]:
    match = re.match(r"\s*(\d+)\.(\d+)", version)
    if not match:
        raise ValueError(f"unrecognised ClickHouse version {version!r}")
    return int(match.group(1)), int(match.group(2))


def capabilities_for(version: str) -> ServerCapabilities:
    major_minor = parse_version(version)
    # DateTime64 arrived in 20.1; LowCardinality needed an opt-in until 19.x.
    timestamp_type = "DateTime64(3, 'UTC')" if major_minor >= (20, 1) else "DateTime('UTC')"
    create_settings = {"allow_experimental_low_cardinality_type": 1} if major_minor < (19, 0) else {}
    return ServerCapabilities(
        version=version.strip(),
        timestamp_type=timestamp_type,
        create_settings=create_settings,
        deduplicates_inserts=major_minor >= (22, 2),
    )


def quote_identifier(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def quote_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def on_cluster_clause(cluster: str | None) -> str:
    return f" ON CLUSTER {quote_identifier(cluster)}" if cluster else ""


def table_ddl(
    database: str,
    table: str,
    capabilities: ServerCapabilities,
    *,
    engine: str = "MergeTree",
    on_cluster: str | None = None,
) -> str:
    return TABLE_DDL_TEMPLATE.format(
        database=quote_identifier(database),
        table=quote_identifier(table),
        on_cluster=on_cluster_clause(on_cluster),
        engine=engine,
        timestamp_type=capabilities.timestamp_type,
        settings=(
            f"\nSETTINGS non_replicated_deduplication_window = {DEDUPLICATION_WINDOW}"
            if capabilities.deduplicates_inserts and engine == "MergeTree"
            else ""
        ),
    )


def added_columns(capabilities: ServerCapabilities) -> tuple[tuple[str, str], ...]:
    """ADDED_COLUMNS with the server's timestamp type."""
    return tuple(
        (column, column_type.format(timestamp_type=capabilities.timestamp_type)) for column, column_type in ADDED_COLUMNS
    )


def quarantine_table(table: str) -> str:
    return f"{table}_quarantine"


def quarantine_ddl(database: str, table: str) -> str:
    return QUARANTINE_DDL_TEMPLATE.format(
        database=quote_identifier(database), table=quote_identifier(quarantine_table(table))
    )


def database_ddl(database: str) -> str:
    return DATABASE_DDL_TEMPLATE.format(database=quote_identifier(database))


def table_exists_query(database: str, table: str) -> str:
    """1 if the table exists, else 0; system.tables answers on every server version."""
    return (
        f"SELECT count() FROM system.tables WHERE database = {quote_string(database)} AND name = {quote_string(table)}"
    )


def column_exists_query(database: str, table: str, column: str) -> str:
    """1 if the column exists, else 0."""
    return (
        f"SELECT count() FROM system.columns WHERE database = {quote_string(database)} "
        f"AND table = {quote_string(table)} AND name = {quote_string(column)}"
    )


def add_column_ddl(database: str, table: str, column: str, column_type: str, capabilities: ServerCapabilities) -> str:
    """ALTER TABLE … ADD COLUMN; with IF NOT EXISTS where the server parses it (not 18.16, which
    the caller asks system.columns first), so two instances starting at once both succeed."""
    if_not_exists = " IF NOT EXISTS" if parse_version(capabilities.version) >= (19, 0) else ""
    return (
        f"ALTER TABLE {quote_identifier(database)}.{quote_identifier(table)} "
        f"ADD COLUMN{if_not_exists} {quote_identifier(column)} {column_type}"
    )


def insert_query(database: str, table: str, settings: Mapping[str, str] | None = None) -> str:
    clause = ", ".join(f"{name} = {quote_string(value)}" for name, value in (settings or {}).items())
    settings_clause = f" SETTINGS {clause}" if clause else ""
    return f"INSERT INTO {quote_identifier(database)}.{quote_identifier(table)}{settings_clause} FORMAT JSONEachRow"


def init_script(database: str, table: str) -> str:
    """The SQL file shipped in ops/clickhouse/ for servers that run init scripts (compose)."""
    return (
        "-- Generated by clickpulse.schema.init_script for ClickHouse 22.2+; tests/test_schema.py keeps it in sync.\n"
        "-- clickpulse creates the same tables itself at start; this file lets a new server have them first.\n"
        f"{database_ddl(database)};\n\n{table_ddl(database, table, capabilities_for('22.2')).rstrip()};\n\n"
        f"{quarantine_ddl(database, table).rstrip()};\n"
    )


def replicated_engine(database: str, table: str) -> str:
    """ReplicatedMergeTree with the conventional Keeper path; each server's `shard` and `replica`
    macros make the path and replica name unique per shard and per server."""
    keeper_path = f"/clickhouse/tables/{{shard}}/{database}/{table}"
    return f"ReplicatedMergeTree({quote_string(keeper_path)}, '{{replica}}')"


def distributed_table_ddl(
    database: str, table: str, *, local_table: str, cluster: str, on_cluster: bool = True
) -> str:
    # cityHash64(event_id), not rand(): a retried batch sends the same rows to the same shards, so
    # the replicated tables' insert deduplication can recognise the repeated blocks.
    engine = (
        f"Distributed({quote_string(cluster)}, {quote_string(database)}, {quote_string(local_table)}, "
        "cityHash64(event_id))"
    )
    return (
        f"CREATE TABLE IF NOT EXISTS {quote_identifier(database)}.{quote_identifier(table)}"
        f"{on_cluster_clause(cluster if on_cluster else None)}\n"
        f"AS {quote_identifier(database)}.{quote_identifier(local_table)}\n"
        f"ENGINE = {engine}\n"
    )


def cluster_script(database: str, cluster: str, *, local_table: str, distributed_table: str) -> str:
    """The SQL file shipped in ops/clickhouse/ for a ClickHouse cluster: a ReplicatedMergeTree table
    on every server and a Distributed table over them, which clickpulse inserts into."""
    capabilities = capabilities_for("20.1")
    local_ddl = table_ddl(
        database, local_table, capabilities, engine=replicated_engine(database, local_table), on_cluster=cluster
    )
    distributed_ddl = distributed_table_ddl(database, distributed_table, local_table=local_table, cluster=cluster)
    return (
        "-- Generated by clickpulse.schema.cluster_script for ClickHouse 20.1+; tests/test_schema.py keeps it in sync.\n"
        f"-- Needs a cluster {quote_identifier(cluster)} in remote_servers (internal_replication=true), Keeper or\n"
        "-- ZooKeeper, and the `shard` and `replica` macros on every server. Run it once, on any server.\n"
        f"-- Then start clickpulse with CLICKHOUSE_TABLE={distributed_table} CLICKHOUSE_CREATE_TABLE=false.\n"
        f"{database_ddl(database)}{on_cluster_clause(cluster)};\n\n"
        f"{local_ddl.rstrip()};\n\n"
        f"{distributed_ddl.rstrip()};\n"
    )
