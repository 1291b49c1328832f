"""HttpClickHouse against the real ClickHouse server: an insert body of many slices lands whole."""

from __future__ import annotations

import aiohttp
import msgspec

from clickpulse.clickhouse import INSERT_SLICE_BYTES, HttpClickHouse
from clickpulse.config import parse_dsn
from clickpulse.events import EventDecoder, RowEncoder
from clickpulse.schema import capabilities_for, database_ddl, table_ddl
from tests.integration.conftest import make_event
from tests.servers import ClickHouseServer


async def test_a_body_of_many_slices_lands_as_every_row_it_holds(
    clickhouse_server: ClickHouseServer, clickhouse_database: str,
) -> None:
    capabilities = capabilities_for(clickhouse_server.query("SELECT version()"))
    clickhouse_server.query(database_ddl(clickhouse_database))
    clickhouse_server.query(
        table_ddl(clickhouse_database, "events", capabilities),
        **{name: str(value) for name, value in capabilities.create_settings.items()},
    )

    events, _ = EventDecoder().decode_json(msgspec.json.encode([make_event(index) for index in range(12_000)]))
    body = RowEncoder().encode(events)
    assert len(body) > 4 * INSERT_SLICE_BYTES

    async with aiohttp.ClientSession() as session:
        connection = HttpClickHouse(parse_dsn(clickhouse_server.dsn(clickhouse_database)), session)
        await connection.insert(clickhouse_database, "events", body, None, "slices-1")

    count, distinct_ids, values, users = (await clickhouse_server.aquery(
        f"SELECT count(), uniqExact(event_id), sum(value), uniqExact(user_id) FROM {clickhouse_database}.events"
    )).split()
    assert (int(count), int(distinct_ids), float(values), int(users)) == (12_000, 12_000, sum(range(12_000)), 12_000)
