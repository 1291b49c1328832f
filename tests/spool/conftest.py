"""The `open_spool` fixture: a Spool over real files in tmp_path, opened (and run) as the
service does, and shut down after the test."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aioprometheus import Registry

from clickpulse.memory_limit import MemoryLimit
from clickpulse.metrics import SpoolMetrics
from clickpulse.spool import Spool
from tests.spool.helpers import Harness
from tests.support import MailboxRecorder

OpenSpool = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def open_spool(tmp_path: Path) -> AsyncIterator[OpenSpool]:
    harnesses: list[Harness] = []

    async def open_(
        directory: Path | None = None,
        *,
        capacity_events: int = 1000,
        max_bytes: int = 1 << 20,
        segment_bytes: int = 1 << 20,
        run: bool = True,
        open_first: bool = True,
        memory: MemoryLimit | None = None,
    ) -> Harness:
        metrics = SpoolMetrics(Registry())
        memory = memory or MemoryLimit(capacity_events, 1 << 30)
        forwarded = MailboxRecorder()
        spool = Spool(
            directory=directory or tmp_path / "spool",
            max_bytes=max_bytes,
            segment_bytes=segment_bytes,
            memory=memory,
            deliver=forwarded,
            metrics=metrics,
        )
        harness = Harness(spool, metrics, memory, forwarded)
        harnesses.append(harness)
        if open_first:
            await spool.open()  # returns None; an OSError is recorded, not raised
        if run:
            harness.run()
        return harness

    yield open_
    for harness in harnesses:
        await harness.stop_task()
        with contextlib.suppress(OSError):
            await harness.spool.close()


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"
