"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import ClickHouseServer, find_clickhouse_server, start_clickhouse
from tests.support import clean_environment

# .ci/run sets this: there a missing server is a failure, not a skip.
REQUIRE_SERVERS = os.environ.get("CLICKPULSE_REQUIRE_SERVERS") == "1"


def skip_or_fail(reason: str) -> None:
    if REQUIRE_SERVERS:
        pytest.fail(f"{reason} (CLICKPULSE_REQUIRE_SERVERS=1)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def clickhouse_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClickHouseServer]:
    command = find_clickhouse_server()
    if command is None:
        skip_or_fail("no clickhouse-server binary (apt-get install clickhouse-server, or set CLICKHOUSE_SERVER_BIN)")
    server = start_clickhouse(tmp_path_factory.mktemp("clickhouse"), command)
    yield server
    server.stop()


@pytest.fixture
def clickhouse_database(clickhouse_server: ClickHouseServer) -> Iterator[str]:
    """A database of this test's own; dropped afterwards."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    yield name
    clickhouse_server.query(f"DROP DATABASE IF EXISTS {name}")


@pytest.fixture
def python_env(tmp_path: Path) -> dict[str, str]:
    """Environment for `python -m clickpulse` subprocesses: this checkout importable, no stray config."""
    env = clean_environment(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


PYTHON = sys.executable
