"""The events table: one DDL template, rendered for what the connected server supports."""

from __future__ import annotations

import re
from dataclasses import dataclass

# ORDER BY (event_type, created_at): analytics queries filter by event type and a time range,
# so those two decide which granules ClickHouse reads. PARTITION BY month keeps parts few and
# lets old months be dropped whole (ALTER TABLE ... DROP PARTITION) for retention.
TABLE_DDL_TEMPLATE = """\
CREATE TABLE IF NOT EXISTS {database}.{table}
(
    event_id    UUID,
    event_type  LowCardinality(String),
    source      LowCardinality(String),
    user_id     Nullable(String),
    value       Nullable(Float64),
    created_at  {timestamp_type},
    properties  String
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(created_at)
ORDER BY (event_type, created_at)
"""

DATABASE_DDL_TEMPLATE = "CREATE DATABASE IF NOT EXISTS {database}"


@dataclass(frozen=True)
class ServerCapabilities:
    """What differs between ClickHouse 18.16 (CI) and the 24.x-26.x servers users run."""

    version: str
    timestamp_type: str
    create_settings: dict[str, int]

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
    return ServerCapabilities(version=version.strip(), timestamp_type=timestamp_type, create_settings=create_settings)


def quote_identifier(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def table_ddl(database: str, table: str, capabilities: ServerCapabilities) -> str:
    return TABLE_DDL_TEMPLATE.format(
        database=quote_identifier(database),
        table=quote_identifier(table),
        timestamp_type=capabilities.timestamp_type,
    )


def database_ddl(database: str) -> str:
    return DATABASE_DDL_TEMPLATE.format(database=quote_identifier(database))


def insert_query(database: str, table: str) -> str:
    return f"INSERT INTO {quote_identifier(database)}.{quote_identifier(table)} FORMAT JSONEachRow"
