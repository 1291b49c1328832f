"""The scale-out switch on a real ClickHouse server: CLICKHOUSE_TABLE naming a Distributed table,
and CLICKHOUSE_CREATE_TABLE=false leaving the schema to its owner. The cluster DDL shipped in
ops/clickhouse/cluster-events.sql is parsed by ClickHouse 26.x (chdb).

A replicated cluster needs Keeper, which is not here: the Distributed table in these tests spreads
over a one-shard cluster of this very server, with a plain MergeTree table under it. What clickpulse
does (insert into the table CLICKHOUSE_TABLE names) is the same either way.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from clickpulse.schema import (
    capabilities_for,
    cluster_script,
    database_ddl,
    distributed_table_ddl,
    quote_string,
    table_ddl,
)
from tests.conftest import skip_or_fail
from tests.integration.conftest import count_rows, eventually, make_event, running_service
from tests.servers import ClickHouseServer

pytestmark = pytest.mark.integration

CLUSTER = "clickpulse_test_cluster"
LOCAL_TABLE = "events_local"
DISTRIBUTED_TABLE = "events_distributed"
SHIPPED_CLUSTER_SCRIPT = Path(__file__).resolve().parents[2] / "ops" / "clickhouse" / "cluster-events.sql"


@pytest.fixture(scope="module")
def one_shard_cluster(clickhouse_server: ClickHouseServer) -> Iterator[str]:
    """Declares a cluster whose one shard is this server; ClickHouse reloads config.d by itself."""
    tcp_port = re.search(r"<tcp_port>(\d+)</tcp_port>", (clickhouse_server.directory / "config.xml").read_text()).group(1)
    config_d = clickhouse_server.directory / "config.d"
    config_d.mkdir(exist_ok=True)
    cluster_file = config_d / "clickpulse-test-cluster.xml"
    cluster_file.write_text(
        f"""<?xml version="1.0"?>
