"""The public edge against the real things: `python -m clickpulse` and the in-process Service with
ClickHouse 18.16 (tests/servers.py) and the embedded store (chDB)."""

from __future__ import annotations

import asyncio
import gzip
import logging
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.integration.conftest import (
    count_rows,
    eventually,
    make_event,
    metric_samples,
    running_service,
    wait_for_rows,
)
from clickpulse.schema import added_columns, capabilities_for
from tests.servers import ClickHouseServer

pytestmark = pytest.mark.integration

SERVER_SECRET = "sk_live_integration_000000"
BROWSER_SECRET = "pk_live_integration_111111"


def write_keys(path: Path, server_secret: str = SERVER_SECRET) -> Path:
    path.write_text(
        f'[[keys]]\nname = "backend"\nsecret = "{server_secret}"\nkind = "server"\n\n'
        f'[[keys]]\nname = "landing"\nsecret = "{BROWSER_SECRET}"\nkind = "browser"\n'
        'origins = ["https://shop.example"]\nevents_per_second = 5\nburst = 5\n'
    )
    return path


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def test_keys_end_to_end_rows_carry_the_key_name_and_sighup_rotates(
    clickhouse_server: ClickHouseServer, clickhouse_database: str, start_service, tmp_path: Path
) -> None:
    keys = write_keys(tmp_path / "keys.toml")
    service = start_service(
        CLICKHOUSE_DSN=clickhouse_server.dsn(clickhouse_database), INGEST_KEYS_FILE=str(keys), FLUSH_INTERVAL="100ms",
    )
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: service.is_ready(http), timeout=20)
        async with http.post(service.url + "/events", json=make_event(0)) as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"] == 'Bearer realm="clickpulse"'
        async with http.post(service.url + "/events", json=[make_event(1), make_event(2)],
                             headers=bearer(SERVER_SECRET)) as response:
            assert response.status == 202
        async with http.post(service.url + f"/events?key={BROWSER_SECRET}", data=b'{"event_type":"v","source":"w",'
                             b'"created_at":"2024-05-01T12:00:00Z"}', headers={"Origin": "https://shop.example",
                                                                               "Content-Type": "text/plain"}) as response:
            assert response.status == 202
        assert await wait_for_rows(clickhouse_server, clickhouse_database, 3) == 3
        by_key = await clickhouse_server.aquery(
            f"SELECT source_key, count() FROM {clickhouse_database}.events GROUP BY source_key ORDER BY source_key"
        )
        assert by_key.split("\n")[:2] == ["backend\t2", "landing\t1"]

        rotated = "sk_live_rotated_integration_2"
        write_keys(keys, rotated)
        service.process.send_signal(signal.SIGHUP)

        async def rotated_key_works() -> bool:
            async with http.post(service.url + "/events", json=make_event(3), headers=bearer(rotated)) as answer:
                return answer.status == 202

        await eventually(rotated_key_works, timeout=10)
        async with http.post(service.url + "/events", json=make_event(4), headers=bearer(SERVER_SECRET)) as response:
            assert response.status == 401
        keys.write_text("[[keys]]\nname = 'broken'\n")
        service.process.send_signal(signal.SIGHUP)
        await eventually(lambda: asyncio.sleep(0, "keeping the" in service.log), timeout=10)
        async with http.post(service.url + "/events", json=make_event(5), headers=bearer(rotated)) as response:
            assert response.status == 202
        async with http.get(service.url + "/metrics") as response:
            metrics = await response.text()
    assert 'ingest_key_events_total{key="backend"}' in metrics
    assert metric_samples(metrics)['requests_rejected_total{reason="unauthorized"}'] >= 2
    service.process.send_signal(signal.SIGTERM)
    assert await service.wait_exit(30) == 0
    for secret in (SERVER_SECRET, rotated, BROWSER_SECRET):
        assert secret not in service.log and secret not in metrics
    assert "Traceback" not in service.log and " ERROR " not in service.log


