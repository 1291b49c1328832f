"""Forwarding and recovery (clickpulse.spool.replay): log order, fsynced first, the one admission
rule under MAX_BUFFER_EVENTS, read-back from disk, and what a restart replays."""

from __future__ import annotations

import asyncio
import gc
import struct
import threading
import tracemalloc
import zlib
from pathlib import Path

import pytest

from clickpulse.messages import Batch, SpoolPosition
from clickpulse.spool import LEDGER_NAME, encode_record, scan_segment, segment_name
from clickpulse.spool.replay import YIELD_EVERY
from tests.spool.conftest import OpenSpool
from tests.spool.helpers import (
    append_and_forward,
    fsync_passes,
    now,
    record_size,
    rewrite_rows_on_disk,
    rows,
    segment_files,
    write_to_clickhouse,
)

# -- forwarding -------------------------------------------------------------------------------


async def test_records_are_forwarded_in_accept_order_with_their_positions(open_spool: OpenSpool, spool_dir: Path) -> None:
    harness = await open_spool()
    confirmation: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    received_at = now() - 1.5
    payloads = [rows(f"r{index}", index + 1) for index in range(5)]

    for index, payload in enumerate(payloads):
        await harness.spool.accept(
            payload, index + 1, received_at + index, durable=index % 2 == 0,
            confirmation=confirmation if index == 3 else None,
        )
    forwarded = await harness.forwarded.wait_for(5)

    records, _ = scan_segment(1, (spool_dir / segment_name(1)).read_bytes())
    assert [delivery.rows for delivery in forwarded] == payloads
    assert [delivery.count for delivery in forwarded] == [1, 2, 3, 4, 5]
    assert [delivery.position for delivery in forwarded] == [record.position for record in records]
    assert [delivery.received_at for delivery in forwarded] == [received_at + index for index in range(5)]
    assert [delivery.confirmation for delivery in forwarded] == [None, None, None, confirmation, None]
    assert harness.memory.held == 15  # each forwarded record was reserved in the MemoryLimit


async def test_a_record_is_forwarded_only_once_it_is_fsynced(open_spool: OpenSpool) -> None:
    harness = await open_spool()
    passes_at_delivery: list[int] = []
    harness.forwarded.on_delivery = lambda delivery: passes_at_delivery.append(fsync_passes(harness.metrics))

    await harness.accept(rows("a"), durable=False)
    await harness.forwarded.wait_for(1)

    assert passes_at_delivery == [1]


async def test_forwarding_waits_while_the_memory_limit_is_full(open_spool: OpenSpool) -> None:
    harness = await open_spool(capacity_events=10)
    assert harness.memory.try_reserve(10, 0)  # the Writer holds everything

    await harness.accept(rows("a", 2), 2)
    await harness.accept(rows("b", 2), 2)
    await asyncio.sleep(0.05)
    assert harness.forwarded.deliveries == []

    harness.memory.release(3, 0)  # room for the first record only
    await harness.forwarded.wait_for(1)
    await asyncio.sleep(0.02)
    assert harness.forwarded.payloads == [rows("a", 2)]

    harness.memory.release(7, 0)
    await harness.forwarded.wait_for(2)
    assert harness.forwarded.payloads == [rows("a", 2), rows("b", 2)]
    assert harness.memory.held == 4


async def test_a_long_backlog_in_memory_gives_the_event_loop_a_turn_every_yield_every_records(
    open_spool: OpenSpool,
) -> None:
    # Forwarding many fsynced records is one synchronous stretch per YIELD_EVERY: a restart with
    # thousands of kept records must not hold /healthz and new requests until all are forwarded.
    first = await open_spool(capacity_events=100_000, run=False)
    for index in range(1000):
        await first.accept(rows(f"r{index}"), durable=False)
    await first.shut()
    second = await open_spool(capacity_events=100_000, run=False)
    seen_between_turns: list[int] = []

    async def other_task() -> None:
        while len(second.forwarded.deliveries) < 1000:
            seen_between_turns.append(len(second.forwarded.deliveries))
            await asyncio.sleep(0)

    watching = asyncio.create_task(other_task())
    second.run()
    await second.forwarded.wait_for(1000)
    await watching

    assert second.forwarded.payloads == [rows(f"r{index}") for index in range(1000)]
    steps = [later - earlier for earlier, later in zip(seen_between_turns, seen_between_turns[1:])]
    assert steps and max(steps) <= YIELD_EVERY, f"the longest stretch forwarded {max(steps, default=1000)} records"
    assert sum(1 for count in seen_between_turns if 0 < count < 1000) >= 1000 // YIELD_EVERY


