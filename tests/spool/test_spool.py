"""The Spool facade (clickpulse.spool): the buffering path's lifecycle. Opening softly, opening
later from run() rather than from a request, the recovered batch's one route, and nobody left
waiting when the actor ends."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path

import pytest
from aioprometheus import Registry

import clickpulse.spool as spool_module
from clickpulse.batcher import Batcher
from clickpulse.memory_limit import MemoryLimit
from clickpulse.messages import Batch, PipelineDown, Refused
from clickpulse.metrics import BatcherMetrics, SpoolMetrics
from clickpulse.ports import BufferingPath
from clickpulse.spool import Spool, segment_name
from tests.spool.conftest import OpenSpool
from tests.spool.helpers import (
    append_and_forward,
    now,
    rewrite_rows_on_disk,
    rows,
)
from tests.support import MailboxRecorder, eventually


@pytest.fixture
def quick_reopen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_module, "REOPEN_INTERVAL_SECONDS", 0.01)


def test_a_spool_is_a_buffering_path(tmp_path: Path) -> None:
    spool = Spool(directory=tmp_path, max_bytes=1, segment_bytes=1, memory=MemoryLimit(1, 1 << 30),
                  deliver=MailboxRecorder(), metrics=SpoolMetrics(Registry()))
    path: BufferingPath = spool  # checked by mypy; at run time, what the supervisor relies on
    assert (path.keeps_unwritten, path.takes_durable) == (True, True)


async def test_unwritable_directory_fails_softly_and_accept_names_the_error(
    open_spool: OpenSpool, tmp_path: Path, caplog: pytest.LogCaptureFixture, quick_reopen: None
) -> None:
    plain_file = tmp_path / "plain-file"
    plain_file.write_bytes(b"")  # root ignores permissions; a file where a directory should be stops it too
    directory = plain_file / "spool"

    harness = await open_spool(directory)  # open() must not raise; run() keeps trying
    await asyncio.sleep(0.05)

    assert "Not a directory" in (harness.spool.not_ready_reason() or "")
    for _ in range(2):  # the same answer while the directory stays broken
        with pytest.raises(Refused, match="Not a directory") as caught:
            await harness.accept(rows("a"))
        assert str(directory) in str(caught.value)
        assert (caught.value.reason, caught.value.retry_after) == ("overloaded", 1)
    assert harness.forwarded.deliveries == []
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1, "the same error is logged once, however often it is retried"


async def test_open_failing_at_start_does_not_raise_and_run_opens_it_later_without_a_request(
    open_spool: OpenSpool, tmp_path: Path, quick_reopen: None
) -> None:
    plain_file = tmp_path / "plain-file"
    plain_file.write_bytes(b"")
    harness = await open_spool(plain_file / "spool")
    assert harness.spool.not_ready_reason() is not None

    plain_file.unlink()  # the operator fixes the volume; no request comes in
    await eventually(lambda: harness.spool.not_ready_reason() is None)

    assert (plain_file / "spool").is_dir()
    await harness.accept(rows("a"))
    forwarded = await harness.forwarded.wait_for(1)
    assert [delivery.rows for delivery in forwarded] == [rows("a")]


async def test_a_spool_not_open_yet_refuses(open_spool: OpenSpool) -> None:
    harness = await open_spool(run=False, open_first=False)

    with pytest.raises(Refused, match="not open"):
        await harness.accept(rows("a"))
    assert "spool unavailable" in (harness.spool.not_ready_reason() or "")


async def test_a_durable_accept_waiting_for_its_fsync_gets_pipeline_down_when_run_is_cancelled(
    open_spool: OpenSpool, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness = await open_spool()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:  # a disk that takes its time: the pass outlasts the test
        time.sleep(0.3)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    accepting = asyncio.create_task(harness.accept(rows("a"), durable=True))
    await asyncio.sleep(0.05)
    assert not accepting.done()

    await harness.stop_task()

    async with asyncio.timeout(0.1):  # at once, not when the fsync would have ended
        with pytest.raises(PipelineDown):
            await accepting


async def test_confirmations_of_records_not_yet_forwarded_get_pipeline_down_when_run_ends(open_spool: OpenSpool) -> None:
    harness = await open_spool(capacity_events=1)
    assert harness.memory.try_reserve(1, 0)  # the pipeline is full: nothing is forwarded
    confirmation: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    await harness.spool.accept(rows("a"), 1, now(), durable=True, confirmation=confirmation)

    await harness.stop_task()

    assert confirmation.done()
    assert isinstance(confirmation.exception(), PipelineDown)
    with pytest.raises(PipelineDown):  # and whoever comes later is not left waiting either
        await harness.accept(rows("b"), durable=False)
    assert harness.spool.not_ready_reason() == "spool stopped"


async def test_a_closed_spool_refuses_as_shutting_down(open_spool: OpenSpool) -> None:
    harness = await open_spool()
    await harness.shut()

    with pytest.raises(Refused) as caught:
        await harness.accept(rows("a"))
    assert caught.value.reason == "shutting_down"


async def test_after_insert_releases_the_batchs_memory_reservation(open_spool: OpenSpool) -> None:
    harness = await open_spool()
    deliveries = await append_and_forward(harness, [rows("a", 2), rows("b", 3)])
    assert harness.memory.held == 5

    await harness.spool.after_insert(Batch(deliveries, "size"))

    assert harness.memory.held == 0


async def move_away_and_break(spool_dir: Path, tmp_path: Path) -> Path:
    moved = tmp_path / "moved-away"
    spool_dir.rename(moved)
    spool_dir.write_bytes(b"")  # a file where the directory should be: open() fails softly
    return moved


def put_back(spool_dir: Path, moved: Path) -> None:
    spool_dir.unlink()
    moved.rename(spool_dir)


async def test_spool_opened_late_forwards_the_batch_in_flight_first_and_in_order(
    open_spool: OpenSpool, tmp_path: Path, spool_dir: Path, quick_reopen: None
) -> None:
    # The directory is unusable at start (open() fails softly) and comes back while running:
    # the batch that was in flight at the crash is forwarded ahead of everything else.
    first = await open_spool(spool_dir)
    deliveries = await append_and_forward(first, [rows("a"), rows("b", 2), rows("c", 3)])
    await first.spool.before_insert(Batch(deliveries[:2], "size"))
    await first.shut()
    moved = await move_away_and_break(spool_dir, tmp_path)

    second = await open_spool(spool_dir, capacity_events=100)
    with pytest.raises(Refused):
        await second.accept(rows("refused"))
    put_back(spool_dir, moved)
    await eventually(lambda: second.spool.not_ready_reason() is None)

    await second.accept(rows("d"))

    await second.forwarded.wait_for(4)
    assert second.forwarded.payloads == [rows("a"), rows("b", 2), rows("c", 3), rows("d")]
    assert [batch.count for batch in second.forwarded.batches] == [3]  # a and b, as one whole batch
    assert second.memory.held == 7  # each forwarded once, reserved once


async def test_spool_opened_late_still_keeps_at_most_the_memory_capacity_of_rows_in_memory(
    open_spool: OpenSpool, tmp_path: Path, spool_dir: Path, quick_reopen: None
) -> None:
    # The recovered batch's rows are held in memory (reserved in the MemoryLimit) until the Writer
    # confirms them; with the pipeline full, later rows wait on disk, not in memory.
    first = await open_spool(spool_dir)
    deliveries = await append_and_forward(first, [rows("old", 3)])
    await first.spool.before_insert(Batch(deliveries, "size"))
    await first.shut()
    moved = await move_away_and_break(spool_dir, tmp_path)
    second = await open_spool(spool_dir, capacity_events=10)
    put_back(spool_dir, moved)
    await eventually(lambda: second.spool.not_ready_reason() is None)
    await second.accept(rows("mem0"))
    await second.forwarded.wait_for(2)
    second.forwarded.on_delivery = lambda delivery: second.memory.release(delivery.count, 0)  # an instant Writer
    assert second.memory.try_reserve(10 - second.memory.held, 0)  # full from now on

    for name in ("mem1", "mem2", "mem3"):  # the memory capacity is used up: none of them fits
        await second.accept(rows(name, 5 if name != "mem3" else 3), 5 if name != "mem3" else 3)
    await asyncio.sleep(0.02)
    rewrite_rows_on_disk(spool_dir / segment_name(2), b"mem", b"dsk")
    second.memory.release(10, 0)

    await second.forwarded.wait_for(5)
    assert second.forwarded.payloads[2:] == [rows("dsk1", 5), rows("dsk2", 5), rows("dsk3", 3)]


async def test_the_batch_in_flight_reaches_the_writer_whole_with_exactly_its_rows_through_the_batcher(
    open_spool: OpenSpool, tmp_path: Path, spool_dir: Path, quick_reopen: None
) -> None:
    # The batch in flight at a crash may already be in ClickHouse; only an insert of exactly its
    # rows carries the same deduplication token. Whether the spool opens at start or later, that
    # batch reaches the Writer whole and alone, not as records the Batcher merges with later ones.
    first = await open_spool(spool_dir)
    deliveries = await append_and_forward(first, [rows("a"), rows("b", 2), rows("c", 3)])
    in_flight = Batch(deliveries[:2], "size")
    await first.spool.before_insert(in_flight)  # sent to ClickHouse; the answer never came back
    await first.shut()
    moved = await move_away_and_break(spool_dir, tmp_path)

    memory = MemoryLimit(100, 1 << 30)
    handed: list[Batch] = []

    async def hand_to_writer(batch: Batch) -> None:  # an instant Writer
        handed.append(batch)
        memory.release(batch.count, 0)

    batcher = Batcher(batch_size=100, flush_interval=0.05, hand_to_writer=hand_to_writer,
                      metrics=BatcherMetrics(Registry()))
    second = Spool(directory=spool_dir, max_bytes=1 << 20, segment_bytes=1 << 20, memory=memory,
                   deliver=batcher.put, metrics=SpoolMetrics(Registry()))
    await second.open()  # fails softly
    tasks = [asyncio.create_task(batcher.run()), asyncio.create_task(second.run())]
    try:
        put_back(spool_dir, moved)
        await eventually(lambda: second.not_ready_reason() is None)
        await second.accept(rows("d"), 1, now(), durable=True, confirmation=None)
        await eventually(lambda: sum(batch.count for batch in handed) >= 7)
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks)
        await second.close()

    body = b"".join(delivery.rows for delivery in handed[0].deliveries)
    assert body == rows("a") + rows("b", 2)  # the same rows, so the same deduplication token
    assert [delivery.position for delivery in handed[0].deliveries] == [d.position for d in in_flight.deliveries]
    assert b"".join(delivery.rows for batch in handed[1:] for delivery in batch.deliveries) == rows("c", 3) + rows("d")
    assert memory.held == 0
