"""The embedded store (CLICKHOUSE_DSN unset): real `python -m clickpulse` processes writing to chDB
in a temp DATA_DIR, read back with `python -m clickpulse query` while running and after a stop."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import skip_or_fail
from tests.integration.conftest import ServiceProcess, eventually, make_event, metric_samples

pytestmark = pytest.mark.integration

AWKWARD = ['quote " and \\ backslash', "new\nline\ttab", "emoji 😀 中文", "nul\x00byte"]


@pytest.fixture(autouse=True)
def needs_chdb() -> None:
    try:
        import chdb  # noqa: F401
    except ImportError:
        skip_or_fail("chdb is not installed (pip install -e '.[test]')")


def query(env: dict[str, str], data_dir: Path, sql: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clickpulse", "query", sql], env={**env, "DATA_DIR": str(data_dir)},
        capture_output=True, text=True, timeout=60,
    )


def json_rows(result: subprocess.CompletedProcess[str]) -> list[dict]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


async def post(http: aiohttp.ClientSession, service: ServiceProcess, events: object, query_string: str = "") -> int:
    async with http.post(service.url + "/events" + query_string, json=events) as response:
        return response.status


async def test_events_land_in_chdb_and_the_query_command_reads_them_running_and_stopped(
    start_service, python_env: dict[str, str], tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    service = start_service(DATA_DIR=str(data_dir), FLUSH_INTERVAL="100ms")
    events = [make_event(i, event_type=text, source=text, properties={"text": text}) for i, text in enumerate(AWKWARD)]
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: service.is_ready(http), timeout=60)
        assert await post(http, service, make_event(100, event_type="single")) == 202
        assert await post(http, service, events) == 202
        assert await post(http, service, [make_event(200 + i, event_type="batch") for i in range(50)], "?wait=true") == 200
        async with http.get(service.url + "/metrics") as response:
            samples = metric_samples(await response.text())

        def running_count() -> int:
            result = query(python_env, data_dir, "SELECT count() FROM events FORMAT JSONEachRow")
            return json_rows(result)[0]["count()"] if result.returncode == 0 else 0

        # While the service holds DATA_DIR, `query` goes through it.
        await eventually(lambda: int(running_count()) == 55 or None, timeout=30, interval=0.5)
        refused = query(python_env, data_dir, "DROP TABLE events")
    assert samples['clickhouse_backend_info{backend="embedded"}'] == 1
    assert refused.returncode == 1 and "only statements that read" in refused.stderr
    service.process.send_signal(signal.SIGTERM)
    assert await service.wait_exit(60) == 0
    assert "embedded ClickHouse (chDB)" in service.log and str(data_dir.resolve()) in service.log

    # Stopped: `query` opens the directory itself; everything is still there.
    counts = json_rows(query(python_env, data_dir, "SELECT event_type, count() AS n FROM events GROUP BY event_type FORMAT JSONEachRow"))
    by_type = {row["event_type"]: int(row["n"]) for row in counts}
    assert by_type["single"] == 1 and by_type["batch"] == 50
    stored = json_rows(query(python_env, data_dir, "SELECT source, properties FROM events WHERE value < 10 ORDER BY value FORMAT JSONEachRow"))
    assert [row["source"] for row in stored] == AWKWARD
    assert [json.loads(row["properties"])["text"] for row in stored] == AWKWARD
    ddl = json_rows(query(python_env, data_dir, "SHOW CREATE TABLE events FORMAT JSONEachRow"))[0]["statement"]
    assert "DateTime64(3, 'UTC')" in ddl and "LowCardinality(String)" in ddl
    assert "non_replicated_deduplication_window" in ddl
    table = query(python_env, data_dir, "-- one type\nSELECT event_type FROM events WHERE event_type = 'single'")
    assert table.returncode == 0, table.stderr
    assert table.stdout == "┌─event_type─┐\n│ single     │\n└────────────┘\n1 row\n"  # the same table as with a server
    empty = query(python_env, data_dir, "SELECT event_type, count() FROM events WHERE event_type = 'none' GROUP BY event_type")
    assert empty.stdout == "┌─event_type─┬─count()─┐\n└────────────┴─────────┘\n0 rows\n"


def test_query_in_a_directory_without_data_dir_exits_2_naming_it_and_creates_nothing(
    python_env: dict[str, str], tmp_path: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "clickpulse", "query", "SELECT count() FROM events"], env=python_env, cwd=tmp_path,
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("clickpulse: query failed: DATA_DIR='clickpulse-data' holds no embedded store")
    assert list(tmp_path.iterdir()) == []


async def test_spooled_disk_acks_survive_sigkill_on_the_embedded_store(
    start_service, python_env: dict[str, str], tmp_path: Path
) -> None:
    settings = dict(DATA_DIR=str(tmp_path / "data"), SPOOL_DIR=str(tmp_path / "spool"), FLUSH_INTERVAL="1h")
    first = start_service(**settings)
    acknowledged = []
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: first.is_ready(http), timeout=60)
        for index in range(5):
            events = [make_event(index, event_id=str(uuid.uuid4())) for _ in range(10)]
            assert await post(http, first, events, "?ack=disk") == 202
            acknowledged += [event["event_id"] for event in events]
        first.process.send_signal(signal.SIGKILL)
        await first.wait_exit(10)
        second = start_service(**{**settings, "FLUSH_INTERVAL": "100ms"})
        await eventually(lambda: second.is_ready(http), timeout=60)
        async with http.get(second.url + "/metrics") as response:
            assert metric_samples(await response.text())["spool_replayed_events_total"] == 50
    second.process.send_signal(signal.SIGTERM)
    assert await second.wait_exit(60) == 0
    stored = json_rows(query(python_env, tmp_path / "data", "SELECT toString(event_id) AS id FROM events FORMAT JSONEachRow"))
    assert sorted(row["id"] for row in stored) == sorted(acknowledged)


async def test_a_second_service_on_the_same_data_dir_exits_2_naming_the_first(
    start_service, python_env: dict[str, str], tmp_path: Path
) -> None:
    first = start_service(DATA_DIR=str(tmp_path / "data"))
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: first.is_ready(http), timeout=60)
    second = subprocess.run(
        [sys.executable, "-m", "clickpulse"], env={**python_env, "DATA_DIR": str(tmp_path / "data"), "HTTP_PORT": "0"},
        capture_output=True, text=True, timeout=60,
    )
    assert second.returncode == 2
    [line] = [line for line in second.stderr.splitlines() if line.startswith("clickpulse:")]
    assert "in use by another clickpulse" in line and str(first.process.pid) in line
    assert "Traceback" not in second.stderr
    first.process.send_signal(signal.SIGTERM)
    assert await first.wait_exit(60) == 0


def test_without_a_dsn_and_without_chdb_it_exits_2_with_one_line(python_env: dict[str, str], tmp_path: Path) -> None:
    blocker = tmp_path / "site" / "chdb"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('chdb is not installed here')\n")
    env = {**python_env, "PYTHONPATH": f"{tmp_path / 'site'}:{python_env['PYTHONPATH']}", "DATA_DIR": str(tmp_path / "data")}
    result = subprocess.run([sys.executable, "-m", "clickpulse"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "clickpulse: CLICKHOUSE_DSN is unset and the embedded store needs chdb: pip install -e '.[embedded]' "
        "in the clickpulse checkout, or set CLICKHOUSE_DSN to a ClickHouse server"
    ]


async def test_events_spread_over_many_months_land_instead_of_stalling_the_pipeline(
    start_service, python_env: dict[str, str], tmp_path: Path
) -> None:
    # One partition per month: 150 months in one request exceed chDB's (and modern ClickHouse's)
    # max_partitions_per_insert_block of 100. Devices with bad clocks send such requests.
    data_dir = tmp_path / "data"
    service = start_service(DATA_DIR=str(data_dir), FLUSH_INTERVAL="100ms")
    months = [f"{2000 + index // 12}-{index % 12 + 1:02d}-15T12:00:00Z" for index in range(150)]
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: service.is_ready(http), timeout=60)
        events = [make_event(index, created_at=month, event_type="old_clock") for index, month in enumerate(months)]
        async with http.post(service.url + "/events?wait=true", json=events) as response:
            assert (response.status, await response.json()) == (200, {"status": "written", "written": 150})
        # And what comes after is not stuck behind it.
        assert await post(http, service, [make_event(1, event_type="after")], "?wait=true") == 200
        async with http.get(service.url + "/metrics") as response:
            samples = metric_samples(await response.text())
    assert samples['clickhouse_insert_errors_total{kind="limit"}'] >= 1
    assert samples["clickhouse_insert_retries_total"] == 0
    assert samples['events_quarantined_total{destination="table"}'] == 0
    service.process.send_signal(signal.SIGTERM)
    assert await service.wait_exit(60) == 0
    counts = json_rows(query(python_env, data_dir, "SELECT count() AS n, uniqExact(toYYYYMM(created_at)) AS months FROM events WHERE event_type = 'old_clock' FORMAT JSONEachRow"))
    assert (int(counts[0]["n"]), int(counts[0]["months"])) == (150, 150)


async def test_a_slow_query_neither_starves_inserts_nor_runs_past_query_timeout(
    start_service, python_env: dict[str, str], tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    service = start_service(DATA_DIR=str(data_dir), FLUSH_INTERVAL="50ms", QUERY_TIMEOUT="2s", ACK_TIMEOUT="5s")
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: service.is_ready(http), timeout=60)
        slow = asyncio.create_task(asyncio.to_thread(
            query, python_env, data_dir, "SELECT count() FROM numbers(100000000000) WHERE sipHash64(number) = 0"
        ))
        await asyncio.sleep(0.5)  # the query is running on chDB's one thread
        started = asyncio.get_running_loop().time()
        assert await post(http, service, [make_event(1)], "?wait=true") == 200
        waited = asyncio.get_running_loop().time() - started
        result = await slow
    assert waited < 4.5, f"the insert waited {waited:.1f}s behind a query limited to 2 s"
    assert result.returncode == 1 and ("TIMEOUT_EXCEEDED" in result.stderr or "Timeout exceeded" in result.stderr), result.stderr
    service.process.send_signal(signal.SIGTERM)
    assert await service.wait_exit(60) == 0


async def test_a_query_body_that_is_not_text_is_400_not_500(start_service, tmp_path: Path) -> None:
    service = start_service(DATA_DIR=str(tmp_path / "data"))
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: service.is_ready(http), timeout=60)
        async with http.post(service.url + "/query", data=b"SELECT '\xff\xfe'") as response:
            assert response.status == 400
            assert "utf-8" in (await response.json())["error"]
        headers = {"Content-Type": "text/plain; charset=no-such-charset"}
        async with http.post(service.url + "/query", data=b"SELECT 1", headers=headers) as response:
            assert response.status == 400
    service.process.send_signal(signal.SIGTERM)
    assert await service.wait_exit(60) == 0
    assert "Traceback" not in service.log


@pytest.mark.parametrize("http_host", ["::", "::1"])
async def test_the_query_command_reaches_a_service_listening_on_ipv6(
    python_env: dict[str, str], tmp_path: Path, http_host: str
) -> None:
    data_dir = tmp_path / "data"
    service = ServiceProcess({**python_env, "DATA_DIR": str(data_dir)}, tmp_path / "ipv6.log", http_host=http_host)
    try:
        async with aiohttp.ClientSession() as http:
            url = f"http://[::1]:{service.port}"
            await eventually(lambda: service.status(http, "/readyz", base=url), timeout=60)
            async with http.post(url + "/events?wait=true", json=[make_event(1)]) as response:
                assert response.status == 200
        result = query(python_env, data_dir, "SELECT count() AS n FROM events FORMAT JSONEachRow")
        assert int(json_rows(result)[0]["n"]) == 1
        assert f"[::1]:{service.port}" in (data_dir / "clickpulse.lock").read_text()
    finally:
        service.process.send_signal(signal.SIGTERM)
        assert await service.wait_exit(60) == 0
        service.kill()