async def test_records_beyond_the_memory_capacity_are_read_back_from_disk(open_spool: OpenSpool, spool_dir: Path) -> None:
    harness = await open_spool(capacity_events=5)
    assert harness.memory.try_reserve(5, 0)
    harness.forwarded.on_delivery = lambda delivery: harness.memory.release(delivery.count, 0)  # an instant Writer
    payloads = [rows(f"mem{index}", 2) for index in range(4)]
    for payload in payloads:  # the pipeline holds MAX_BUFFER_EVENTS: none of them fits in memory
        await harness.accept(payload, 2)
    await asyncio.sleep(0.02)
    assert harness.forwarded.deliveries == []

    records = rewrite_rows_on_disk(spool_dir / segment_name(1), b"mem", b"dsk")
    harness.memory.release(5, 0)

    forwarded = await harness.forwarded.wait_for(4)

    assert [delivery.rows for delivery in forwarded] == [rows(f"dsk{index}", 2) for index in range(4)]
    assert [delivery.position for delivery in forwarded] == [record.position for record in records]


async def test_read_back_never_holds_more_than_the_memory_limit_lets_in(open_spool: OpenSpool, spool_dir: Path) -> None:
    harness = await open_spool(capacity_events=4)
    assert harness.memory.try_reserve(4, 0)
    for index in range(10):
        await harness.accept(rows(f"r{index}"), 1)
    await asyncio.sleep(0.02)
    rewrite_rows_on_disk(spool_dir / segment_name(1), b"r", b"d")  # all of them wait on disk

    harness.memory.release(4, 0)  # a Writer that never confirms: room for four, then no more
    await harness.forwarded.wait_for(4)
    await asyncio.sleep(0.05)

    assert harness.forwarded.payloads == [rows(f"d{index}") for index in range(4)]
    assert harness.memory.held == 4


async def test_stop_forwarding_keeps_later_records_in_the_spool(open_spool: OpenSpool) -> None:
    harness = await open_spool()
    await harness.accept(rows("a"))
    await harness.forwarded.wait_for(1)

    harness.spool.stop_forwarding()
    await harness.accept(rows("b"))
    await asyncio.sleep(0.05)

    assert harness.forwarded.payloads == [rows("a")]
    assert harness.spool.unconfirmed_events == 2


async def test_while_the_memory_limit_is_full_new_records_wait_on_disk_not_in_memory(open_spool: OpenSpool) -> None:
    # MAX_BUFFER_EVENTS bounds every event held in memory; "when full, disk with a spool". With the
    # Batcher and the Writer holding all of it (a slow ClickHouse), the spool must not keep up to
    # another MAX_BUFFER_EVENTS of rows in memory waiting for their turn.
    harness = await open_spool(capacity_events=10)
    assert harness.memory.try_reserve(10, 0)  # the pipeline is full

    def payload() -> bytes:  # 100 KB, a new object each time, as each request's rows are
        return b'{"x":"' + b"y" * 100_000 + b'"}\n'

    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for _ in range(10):
            await harness.accept(payload(), durable=False)
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert after - before < 200_000, f"{(after - before) / 1e6:.1f} MB of rows kept in memory beyond MAX_BUFFER_EVENTS"
    harness.forwarded.on_delivery = lambda delivery: harness.memory.release(delivery.count, 0)
    harness.memory.release(10, 0)
    forwarded = await harness.forwarded.wait_for(10)  # read back from disk, in order
    assert [delivery.rows for delivery in forwarded] == [payload()] * 10


async def test_rows_kept_in_memory_and_events_held_by_the_pipeline_never_exceed_the_capacity(
    open_spool: OpenSpool, spool_dir: Path
) -> None:
    harness = await open_spool(capacity_events=10, run=False)
    assert harness.memory.try_reserve(4, 0)  # the pipeline holds 4: room for 6 more in memory
    for name in ("mem0", "mem1", "mem2"):  # 3 + 3 fit, the third does not
        await harness.accept(rows(name, 3), 3, durable=False)
    await harness.accept(rows("mem3"), 1, durable=False)  # would fit, but must not pass the one on disk
    rewrite_rows_on_disk(spool_dir / segment_name(1), b"mem", b"dsk")
    harness.forwarded.on_delivery = lambda delivery: harness.memory.release(delivery.count, 0)
    harness.run()

    forwarded = await harness.forwarded.wait_for(4)

    assert [delivery.rows for delivery in forwarded] == [rows("mem0", 3), rows("mem1", 3), rows("dsk2", 3), rows("dsk3")]


