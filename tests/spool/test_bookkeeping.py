"""The spool's memory for an unconfirmed backlog: per record only for what memory holds anyway
(rows kept, records forwarded, requests waiting), the rest found again on disk from a cursor;
and the unconfirmed count and oldest receipt time exact all the same."""

from __future__ import annotations

import asyncio
import tracemalloc
from pathlib import Path

from clickpulse.memory_limit import MemoryLimit
from clickpulse.messages import Batch, Delivery, SpoolPosition
from clickpulse.spool import LEDGER_NAME, encode_record, segment_name
from tests.spool.conftest import OpenSpool
from tests.spool.helpers import rows, segment_files, write_to_clickhouse

RECEIVED_MS = 1_700_000_000_000


def write_segments(directory: Path, records_per_segment: list[int], *, start: int = 1) -> list[list[SpoolPosition]]:
    """One-event records r<segment>-<index> with receipt times RECEIVED_MS + their global index."""
    directory.mkdir(parents=True, exist_ok=True)
    positions, index = [], 0
    for number, records in enumerate(records_per_segment, start):
        data, here = bytearray(), []
        for i in range(records):
            here.append(SpoolPosition(number, len(data)))
            data += encode_record(rows(f"r{number}-{i}"), 1, RECEIVED_MS + index)
            index += 1
        (directory / segment_name(number)).write_bytes(bytes(data))
        positions.append(here)
    return positions


