"""`python -m clickpulse` as users run it: a real subprocess, real signals, real ClickHouse."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from urllib.parse import quote

import aiohttp
import msgspec
import pytest

from tests.integration.conftest import count_rows, eventually, make_event, metric_samples, wait_for_rows
from tests.servers import APP_PASSWORD, APP_USER, ClickHouseServer
from tests.support import free_port

pytestmark = pytest.mark.integration


async def test_sigterm_flushes_every_buffered_event_and_exits_zero(
    clickhouse_server: ClickHouseServer, clickhouse_database: str, start_service
) -> None:
    service = start_service(
        CLICKHOUSE_DSN=clickhouse_server.dsn(clickhouse_database), BATCH_SIZE="100000", FLUSH_INTERVAL="1h",
    )
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: service.is_ready(http), timeout=20)
        for start in range(0, 300, 100):
            async with http.post(service.url + "/events", json=[make_event(i) for i in range(start, start + 100)]) as response:
                assert response.status == 202
        async with http.get(service.url + "/metrics") as response:
            assert metric_samples(await response.text())["buffer_events"] == 300
    assert await count_rows(clickhouse_server, clickhouse_database) == 0
    service.process.send_signal(signal.SIGTERM)
    assert await service.wait_exit(30) == 0, service.log
    assert await count_rows(clickhouse_server, clickhouse_database) == 300
    assert "every acknowledged event was written" in service.log


async def test_sigterm_while_clickhouse_is_gone_reports_the_unwritten_events(
    clickhouse_server: ClickHouseServer, clickhouse_database: str, start_service
) -> None:
    dead_port = free_port()
    service = start_service(
        CLICKHOUSE_DSN=f"http://127.0.0.1:{dead_port}/{clickhouse_database}", FLUSH_INTERVAL="1h", SHUTDOWN_TIMEOUT="2s",
    )
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: service.status(http, "/healthz"), timeout=20)
        assert await service.status(http, "/readyz") == 503
        async with http.post(service.url + "/events", json=[make_event(i) for i in range(7)]) as response:
            assert response.status == 202
    service.process.send_signal(signal.SIGTERM)
    assert await service.wait_exit(15) == 1
    assert "7 acknowledged events were NOT written" in service.log


@pytest.mark.parametrize("form", ["userinfo", "query"])
async def test_both_dsn_forms_authenticate_and_never_log_the_password(
    clickhouse_server: ClickHouseServer, clickhouse_database: str, start_service, form: str
) -> None:
    port = clickhouse_server.http_port
    if form == "userinfo":
        dsn = f"http://{APP_USER}:{quote(APP_PASSWORD, safe='')}@127.0.0.1:{port}/{clickhouse_database}"
    else:
        dsn = f"http://127.0.0.1:{port}?user={APP_USER}&password={quote(APP_PASSWORD, safe='')}&database={clickhouse_database}"
    service = start_service(CLICKHOUSE_DSN=dsn, FLUSH_INTERVAL="100ms", LOG_LEVEL="DEBUG")
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: service.is_ready(http), timeout=20)
        async with http.post(service.url + "/events", json=make_event(1)) as response:
            assert response.status == 202
        assert await wait_for_rows(clickhouse_server, clickhouse_database, 1) == 1
    service.process.send_signal(signal.SIGTERM)
    assert await service.wait_exit(30) == 0
    assert APP_PASSWORD not in service.log
    assert quote(APP_PASSWORD, safe="") not in service.log
    assert f"ClickHouse at http://127.0.0.1:{port}/{clickhouse_database}" in service.log  # where, not who


async def test_a_wrong_password_keeps_the_service_unready_and_out_of_the_logs(
    clickhouse_server: ClickHouseServer, clickhouse_database: str, start_service
) -> None:
    wrong = "not-the-password-4711"
    service = start_service(
        CLICKHOUSE_DSN=f"http://{APP_USER}:{wrong}@127.0.0.1:{clickhouse_server.http_port}/{clickhouse_database}",
        LOG_FORMAT="json",
    )
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: service.status(http, "/healthz"), timeout=20)
        await asyncio.sleep(0.5)
        async with http.get(service.url + "/readyz") as response:
            assert response.status == 503
            reason = (await response.json())["reason"]
    assert "clickhouse" in reason
    service.process.send_signal(signal.SIGTERM)
    assert await service.wait_exit(30) == 0
    assert wrong not in service.log and wrong not in reason
    lines = [line for line in service.log.splitlines() if line.strip()]
    records = [msgspec.json.decode(line) for line in lines]  # LOG_FORMAT=json: every line is JSON
    # Refused credentials are a configuration error: loud, naming the variable to fix.
    assert any(record["level"] == "error" and "CLICKHOUSE_DSN" in record["message"] for record in records)


@pytest.mark.parametrize(
    ("variable", "value"),
    [("HTTP_PORT", "eighty"), ("FLUSH_INTERVAL", "soon"), ("BATCH_SIZE", "-1"), ("CLICKHOUSE_DSN", "ftp://u:hunter2@h/db"),
     ("LOG_FORMAT", "xml"), ("MAX_BODY_BYTES", "1e3")],
)
def test_a_bad_setting_exits_2_with_one_line_naming_it(python_env: dict[str, str], variable: str, value: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "clickpulse"], env={**python_env, variable: value},
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0]
    assert "Traceback" not in result.stderr
    assert "hunter2" not in result.stderr