async def test_recovery_places_records_by_the_same_rule_as_accept(open_spool: OpenSpool, spool_dir: Path) -> None:
    # The pipeline holds 4 of 10 at open: the first two records keep their rows, the third and
    # everything after it (even a record that would fit) wait on disk.
    first = await open_spool(run=False)
    for name, count in (("mem0", 3), ("mem1", 3), ("mem2", 3), ("mem3", 1)):
        await first.accept(rows(name, count), count, durable=False)
    await first.shut()
    second = await open_spool(capacity_events=10, run=False, open_first=False)
    assert second.memory.try_reserve(4, 0)
    await second.spool.open()
    rewrite_rows_on_disk(spool_dir / segment_name(1), b"mem", b"dsk")
    second.forwarded.on_delivery = lambda delivery: second.memory.release(delivery.count, 0)
    second.memory.release(4, 0)
    second.run()

    forwarded = await second.forwarded.wait_for(4)

    assert [delivery.rows for delivery in forwarded] == [rows("mem0", 3), rows("mem1", 3), rows("dsk2", 3), rows("dsk3")]


# -- recovery ---------------------------------------------------------------------------------


async def test_new_spool_replays_only_the_records_after_the_confirmed_mark(open_spool: OpenSpool) -> None:
    first = await open_spool()
    deliveries = await append_and_forward(first, [rows("a"), rows("b", 2), rows("c", 3), rows("d")])
    await write_to_clickhouse(first, deliveries[:2])
    assert first.spool.unconfirmed_events == 4
    await first.shut()

    second = await open_spool()

    replayed = await second.forwarded.wait_for(2)
    await asyncio.sleep(0.02)
    assert second.forwarded.payloads == [rows("c", 3), rows("d")]
    assert second.forwarded.batches == []
    assert [delivery.position for delivery in replayed] == [delivery.position for delivery in deliveries[2:]]
    assert [delivery.count for delivery in replayed] == [3, 1]
    assert second.metrics.replayed_events.get({}) == 4
    assert second.spool.unconfirmed_events == 4


async def test_batch_in_flight_at_a_crash_is_forwarded_first_whole_and_not_again(open_spool: OpenSpool) -> None:
    first = await open_spool()
    deliveries = await append_and_forward(first, [rows("a"), rows("b", 2), rows("c", 3), rows("d", 4)])
    await write_to_clickhouse(first, deliveries[:1])
    await first.spool.before_insert(Batch(deliveries[1:3], "size"))  # the insert never came back
    await first.shut()

    second = await open_spool(capacity_events=100, run=False)
    assert second.memory.held == 5  # the recovered batch holds its events in memory
    second.run()

    await second.forwarded.wait_for(3)
    await asyncio.sleep(0.02)
    [recovered] = second.forwarded.batches
    assert recovered.trigger == "replay"
    assert [delivery.rows for delivery in recovered.deliveries] == [rows("b", 2), rows("c", 3)]
    assert [delivery.position for delivery in recovered.deliveries] == [d.position for d in deliveries[1:3]]
    assert [delivery.count for delivery in recovered.deliveries] == [2, 3]
    assert recovered.count == 5
    assert second.forwarded.payloads == [rows("b", 2), rows("c", 3), rows("d", 4)]  # the batch first
    assert second.memory.held == 9
    assert second.metrics.replayed_events.get({}) == 9


async def test_recovered_batch_once_confirmed_is_not_replayed_at_the_next_start(open_spool: OpenSpool) -> None:
    first = await open_spool()
    deliveries = await append_and_forward(first, [rows("a"), rows("b")])
    await first.spool.before_insert(Batch(deliveries, "size"))
    await first.shut()
    second = await open_spool()
    await second.forwarded.wait_for(2)
    [recovered] = second.forwarded.batches
    await second.spool.before_insert(recovered)
    await second.spool.after_insert(recovered)
    assert second.memory.held == 0  # after_insert released the batch's reservation
    await second.shut()

    third = await open_spool()
    await asyncio.sleep(0.05)

    assert third.forwarded.batches == []
    assert third.forwarded.deliveries == []


