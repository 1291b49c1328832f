"""schemathesis against a running `python -m clickpulse` (real ClickHouse behind it), with the
document the service itself serves at /openapi.json: every generated request (a few hundred in
all, bounded in time) gets no 5xx, and every answer has a documented status, content type,
headers and body schema."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.integration.conftest import ServiceProcess, eventually
from tests.servers import ClickHouseServer
from tests.support import clean_environment

pytestmark = pytest.mark.integration

EXAMPLES_PER_OPERATION = 60  # x 5 operations: 300 requests, well under a minute
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def running_service(clickhouse_server: ClickHouseServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    env = clean_environment(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2]) + os.pathsep + env.get("PYTHONPATH", "")
    database = f"fuzz_{uuid.uuid4().hex[:12]}"
    service = ServiceProcess(
        {**env, "CLICKHOUSE_DSN": clickhouse_server.dsn(database), "FLUSH_INTERVAL": "50ms", "ACK_TIMEOUT": "10s"},
        tmp_path_factory.mktemp("fuzz") / "clickpulse.log",
    )

    async def ready() -> None:
        async with aiohttp.ClientSession() as http:
            await eventually(lambda: service.is_ready(http), timeout=30)

    asyncio.run(ready())
    yield service
    service.kill()
    clickhouse_server.query(f"DROP DATABASE IF EXISTS {database}")


@pytest.fixture(scope="module")
def served_schema(running_service: ServiceProcess) -> schemathesis.BaseSchema:
    schema = schemathesis.openapi.from_url(running_service.url + "/openapi.json")
    schema.config.update(base_url=running_service.url)  # type: ignore[attr-defined]
    return schema


schema = schemathesis.pytest.from_fixture("served_schema")


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_answer_matches_the_document_and_none_is_a_server_error(case: schemathesis.Case, running_service: ServiceProcess) -> None:
    case.call_and_validate(base_url=running_service.url, checks=CHECKS)