async def test_a_large_backlog_on_disk_costs_no_memory_per_record(open_spool: OpenSpool, spool_dir: Path) -> None:
    records = 60_000
    write_segments(spool_dir, [records // 3] * 3)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        harness = await open_spool(spool_dir, capacity_events=100, run=False)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # The old bookkeeping held two tuples per record: ~20 MB here. Now: the 100 kept records.
    assert held < 1 << 20, held
    assert harness.spool.unconfirmed_events == records
    harness.spool.publish_metrics()
    assert harness.metrics.oldest_unconfirmed_timestamp.get({}) == RECEIVED_MS / 1000


async def test_a_backlog_on_disk_is_forwarded_whole_in_log_order_across_segments(open_spool: OpenSpool, spool_dir: Path) -> None:
    positions = write_segments(spool_dir, [700, 1, 899])
    harness = await open_spool(spool_dir, capacity_events=50, run=False)
    confirmed: list[Delivery] = []

    def writer(delivery: Delivery | Batch) -> None:  # confirms each batch of 25 as it comes
        assert isinstance(delivery, Delivery)
        confirmed.append(delivery)
        if len(confirmed) % 25 == 0:
            asyncio.get_running_loop().create_task(write_to_clickhouse(harness, confirmed[-25:]))

    harness.forwarded.on_delivery = writer
    harness.run()
    await harness.forwarded.wait_for(1600, timeout=20)
    assert [delivery.position for delivery in harness.forwarded.deliveries] == [p for each in positions for p in each]
    assert harness.forwarded.payloads[-1] == rows("r3-898")
    assert harness.memory.held <= 50
    await asyncio.sleep(0.05)
    assert harness.spool.unconfirmed_events == 0
    harness.spool.publish_metrics()
    assert harness.metrics.oldest_unconfirmed_timestamp.get({}) == 0
    assert segment_files(spool_dir) == [segment_name(4)]  # confirmed segments deleted


async def test_the_oldest_unconfirmed_time_follows_the_confirmed_mark_into_the_disk_backlog(open_spool: OpenSpool, spool_dir: Path) -> None:
    write_segments(spool_dir, [10, 10])
    harness = await open_spool(spool_dir, capacity_events=4)
    forwarded = await harness.forwarded.wait_for(4)
    harness.spool.publish_metrics()
    assert harness.metrics.oldest_unconfirmed_timestamp.get({}) == RECEIVED_MS / 1000
    await write_to_clickhouse(harness, list(forwarded[:3]))
    harness.spool.publish_metrics()
    assert harness.metrics.oldest_unconfirmed_timestamp.get({}) == (RECEIVED_MS + 3) / 1000
    assert harness.spool.unconfirmed_events == 17
    forwarded = await harness.forwarded.wait_for(7)
    await write_to_clickhouse(harness, list(forwarded[3:7]))
    # Nothing forwarded is unconfirmed now: the next record waits on disk, and its time is known.
    await asyncio.sleep(0.02)
    harness.spool.publish_metrics()
    assert harness.metrics.oldest_unconfirmed_timestamp.get({}) == (RECEIVED_MS + 7) / 1000
    assert harness.spool.unconfirmed_events == 13


async def test_a_request_waiting_for_its_confirmation_gets_it_from_a_record_read_back(open_spool: OpenSpool) -> None:
    harness = await open_spool(capacity_events=2)
    assert harness.memory.try_reserve(2, 0)  # the pipeline is full: what comes now waits on disk
    loop = asyncio.get_running_loop()
    waiters = [loop.create_future() for _ in range(3)]
    for index, waiter in enumerate(waiters):
        await harness.spool.accept(rows(f"w{index}"), 1, loop.time(), durable=True, confirmation=waiter)
    assert not harness.spool._replay._kept  # nothing kept in memory
    harness.forwarded.on_delivery = lambda delivery: harness.memory.release(delivery.count, 0)
    harness.memory.release(2, 0)
    forwarded = await harness.forwarded.wait_for(3)
    assert [delivery.confirmation for delivery in forwarded] == waiters
    assert harness.spool._replay._disk_waiters == {}


async def test_new_records_after_the_disk_backlog_drained_are_kept_in_memory_again(open_spool: OpenSpool) -> None:
    harness = await open_spool(capacity_events=2)
    assert harness.memory.try_reserve(2, 0)
    await harness.accept(rows("disk0"))
    await harness.accept(rows("disk1"))
    harness.forwarded.on_delivery = lambda delivery: harness.memory.release(delivery.count, 0)
    harness.memory.release(2, 0)
    await harness.forwarded.wait_for(2)
    await harness.accept(rows("mem0"))
    await harness.accept(rows("mem1"))
    await harness.forwarded.wait_for(4)
    await asyncio.sleep(0.02)
    assert harness.forwarded.payloads == [rows("disk0"), rows("disk1"), rows("mem0"), rows("mem1")]


async def test_the_batch_in_flight_is_passed_over_when_its_segment_is_read_back(open_spool: OpenSpool, spool_dir: Path) -> None:
    positions = write_segments(spool_dir, [6])[0]
    end = positions[4]
    (spool_dir / LEDGER_NAME).write_bytes(b"C 1 %d\nI 1 %d 1 %d\n" % (positions[1].offset, positions[2].offset, end.offset))
    harness = await open_spool(spool_dir, memory=MemoryLimit(1, 1 << 30), run=False)
    harness.forwarded.on_delivery = lambda delivery: harness.memory.release(delivery.count, 0)
    harness.run()
    await harness.forwarded.wait_for(5)
    await asyncio.sleep(0.02)
    [batch] = harness.forwarded.batches
    assert [delivery.position for delivery in batch.deliveries] == positions[2:4]
    assert [delivery.position for delivery in harness.forwarded.deliveries] == [*positions[2:4], positions[1], *positions[4:]]


async def test_records_appended_during_an_outage_cost_no_memory_per_record(open_spool: OpenSpool) -> None:
    harness = await open_spool(capacity_events=10, max_bytes=1 << 30, segment_bytes=1 << 20)
    assert harness.memory.try_reserve(10, 0)  # ClickHouse is down: the pipeline holds all it may
    await harness.accept(rows("warm-up"), durable=False)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for index in range(20_000):
            await harness.accept(rows(f"outage-{index}"), durable=index % 1000 == 0)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 256 << 10, held  # the old queue: a tuple per record, ~2 MB here
    assert harness.spool.unconfirmed_events == 20_001
