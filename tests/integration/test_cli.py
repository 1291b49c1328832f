"""The command line against a real ClickHouse server: the query command's output (the same table
as the embedded store, pipe-friendly formats, comments), --check-config, and what LOG_LEVEL=debug
and ACCESS_LOG=true add to the log."""

from __future__ import annotations

import signal
import subprocess
import sys
from urllib.parse import quote

import aiohttp
import msgspec
import pytest

from tests.integration.conftest import eventually, make_event, wait_for_rows
from tests.servers import APP_PASSWORD, APP_USER, ClickHouseServer
from tests.support import free_port

pytestmark = pytest.mark.integration


def clickpulse(env: dict[str, str], *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "clickpulse", *arguments], env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def dsn_env(python_env: dict[str, str], clickhouse_server: ClickHouseServer, clickhouse_database: str) -> dict[str, str]:
    clickhouse_server.query(f"CREATE DATABASE {clickhouse_database}")
    clickhouse_server.query(
        f"CREATE TABLE {clickhouse_database}.events (event_type String, n UInt32) ENGINE = MergeTree ORDER BY event_type"
    )
    return {**python_env, "CLICKHOUSE_DSN": clickhouse_server.dsn(clickhouse_database)}


def test_query_with_a_dsn_prints_a_plain_table_and_0_rows_for_an_empty_result(dsn_env: dict[str, str]) -> None:
    result = clickpulse(dsn_env, "query", "SELECT event_type, count() FROM events GROUP BY event_type")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "┌─event_type─┬─count()─┐\n└────────────┴─────────┘\n0 rows\n"  # piped: no colour


def test_query_formats_and_leading_comments(dsn_env: dict[str, str], clickhouse_server: ClickHouseServer, clickhouse_database: str) -> None:
    clickhouse_server.query(f"INSERT INTO {clickhouse_database}.events VALUES ('click', 2), ('open', 1)")
    sql = "-- the types\n/* sorted */ SELECT event_type, n FROM events ORDER BY event_type"
    table = clickpulse(dsn_env, "query", sql)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[1:] == ["│ click      │ 2 │", "│ open       │ 1 │", "└────────────┴───┘", "2 rows"]
    assert clickpulse(dsn_env, "query", sql, "--format", "TSV").stdout == "click\t2\nopen\t1\n"
    assert clickpulse(dsn_env, "query", sql, "--format", "csvwithnames").stdout == '"event_type","n"\n"click",2\n"open",1\n'
    lines = clickpulse(dsn_env, "query", "--format", "JSONEachRow", sql).stdout.splitlines()
    assert [msgspec.json.decode(line) for line in lines] == [{"event_type": "click", "n": 2}, {"event_type": "open", "n": 1}]
    bad = clickpulse(dsn_env, "query", sql, "--format", "Pretty")
    assert bad.returncode == 2 and "--format" in bad.stderr


def test_check_config_passes_for_a_usable_server_and_says_what_it_would_do(
    python_env: dict[str, str], clickhouse_server: ClickHouseServer, clickhouse_database: str
) -> None:
    dsn = f"http://{APP_USER}:{quote(APP_PASSWORD, safe='')}@127.0.0.1:{clickhouse_server.http_port}/{clickhouse_database}"
    env = {**python_env, "CLICKHOUSE_DSN": dsn, "HTTP_HOST": "127.0.0.1", "HTTP_PORT": "0"}
    absent = clickpulse(env, "--check-config")
    assert absent.returncode == 0, absent.stdout + absent.stderr
    assert f"would    create database {clickhouse_database} and table {clickhouse_database}.events and " in absent.stdout
    assert APP_PASSWORD not in absent.stdout and quote(APP_PASSWORD, safe="") not in absent.stdout
    clickhouse_server.query(f"CREATE DATABASE {clickhouse_database}")
    clickhouse_server.query(f"CREATE TABLE {clickhouse_database}.events (x UInt8) ENGINE = Memory")
    present = clickpulse(env, "--check-config")
    assert present.returncode == 0, present.stdout
    assert f"ok       user {APP_USER} may insert into {clickhouse_database}.events" in present.stdout
    assert present.stdout.strip().splitlines()[-1] == "result   the service would start and write", present.stdout


def test_check_config_exits_2_when_the_service_could_not_write(
    python_env: dict[str, str], clickhouse_server: ClickHouseServer, clickhouse_database: str
) -> None:
    missing = clickpulse(
        {**python_env, "CLICKHOUSE_DSN": clickhouse_server.dsn(clickhouse_database), "CLICKHOUSE_CREATE_TABLE": "false", "HTTP_PORT": "0"},
        "--check-config",
    )
    assert missing.returncode == 2
    assert f"error    table {clickhouse_database}.events does not exist and CLICKHOUSE_CREATE_TABLE=false" in missing.stdout
    down = clickpulse({**python_env, "CLICKHOUSE_DSN": f"http://127.0.0.1:{free_port()}/db", "HTTP_PORT": "0"}, "--check-config")
    assert down.returncode == 2 and "cannot query ClickHouse" in down.stdout
    bad = clickpulse({**python_env, "BATCH_SIZE": "many"}, "--check-config")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "clickpulse: invalid BATCH_SIZE='many': not a whole number"
    ]


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_debug_logs_each_flush_and_insert_and_access_log_each_request(
    clickhouse_server: ClickHouseServer, clickhouse_database: str, start_service, log_format: str
) -> None:
    service = start_service(
        CLICKHOUSE_DSN=clickhouse_server.dsn(clickhouse_database), FLUSH_INTERVAL="100ms",
        LOG_LEVEL="debug", ACCESS_LOG="true", LOG_FORMAT=log_format,
    )
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: service.is_ready(http), timeout=20)
        async with http.post(service.url + "/events?wait=true", json=[make_event(i) for i in range(3)]) as response:
            assert response.status == 200
        assert await wait_for_rows(clickhouse_server, clickhouse_database, 3) == 3
    service.process.send_signal(signal.SIGTERM)
    assert await service.wait_exit(30) == 0
    log = service.log
    if log_format == "text":
        assert "flush (interval): 3 events from 1 requests" in log
        assert f"insert into {clickhouse_database}.events: 3 rows," in log and "(attempt 1)" in log
        assert '127.0.0.1 "POST /events" 200 ' in log
        return
    records = [msgspec.json.decode(line) for line in log.splitlines() if line.strip()]
    [access] = [record for record in records if record["logger"] == "clickpulse.access" and record["path"] == "/events"]
    assert access["method"] == "POST" and access["status"] == 200 and access["duration_ms"] > 0
    [insert] = [record for record in records if record["message"].startswith("insert into")]
    assert insert["level"] == "debug" and "3 rows" in insert["message"]
