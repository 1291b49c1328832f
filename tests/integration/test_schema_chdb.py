"""The modern DDL and the Writer's exact JSONEachRow body on ClickHouse 26.x (chdb, in-process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clickpulse.events import EventDecoder, RowEncoder
from clickpulse.schema import capabilities_for, database_ddl, insert_query, table_ddl
from clickpulse.clickhouse import INSERT_SETTINGS
from tests.conftest import skip_or_fail

pytestmark = pytest.mark.integration


@pytest.fixture
def chdb_session(tmp_path: Path):
    try:
        from chdb import session
    except ImportError:
        skip_or_fail("chdb is not installed (pip install -e '.[test]')")
    chdb = session.Session(str(tmp_path / "chdb"))
    yield chdb
    chdb.cleanup() if hasattr(chdb, "cleanup") else chdb.close()


def test_modern_ddl_and_rows_keep_milliseconds_in_utc(chdb_session) -> None:
    version = str(chdb_session.query("SELECT version()", "CSV")).strip().strip('"')
    capabilities = capabilities_for(version)
    assert capabilities.timestamp_type == "DateTime64(3, 'UTC')"
    assert capabilities.create_settings == {}
    chdb_session.query(database_ddl("analytics"))
    chdb_session.query(table_ddl("analytics", "events", capabilities))

    body = b"\n".join([
        b'{"event_type":"signup","source":"web","created_at":"2024-05-01T14:00:00.123+02:00",'
        b'"user_id":"u\\u0000\\"1","value":2.5,"properties":{"plan":"pro","seats":3,"trial":false}}',
        b'{"event_type":"signup","source":"ios","created_at":"2105-12-31T23:59:59.999Z","event_id":"6f1e3a52-8d7b-4f0a-9c1e-2b3d4e5f6a7b"}',
    ])
    events = EventDecoder().decode_ndjson(body)
    rows = RowEncoder().encode(events)
    query = insert_query("analytics", "events", INSERT_SETTINGS)
    chdb_session.query(query + "\n" + rows.decode())

    result = chdb_session.query(
        "SELECT toString(event_id) AS id, source, user_id, value, toUnixTimestamp64Milli(created_at) AS ms, properties "
        "FROM analytics.events ORDER BY source", "JSONEachRow",
    )
    stored = [json.loads(line) for line in str(result).splitlines() if line.strip()]
    assert [row["source"] for row in stored] == ["ios", "web"]
    ios, web = stored
    assert int(web["ms"]) == 1714564800123
    assert int(ios["ms"]) == 4291747199999
    assert ios["id"] == "6f1e3a52-8d7b-4f0a-9c1e-2b3d4e5f6a7b"
    assert web["id"] == str(events[0].event_id)
    assert web["user_id"] == 'u\x00"1' and ios["user_id"] is None
    assert web["value"] == 2.5 and ios["value"] is None
    assert json.loads(web["properties"]) == {"plan": "pro", "seats": 3, "trial": False}
    assert ios["properties"] == ""


def test_a_repeated_insert_with_the_same_token_is_stored_once(chdb_session) -> None:
    from clickpulse.schema import quarantine_ddl
    from clickpulse.writer.errors import deduplication_token

    version = str(chdb_session.query("SELECT version()", "CSV")).strip().strip('"')
    capabilities = capabilities_for(version)
    assert capabilities.deduplicates_inserts
    chdb_session.query(database_ddl("analytics"))
    chdb_session.query(table_ddl("analytics", "events", capabilities))
    chdb_session.query(quarantine_ddl("analytics", "events"))
    events = EventDecoder().decode_ndjson(
        b'{"event_type":"a","source":"web","created_at":"2024-05-01T00:00:00Z"}\n'
        b'{"event_type":"b","source":"web","created_at":"2024-05-01T00:00:01Z"}\n'
    )
    body = RowEncoder().encode(events)
    def insert(rows: bytes) -> None:
        query = insert_query("analytics", "events", {**INSERT_SETTINGS, "insert_deduplication_token": deduplication_token(rows)})
        chdb_session.query(query + "\n" + rows.decode())

    insert(body)
    insert(body)  # a retry after a lost answer, or a replay after a crash
    assert str(chdb_session.query("SELECT count() FROM analytics.events", "CSV")).strip() == "2"
    other = RowEncoder().encode(EventDecoder().decode_ndjson(
        b'{"event_type":"a","source":"web","created_at":"2024-05-01T00:00:00Z"}\n'
    ))
    insert(other)  # different rows: a different token, stored
    assert str(chdb_session.query("SELECT count() FROM analytics.events", "CSV")).strip() == "3"