async def test_records_written_after_a_restart_with_everything_confirmed_are_replayed(open_spool: OpenSpool) -> None:
    # Everything before the restart was confirmed, so its segments are gone at the next start;
    # the records written after it must still sort after the confirmed mark.
    first = await open_spool()
    await write_to_clickhouse(first, await append_and_forward(first, [rows("a"), rows("b"), rows("c")]))
    await first.shut()
    second = await open_spool()
    await append_and_forward(second, [rows("after-restart")])  # acknowledged, never inserted
    await second.shut()

    third = await open_spool()

    await third.forwarded.wait_for(1)
    assert third.forwarded.payloads == [rows("after-restart")]
    assert third.spool.unconfirmed_events == 1


@pytest.mark.parametrize("tear", ["garbage-appended", "last-record-cut-in-half"])
async def test_torn_tail_is_truncated_on_open_and_the_intact_records_replayed(
    open_spool: OpenSpool, spool_dir: Path, tear: str
) -> None:
    first = await open_spool()
    payloads = [rows("a"), rows("b", 2), rows("c", 3)]
    await append_and_forward(first, payloads)
    await first.shut()
    path = spool_dir / segment_name(1)
    data = path.read_bytes()
    if tear == "garbage-appended":
        path.write_bytes(data + b"\x00garbage after a crash")
        intact_payloads, intact_size = payloads, len(data)
    else:
        last = record_size(payloads[-1])
        path.write_bytes(data[: len(data) - last // 2])
        intact_payloads, intact_size = payloads[:-1], len(data) - last

    second = await open_spool()

    assert second.metrics.corrupt_records.get({}) == 1
    assert path.stat().st_size == intact_size
    await second.forwarded.wait_for(len(intact_payloads))
    await asyncio.sleep(0.02)
    assert second.forwarded.payloads == intact_payloads
    # Writing goes on in a new segment, after the intact records.
    await second.accept(rows("new"))
    await second.forwarded.wait_for(len(intact_payloads) + 1)
    assert second.forwarded.deliveries[-1].position == SpoolPosition(2, 0)


async def test_intact_spool_reports_no_corrupt_records(open_spool: OpenSpool) -> None:
    first = await open_spool()
    await append_and_forward(first, [rows("a")])
    await first.shut()

    second = await open_spool()

    assert second.metrics.corrupt_records.get({}) == 0


async def test_recovery_holds_at_most_the_memory_capacity_of_rows_not_the_whole_spool(open_spool: OpenSpool) -> None:
    # After a long outage the spool holds up to SPOOL_MAX_BYTES of unconfirmed records. Opening it
    # must not read them all into memory at once (a restart would then be killed for memory, and
    # again at every restart): only what fits under MAX_BUFFER_EVENTS keeps its rows.
    payload = b'{"x":"' + b"y" * 4000 + b'"}\n'
    first = await open_spool(capacity_events=10, segment_bytes=1 << 20, max_bytes=64 << 20, run=False)
    for _ in range(4000):  # ~16 MiB in 16 segments
        await first.accept(payload, durable=False)
    await first.shut()

    tracemalloc.start()
    try:
        second = await open_spool(capacity_events=10, segment_bytes=1 << 20, max_bytes=64 << 20, run=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert second.spool.unconfirmed_events == 4000
    assert peak < 6 << 20, f"opening a 16 MiB spool allocated {peak / 2**20:.1f} MiB"
    # Every record still replays, in order: the first ten from memory, the rest read back.
    second.forwarded.on_delivery = lambda delivery: second.memory.release(delivery.count, 0)
    second.run()
    forwarded = await second.forwarded.wait_for(4000, timeout=10.0)
    assert all(delivery.rows == payload for delivery in forwarded)
    assert [delivery.position for delivery in forwarded] == sorted(delivery.position for delivery in forwarded)


async def test_a_large_recovered_backlog_gives_the_garbage_collector_almost_nothing_to_track(
    open_spool: OpenSpool, spool_dir: Path
) -> None:
    # Every full collection walks every tracked object, holding the GIL: one object per waiting
    # record would make each collection (and the event loop's pause) grow with the backlog.
    spool_dir.mkdir()
    records = 20_000
    (spool_dir / segment_name(1)).write_bytes(b"".join(encode_record(rows(f"r{index}"), 1, index) for index in range(records)))
    gc.collect()
    before = len(gc.get_objects())

    harness = await open_spool(capacity_events=10, run=False)

    gc.collect()
    assert harness.spool.unconfirmed_events == records
    assert len(gc.get_objects()) - before < records // 20


async def test_open_reads_the_directory_in_a_worker_thread(
    open_spool: OpenSpool, spool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await open_spool()
    await append_and_forward(first, [rows("a")])
    await first.shut()
    threads: list[str] = []
    real_read_bytes = Path.read_bytes

    def read_bytes(path: Path) -> bytes:
        threads.append(threading.current_thread().name)
        return real_read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)

    second = await open_spool()

    await second.forwarded.wait_for(1)
    assert threads and threading.main_thread().name not in threads


# -- a directory written by an earlier version --------------------------------------------------


def old_record(payload: bytes, count: int, received_ms: int) -> bytes:
    """A record exactly as every earlier version wrote it, built here without the package."""
    crc = zlib.crc32(payload, zlib.crc32(struct.pack("<IQ", count, received_ms)))
    return struct.pack("<4sIIIQ", b"CPR1", len(payload), count, crc, received_ms) + payload


async def test_a_spool_directory_in_the_earlier_format_replays_completely(open_spool: OpenSpool, spool_dir: Path) -> None:
    # Segment 3 is wholly confirmed, segment 4 up to its second record; the third and fourth
    # records of segment 4 were in flight; segment 5 is unconfirmed and ends in a torn record.
    spool_dir.mkdir()
    received_ms = 1_700_000_000_000
    segment_3 = [old_record(rows(f"s3-{index}"), 1, received_ms) for index in range(2)]
    segment_4 = [old_record(rows(f"s4-{index}", index + 1), index + 1, received_ms + index) for index in range(5)]
    segment_5 = [old_record(rows(f"s5-{index}", 2), 2, received_ms + 10 + index) for index in range(3)]
    (spool_dir / "segment-000000000003.log").write_bytes(b"".join(segment_3))
    (spool_dir / "segment-000000000004.log").write_bytes(b"".join(segment_4))
    (spool_dir / "segment-000000000005.log").write_bytes(b"".join(segment_5) + segment_5[0][:30])
    offsets = [sum(map(len, segment_4[:index])) for index in range(6)]
    (spool_dir / LEDGER_NAME).write_bytes(
        b"C 3 %d\n" % sum(map(len, segment_3))
        + b"I 4 0 4 %d\n" % offsets[2]
        + b"C 4 %d\n" % offsets[2]
        + b"I 4 %d 4 %d\n" % (offsets[2], offsets[4])
        + b"C 4 %d" % offsets[4]  # torn: never happened
    )

    harness = await open_spool(capacity_events=100, run=False)
    harness.forwarded.on_delivery = lambda delivery: harness.memory.release(delivery.count, 0)
    harness.run()

    expected = [rows("s4-2", 3), rows("s4-3", 4), rows("s4-4", 5)] + [rows(f"s5-{index}", 2) for index in range(3)]
    await harness.forwarded.wait_for(len(expected))
    await asyncio.sleep(0.02)
    assert harness.forwarded.payloads == expected
    [in_flight] = harness.forwarded.batches
    assert [delivery.rows for delivery in in_flight.deliveries] == expected[:2]
    assert [delivery.position for delivery in in_flight.deliveries] == [
        SpoolPosition(4, offsets[2]), SpoolPosition(4, offsets[3])
    ]
    assert [delivery.position for delivery in harness.forwarded.deliveries[2:]] == [
        SpoolPosition(4, offsets[4]), *(SpoolPosition(5, sum(map(len, segment_5[:i]))) for i in range(3))
    ]
    assert harness.spool.unconfirmed_events == 3 + 4 + 5 + 6
    assert harness.metrics.replayed_events.get({}) == 18
    assert harness.metrics.corrupt_records.get({}) == 1
    assert segment_files(spool_dir) == [segment_name(4), segment_name(5), segment_name(6)]
    assert (spool_dir / segment_name(5)).read_bytes() == b"".join(segment_5)  # the torn tail cut off
    harness.spool.publish_metrics()
    assert harness.metrics.oldest_unconfirmed_timestamp.get({}) == (received_ms + 2) / 1000

    # Confirming everything, as the Writer would, leaves a directory the earlier version reads too.
    await harness.spool.after_insert(in_flight)
    await harness.spool.after_insert(Batch(harness.forwarded.deliveries[2:], "size"))
    await harness.shut()
    assert segment_files(spool_dir) == [segment_name(6)]
    assert (spool_dir / LEDGER_NAME).read_bytes().splitlines()[-1] == b"C 5 %d" % sum(map(len, segment_5))
