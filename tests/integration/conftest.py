"""Helpers for tests that run the whole service against the real ClickHouse server."""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from clickpulse.config import load_config
from clickpulse.service import Service
from tests.servers import ClickHouseServer
from tests.support import eventually, free_port

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def running_service(dsn: str, **settings: str) -> AsyncIterator[Service]:
    """A Service in this event loop on a free port; stopped (drained) on exit."""
    environ = {"CLICKHOUSE_DSN": dsn, "HTTP_HOST": "127.0.0.1", "HTTP_PORT": "0", **settings}
    service = Service(load_config([], environ))
    await service.start()
    try:
        yield service
    finally:
        if not service.stopping:  # a test may have stopped it already
            await service.stop()




async def count_rows(server: ClickHouseServer, database: str, table: str = "events", where: str = "") -> int:
    try:
        text = await server.aquery(f"SELECT count() FROM {database}.{table} {where}")
    except RuntimeError as error:
        if "doesn't exist" in str(error):
            return 0
        raise
    return int(text.strip())


async def wait_for_rows(server: ClickHouseServer, database: str, expected: int, timeout: float = 10.0) -> int:
    """Waits until at least `expected` rows are in ClickHouse (or the time is up); returns the count."""
    counted = 0

    async def enough() -> bool:
        nonlocal counted
        counted = await count_rows(server, database)
        return counted >= expected

    with contextlib.suppress(AssertionError):
        await eventually(enough, timeout=timeout)
    return counted


def metric_samples(text: str) -> dict[str, float]:
    """Parses Prometheus text format into {'name{label="v",...}': value} with labels sorted."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\d+)?', line)
        assert match, f"unparsable metrics line {line!r}"
        name, labels, value = match.groups()
        pairs = sorted(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', labels or ""))
        key = name + ("{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "}" if pairs else "")
        samples[key] = float(value)
    return samples


async def scrape(session: aiohttp.ClientSession, base_url: str) -> dict[str, float]:
    async with session.get(base_url + "/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return metric_samples(await response.text())


def make_event(index: int = 0, **overrides: Any) -> dict[str, Any]:
    event = {
        "event_type": "page_view",
        "source": "web",
        "user_id": f"user-{index}",
        "value": float(index),
        "created_at": "2024-05-01T12:00:00Z",
    }
    event.update(overrides)
    return event


class ServiceProcess:
    def __init__(self, env: dict[str, str], log_path: Path, http_host: str = "127.0.0.1") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "clickpulse"],
            env={**env, "HTTP_HOST": http_host, "HTTP_PORT": str(self.port)},
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )

    @property
    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    async def status(self, http: aiohttp.ClientSession, path: str, base: str | None = None) -> int | None:
        try:
            async with http.get((base or self.url) + path) as response:
                return response.status
        except aiohttp.ClientConnectionError:
            return None

    async def is_ready(self, http: aiohttp.ClientSession) -> bool:
        return await self.status(http, "/readyz") == 200

    async def wait_exit(self, timeout: float) -> int:
        return await asyncio.to_thread(self.process.wait, timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()


@pytest.fixture
def start_service(python_env: dict[str, str], tmp_path: Path):
    started: list[ServiceProcess] = []

    def start(**settings: str) -> ServiceProcess:
        service = ServiceProcess({**python_env, **settings}, tmp_path / f"clickpulse-{len(started)}.log")
        started.append(service)
        return service

    yield start
    for service in started:
        service.kill()
