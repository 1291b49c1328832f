"""Helpers shared by the tests and the benchmark: stopping processes, free ports, a clock a test
moves by hand, a recorder standing in for the Batcher's mailbox, polling until a condition
holds, and the environment a `python -m clickpulse` child process gets."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from clickpulse.config import SETTINGS
from clickpulse.messages import Batch, Delivery

if TYPE_CHECKING:  # bench/run.py imports this module without pytest
    import pytest

SETTING_VARIABLES = frozenset(setting.variable for setting in SETTINGS)
"""Every environment variable clickpulse reads."""

# ClickHouse's own programs read CLICKHOUSE_* variables too (CLICKHOUSE_USER, CLICKHOUSE_PASSWORD,
# CLICKHOUSE_CONFIG, ...); none of them is any business of a clickpulse child.
CLICKHOUSE_PREFIX = "CLICKHOUSE_"
# Except where the test suite finds its servers' binaries (tests/servers.py), so that a child
# that starts servers itself finds the same ones.
KEPT_VARIABLES = frozenset({"CLICKHOUSE_SERVER_BIN"})


def clean_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` without anything that would configure clickpulse: every variable in
    clickpulse.config.SETTINGS and every other CLICKHOUSE_* variable but those in KEPT_VARIABLES."""
    return {
        key: value
        for key, value in environ.items()
        if key in KEPT_VARIABLES or (key not in SETTING_VARIABLES and not key.startswith(CLICKHOUSE_PREFIX))
    }


def stop_process(process: subprocess.Popen[Any], timeout: float = 20.0) -> int:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds; the exit status."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class ManualClock:
    """A clock that moves only when the test says so.

    It has the functions of the `time` module that clickpulse reads the time with, so it can
    stand in for that module in one module under test: `clock.install(monkeypatch,
    clickpulse.events)`. Any other `time.` function that module calls then fails loudly. Calling
    the clock returns the current time, for code that takes a clock callable."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._ns = round(start * 1_000_000_000)  # whole nanoseconds, so advancing is exact

    def __call__(self) -> float:
        return self.time()

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go backwards")
        self._ns += round(seconds * 1_000_000_000)

    def time(self) -> float:
        return self._ns / 1_000_000_000

    def time_ns(self) -> int:
        return self._ns

    monotonic = time
    monotonic_ns = time_ns
    perf_counter = time
    perf_counter_ns = time_ns

    def install(self, monkeypatch: pytest.MonkeyPatch, module: object) -> None:
        """Replaces `module.time` (the `time` module as that module imported it) for this test."""
        monkeypatch.setattr(module, "time", self)


@dataclass
class MailboxRecorder:
    """Stands in for Batcher.put: records what the intake hands on, in order. A whole Batch (the
    spool's batch in flight at a crash) is kept in `batches` and its deliveries in `deliveries`.
    `on_delivery`, when set, runs on every delivery: a test's stand-in for the Writer's answer."""

    deliveries: list[Delivery] = field(default_factory=list)
    batches: list[Batch] = field(default_factory=list)
    on_delivery: Callable[[Delivery], None] | None = None
    arrival: asyncio.Event = field(default_factory=asyncio.Event)

    def __call__(self, message: Delivery | Batch) -> None:
        if isinstance(message, Batch):
            self.batches.append(message)
        for delivery in message.deliveries if isinstance(message, Batch) else [message]:
            self.deliveries.append(delivery)
            self.arrival.set()
            if self.on_delivery is not None:
                self.on_delivery(delivery)

    put = __call__

    async def wait_for(self, count: int, timeout: float = 1.0) -> list[Delivery]:
        async with asyncio.timeout(timeout):
            while len(self.deliveries) < count:
                self.arrival.clear()
                await self.arrival.wait()
        return self.deliveries

    @property
    def payloads(self) -> list[bytes]:
        return [delivery.rows for delivery in self.deliveries]


async def eventually(check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Polls an async or sync check until it returns a truthy value; fails with its last value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    while loop.time() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s; last value {last!r}")