<yandex><remote_servers><{CLUSTER}><shard><internal_replication>true</internal_replication>
<replica><host>127.0.0.1</host><port>{tcp_port}</port></replica>
</shard></{CLUSTER}></remote_servers></yandex>
"""
    )
    deadline = time.monotonic() + 30
    while clickhouse_server.query(f"SELECT count() FROM system.clusters WHERE cluster = '{CLUSTER}'").strip() != "1":
        assert time.monotonic() < deadline, "ClickHouse did not load the test cluster from config.d"
        time.sleep(0.2)
    yield CLUSTER
    cluster_file.unlink()


def create_settings(server: ClickHouseServer) -> dict[str, str]:
    capabilities = capabilities_for(server.query("SELECT version()"))
    return {name: str(value) for name, value in capabilities.create_settings.items()}


def create_local_and_distributed_tables(server: ClickHouseServer, database: str, cluster: str) -> None:
    capabilities = capabilities_for(server.query("SELECT version()"))
    settings = create_settings(server)
    server.query(database_ddl(database))
    server.query(table_ddl(database, LOCAL_TABLE, capabilities), **settings)
    server.query(
        distributed_table_ddl(database, DISTRIBUTED_TABLE, local_table=LOCAL_TABLE, cluster=cluster, on_cluster=False),
        **settings,
    )


def engine_of(server: ClickHouseServer, database: str, table: str) -> str:
    return server.query(
        f"SELECT engine FROM system.tables WHERE database = {quote_string(database)} AND name = {quote_string(table)}"
    ).strip()


async def has_rows(server: ClickHouseServer, database: str, table: str, expected: int) -> bool:
    return await count_rows(server, database, table) == expected


async def post_events(port: int | None, count: int) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{port}/events", json=[make_event(i) for i in range(count)]) as response:
            assert response.status == 202, await response.text()


@pytest.mark.parametrize("create_table", ["true", "false"])
async def test_events_reach_the_shards_through_the_distributed_table_clickhouse_table_names(
    clickhouse_server: ClickHouseServer, clickhouse_database: str, one_shard_cluster: str, create_table: str
) -> None:
    create_local_and_distributed_tables(clickhouse_server, clickhouse_database, one_shard_cluster)
    dsn = clickhouse_server.dsn(clickhouse_database)

    async with running_service(
        dsn, CLICKHOUSE_TABLE=DISTRIBUTED_TABLE, CLICKHOUSE_CREATE_TABLE=create_table, FLUSH_INTERVAL="100ms"
    ) as service:
        await eventually(lambda: service.not_ready_reason() is None, timeout=20)
        await post_events(service.port, 25)
        await eventually(lambda: has_rows(clickhouse_server, clickhouse_database, LOCAL_TABLE, 25), timeout=20)

    # With CLICKHOUSE_CREATE_TABLE=true the Writer ran CREATE TABLE IF NOT EXISTS on the name:
    # a no-op, the table is still the Distributed one.
    assert engine_of(clickhouse_server, clickhouse_database, DISTRIBUTED_TABLE) == "Distributed"
    assert engine_of(clickhouse_server, clickhouse_database, LOCAL_TABLE) == "MergeTree"


async def test_without_create_table_the_service_waits_for_the_table_and_creates_nothing(
    clickhouse_server: ClickHouseServer, clickhouse_database: str
) -> None:
    dsn = clickhouse_server.dsn(clickhouse_database)

    async with running_service(dsn, CLICKHOUSE_CREATE_TABLE="false", FLUSH_INTERVAL="100ms") as service:
        await eventually(lambda: "does not exist" in (service.not_ready_reason() or ""))
        reason = service.not_ready_reason() or ""
        assert f"{clickhouse_database}.events" in reason and "CLICKHOUSE_CREATE_TABLE=false" in reason
        databases = clickhouse_server.query("SELECT name FROM system.databases").split()
        assert clickhouse_database not in databases, "CLICKHOUSE_CREATE_TABLE=false must not create the database"

        # The table's owner creates it; the Writer's retries find it without a restart.
        capabilities = capabilities_for(clickhouse_server.query("SELECT version()"))
        clickhouse_server.query(database_ddl(clickhouse_database))
        clickhouse_server.query(table_ddl(clickhouse_database, "events", capabilities), **create_settings(clickhouse_server))
        await eventually(lambda: service.not_ready_reason() is None, timeout=20)
        await post_events(service.port, 3)
        await eventually(lambda: has_rows(clickhouse_server, clickhouse_database, "events", 3), timeout=20)


def test_the_shipped_cluster_ddl_parses_on_modern_clickhouse(tmp_path: Path) -> None:
    try:
        from chdb import session
    except ImportError:
        skip_or_fail("chdb is not installed (pip install -e '.[test]')")
    text = SHIPPED_CLUSTER_SCRIPT.read_text()
    statements = [
        statement.strip()
        for statement in "\n".join(line for line in text.splitlines() if not line.startswith("--")).split(";")
        if statement.strip()
    ]
    assert len(statements) == 3
    database = re.search(r"CREATE DATABASE IF NOT EXISTS `(\w+)`", text).group(1)
    cluster = re.search(r"ON CLUSTER `(\w+)`", text).group(1)
    assert text == cluster_script(database, cluster, local_table=LOCAL_TABLE, distributed_table=DISTRIBUTED_TABLE)

    chdb = session.Session(str(tmp_path / "chdb"))
    try:
        for statement in statements:
            # EXPLAIN AST parses with the server's own parser and fails on a syntax error; the
            # statements cannot run here (no Keeper, no cluster), only be proven well-formed.
            # (EXPLAIN AST, not formatQuery: the lite build of the engine has no formatQuery.)
            tree = str(chdb.query(f"EXPLAIN AST {statement}", "TSVRaw")).strip()
            assert tree.startswith("CreateQuery"), tree
    finally:
        chdb.cleanup() if hasattr(chdb, "cleanup") else chdb.close()