@pytest.mark.parametrize(("text", "expected"), [
    ("[[keys]]\nname = 'a'\nsecret = 'sk_live_0123456789abcdef'\nkind = 'server'\nextra = 1\n", "keys[0] (name 'a'): unknown field 'extra'"),
    ("[[keys]]\nname = 'a'\nsecret = 'sk_live_0123456789abcdef'\nkind = 'server'\n"
     "[[keys]]\nname = 'a'\nsecret = 'sk_live_0123456789abcdeX'\nkind = 'server'\n", "keys[1] (name 'a'): duplicate name"),
    ("not toml [", "not TOML"),
])
def test_a_bad_keys_file_exits_2_with_one_line_naming_file_and_entry(
    python_env: dict[str, str], tmp_path: Path, text: str, expected: str
) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "clickpulse"],
        env={**python_env, "INGEST_KEYS_FILE": str(keys), "DATA_DIR": str(tmp_path / "data"), "HTTP_PORT": "0",
             "HTTP_HOST": "127.0.0.1"},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(keys) in lines[0] and expected in lines[0]
    assert "0123456789" not in result.stderr


async def test_an_open_collector_listening_beyond_loopback_warns_once(
    clickhouse_server: ClickHouseServer, clickhouse_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        async with running_service(clickhouse_server.dsn(clickhouse_database), HTTP_HOST="0.0.0.0"):
            pass
        async with running_service(clickhouse_server.dsn(clickhouse_database)):  # 127.0.0.1: no warning
            pass
    warnings = [record.getMessage() for record in caplog.records if "INGEST_KEYS_FILE" in record.getMessage()]
    assert len(warnings) == 1 and "anyone who can reach 0.0.0.0" in warnings[0]


async def test_an_existing_table_gains_the_source_key_column_on_18_16(
    clickhouse_server: ClickHouseServer, clickhouse_database: str
) -> None:
    clickhouse_server.query(f"CREATE DATABASE {clickhouse_database}")
    clickhouse_server.query(
        f"CREATE TABLE {clickhouse_database}.events (event_id UUID, event_type String, source String, "
        "user_id Nullable(String), value Nullable(Float64), created_at DateTime('UTC'), properties String) "
        "ENGINE = MergeTree PARTITION BY toYYYYMM(created_at) ORDER BY (event_type, created_at)"
    )
    clickhouse_server.query(
        f"INSERT INTO {clickhouse_database}.events (event_id, event_type, source, created_at, properties) "
        "VALUES ('0b9a4d5e-1f34-4c57-9f2a-3f0d5a1b2c3d', 'old', 'web', '2024-05-01 00:00:00', '{}')"
    )
    for _ in range(2):  # the second start finds the column there
        async with running_service(clickhouse_server.dsn(clickhouse_database), FLUSH_INTERVAL="100ms") as service:
            await eventually(lambda: asyncio.sleep(0, service.not_ready_reason() is None), timeout=20)
    # The columns added since take a /v1 message and an /events row.
    async with running_service(clickhouse_server.dsn(clickhouse_database), FLUSH_INTERVAL="100ms") as service:
        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{service.port}"
            async with http.post(base + "/v1/track", json={"event": "new", "anonymousId": "a"}) as response:
                assert response.status == 200
            async with http.post(base + "/events", json=make_event(0, event_type="plain")) as response:
                assert response.status == 202
        assert await wait_for_rows(clickhouse_server, clickhouse_database, 3) == 3
    columns = clickhouse_server.query(f"DESCRIBE TABLE {clickhouse_database}.events")
    assert "source_key\tLowCardinality(String)" in columns
    for column, column_type in added_columns(capabilities_for("18.16")):
        assert f"{column}\t{column_type}" in columns.replace("\\'", "'")  # 18.16 escapes the quotes
    assert clickhouse_server.query(
        f"SELECT event_type, source_key, anonymous_id, context != '', toYear(received_at) > 2000 "
        f"FROM {clickhouse_database}.events ORDER BY event_type"
    ).rstrip("\n").split("\n") == ["new\t\ta\t1\t1", "old\t\t\\N\t0\t0", "plain\t\t\\N\t1\t1"]


async def test_hang_ups_malformed_http_and_long_lines_are_counted_without_an_error_line(
    clickhouse_server: ClickHouseServer, clickhouse_database: str, start_service
) -> None:
    service = start_service(CLICKHOUSE_DSN=clickhouse_server.dsn(clickhouse_database), BODY_READ_TIMEOUT="1s")
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: service.is_ready(http), timeout=20)

        async def send(data: bytes, hang_up: bool) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
            writer.write(data)
            await writer.drain()
            answer = b""
            if not hang_up:
                answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            return answer

        head = b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n"
        for _ in range(3):
            await send(head + b'{"event_type":', hang_up=True)
        assert (await send(b"GARBAGE\r\n\r\n", hang_up=False))[9:12] == b"400"
        assert (await send(b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", hang_up=False))[9:12] in (b"400", b"414")
        assert (await send(b"GET / HTTP/1.1\r\nX-Long: " + b"b" * 20000 + b"\r\n\r\n", hang_up=False))[9:12] in (b"400", b"431")
        assert (await send(head + b'{"event_type":', hang_up=False)).startswith(b"HTTP/1.1 408")

        async def counted() -> bool:
            async with http.get(service.url + "/metrics") as response:
                text = await response.text()
            return ('requests_rejected_total{reason="client_disconnected"} 3' in text
                    and 'requests_rejected_total{reason="timeout"} 1' in text
                    and 'requests_rejected_total{reason="malformed"} 3' in text)

        await eventually(counted, timeout=10)
    service.process.send_signal(signal.SIGTERM)
    assert await service.wait_exit(30) == 0
    log = service.log
    assert "Traceback" not in log and " ERROR " not in log, log
    assert log.count("client faults") <= 2, log


async def test_gzip_bomb_is_413_against_the_running_service(
    clickhouse_server: ClickHouseServer, clickhouse_database: str
) -> None:
    bomb = gzip.compress(b"[" + b" " * (64 << 20) + b"]", 9)  # 64 MiB of spaces in ~64 KB
    async with running_service(clickhouse_server.dsn(clickhouse_database)) as service, aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{service.port}/events"
        async with http.post(url, data=bomb, headers={"Content-Encoding": "gzip",
                                                      "Content-Type": "application/json"}) as response:
            assert response.status == 413
            assert "once decoded" in (await response.json())["error"]
        async with http.post(url, data=gzip.compress(b'{"event_type":"z","source":"s","created_at":"2024-05-01T00:00:00Z"}'),
                             headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}) as response:
            assert response.status == 202
    assert await count_rows(clickhouse_server, clickhouse_database) == 1


def test_the_query_command_with_a_dsn_refuses_what_does_not_read(
    clickhouse_server: ClickHouseServer, clickhouse_database: str, python_env: dict[str, str]
) -> None:
    clickhouse_server.query(f"CREATE DATABASE {clickhouse_database}")

    def query(sql: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "clickpulse", "query", sql],
            env={**python_env, "CLICKHOUSE_DSN": clickhouse_server.dsn(clickhouse_database)},
            capture_output=True, text=True, timeout=60,
        )

    assert query("SELECT 40 + 2").stdout.strip().endswith("42 │") or "42" in query("SELECT 40 + 2").stdout
    for sql in (
        f"CREATE TABLE {clickhouse_database}.t (a UInt8) ENGINE = Memory",
        "SELECT 1; DROP DATABASE " + clickhouse_database,
        "SELECT * FROM file('/etc/passwd', 'TSV', 'a String')",
        "SELECT * FROM url('http://127.0.0.1:1/', 'TSV', 'a String')",
        "SELECT 1 INTO OUTFILE '/tmp/clickpulse-outfile'",
    ):
        result = query(sql)
        assert result.returncode == 1 and "query failed" in result.stderr, sql
    assert clickhouse_server.query(f"EXISTS TABLE {clickhouse_database}.t").strip() == "0"
    # And readonly is ClickHouse's own, past the statement check: a read-only SHOW still works.
    assert query("SHOW DATABASES").returncode == 0


