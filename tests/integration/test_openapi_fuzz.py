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
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.integration.conftest import ServiceProcess, eventually, metric_samples
from tests.servers import ClickHouseServer
from tests.support import clean_environment

pytestmark = pytest.mark.integration

EXAMPLES_PER_OPERATION = 250  # POST /events gets them (the GETs have no parameters): some 10-20 s
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


def test_every_answer_matches_the_document_and_none_is_a_server_error(running_service: ServiceProcess) -> None:
    # schemathesis's own strategies driven by Hypothesis directly, one operation after another
    # (its pytest plugin follows pytest's internals, which change between pytest releases).
    schema = schemathesis.openapi.from_url(running_service.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    # schemathesis leaves out the document's own URL, GET /openapi.json (tests/http/test_openapi.py
    # checks that route).
    labels = {operation.label for operation in operations}
    assert {"POST /events", "OPTIONS /events", "GET /healthz", "GET /readyz", "GET /metrics",
            "POST /v1/track", "POST /v1/batch", "GET /v1/projects/{write_key}/settings"} <= labels
    # The Segment routes share two handlers (one message, a batch): fuzz one of each, and leave
    # the aliases (/v1/t, /v1/import...) and their preflights to the unit tests.
    fuzzed = {"POST /events", "OPTIONS /events", "GET /healthz", "GET /readyz", "GET /metrics",
              "POST /v1/track", "POST /v1/page", "POST /v1/batch", "GET /v1/projects/{write_key}/settings"}
    for operation in [operation for operation in operations if operation.label in fuzzed]:

        @settings(
            max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def answers_as_documented(case: schemathesis.Case) -> None:
            case.call_and_validate(base_url=running_service.url, checks=CHECKS)

        answers_as_documented()

    async def posted() -> float:
        async with aiohttp.ClientSession() as http, http.get(running_service.url + "/metrics") as response:
            samples = metric_samples(await response.text())
        return sum(value for name, value in samples.items() if name.startswith("http_requests_total{") and 'path="/events"' in name)

    count = asyncio.run(posted())
    assert count >= 100  # the fuzzing really ran: a few hundred requests