def test_the_http_query_text_sends_readonly() -> None:
    import inspect

    from clickpulse.clickhouse import HttpClickHouse

    assert '"readonly": "1"' in inspect.getsource(HttpClickHouse.query_text)


OLD_TABLE_SCRIPT = """
import asyncio, sys
from pathlib import Path
from clickpulse.clickhouse import EmbeddedClickHouse

async def main():
    store = EmbeddedClickHouse(Path(sys.argv[1]))
    await store.execute(
        "CREATE TABLE default.events (event_id UUID, event_type LowCardinality(String), source LowCardinality(String), "
        "user_id Nullable(String), value Nullable(Float64), created_at DateTime64(3, 'UTC'), properties String) "
        "ENGINE = MergeTree PARTITION BY toYYYYMM(created_at) ORDER BY (event_type, created_at)", {})
    await store.close()

asyncio.run(main())
"""


async def test_embedded_store_gains_the_column_and_its_query_route_is_locked_down(
    start_service, python_env: dict[str, str], tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    subprocess.run([sys.executable, "-c", OLD_TABLE_SCRIPT, str(data_dir)], env=python_env, check=True, timeout=120)
    keys = write_keys(tmp_path / "keys.toml")
    service = start_service(DATA_DIR=str(data_dir), INGEST_KEYS_FILE=str(keys), FLUSH_INTERVAL="100ms")
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: service.is_ready(http), timeout=60)
        async with http.post(service.url + "/events", json=make_event(1), headers=bearer(SERVER_SECRET)) as response:
            assert response.status == 202

        async def query(sql: str, secret: str | None = SERVER_SECRET) -> tuple[int, str]:
            headers = bearer(secret) if secret else {}
            async with http.post(service.url + "/query", data=sql, headers=headers) as response:
                return response.status, await response.text()

        async def landed() -> bool:
            status, text = await query("SELECT source_key, count() FROM events GROUP BY source_key")
            return status == 200 and "backend" in text and "1" in text

        await eventually(landed, timeout=20)
        async with http.post(service.url + "/v1/track", json={"event": "sdk", "userId": "u", "timestamp":
                             "2024-05-01T12:00:00.250Z"}, headers=bearer(SERVER_SECRET)) as response:
            assert response.status == 200

        async def v1_landed() -> bool:
            status, text = await query(
                "SELECT anonymous_id IS NULL, JSONExtractString(context, 'ip'), toString(original_timestamp) "
                "FROM events WHERE event_type = 'sdk' FORMAT TSV"
            )
            return status == 200 and text.strip() == "1\t127.0.0.1\t2024-05-01 12:00:00.250"

        await eventually(v1_landed, timeout=20)
        assert (await query("SELECT 1", None))[0] == 401
        assert (await query("SELECT 1", BROWSER_SECRET))[0] == 401
        for sql in ("SELECT 1; DROP TABLE events", "SELECT * FROM file('/etc/passwd', 'LineAsString')",
                    "SELECT 1 INTO OUTFILE '/tmp/clickpulse-x'", "DROP TABLE events",
                    "SELECT 1 SETTINGS readonly = 0"):
            status, text = await query(sql)
            assert status == 400, (sql, text)
        status, text = await query("SELECT toString(getSetting('readonly')) AS mode")
        assert status == 200 and "│ 1    │" in text, text  # ClickHouse's own readonly, not just the check
    # The query command goes through the running service with the file's server key.
    result = subprocess.run(
        [sys.executable, "-m", "clickpulse", "query", "SELECT count() FROM events"],
        env={**python_env, "DATA_DIR": str(data_dir), "INGEST_KEYS_FILE": str(keys)},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    service.process.send_signal(signal.SIGTERM)
    assert await service.wait_exit(30) == 0
    for column in ("source_key", "anonymous_id", "received_at", "context", "original_timestamp"):
        assert f"added column {column}" in service.log
