"""The Writer actor, through its mailbox: it reports each outcome to its ledger, the batch
resolves its waiters, and when the task ends nobody is left waiting."""

from __future__ import annotations

import asyncio

import msgspec

from clickpulse.messages import Batch, PipelineDown, RowsRejected
from clickpulse.writer.errors import deduplication_token
from tests.writer.fakes import FakeClickHouse, WriterParts, delivery, row, writer_parts


async def write_through_the_mailbox(parts: WriterParts, batches: list[Batch]) -> None:
    writer = parts.writer()
    task = asyncio.create_task(writer.run())
    for batch in batches:
        await writer.submit(batch)
    await writer.stop()
    async with asyncio.timeout(2.0):
        await task
    assert writer.pending_events == 0


async def test_a_clean_batch_is_one_insert_between_before_and_after_insert_and_confirmed() -> None:
    parts = writer_parts()
    first, second = delivery("a", "b"), delivery("c")
    batch = Batch([first, second], "size")

    await write_through_the_mailbox(parts, [batch])

    [(token, body)] = parts.clickhouse.inserts
    assert body == first.rows + second.rows
    assert token == deduplication_token(body)
    assert parts.ledger.calls == [("before_insert", batch), ("after_insert", batch)]
    assert first.confirmation is not None and first.confirmation.result() == 2
    assert second.confirmation is not None and second.confirmation.result() == 1
    assert parts.metrics.pending_events.get({}) == 0
    assert parts.metrics.inflight_batches.get({}) == 0


async def test_a_batch_with_a_bad_row_quarantines_it_and_tells_each_request_its_own_counts() -> None:
    parts = writer_parts()
    clean = delivery("good0", "good1")
    mixed = delivery("good2", "bad", "good3")
    unwatched = delivery("good4", confirmed=False)
    batch = Batch([clean, mixed, unwatched], "size")

    await write_through_the_mailbox(parts, [batch])

    assert sorted(parts.clickhouse.inserted_rows) == sorted(row(f"good{index}").strip() for index in range(5))
    [quarantine_body] = parts.clickhouse.quarantined
    assert msgspec.json.decode(quarantine_body.splitlines()[0])["row"] == row("bad").decode().strip()
    assert clean.confirmation is not None and clean.confirmation.result() == 2
    assert mixed.confirmation is not None
    rejection = mixed.confirmation.exception()
    assert isinstance(rejection, RowsRejected)
    assert (rejection.rejected, rejection.written, rejection.destination) == (1, 2, "events_quarantine")
    assert parts.ledger.calls[-1] == ("after_insert", batch)  # quarantined rows count as done


async def test_a_ledger_that_cannot_record_the_intent_does_not_stop_the_insert() -> None:
    parts = writer_parts()
    parts.ledger.fail_before_insert = True
    waiting = delivery("a")

    await write_through_the_mailbox(parts, [Batch([waiting], "size")])

    assert parts.clickhouse.inserted_rows == [row("a").strip()]
    assert waiting.confirmation is not None and waiting.confirmation.result() == 1


async def test_batches_are_written_in_the_order_submitted() -> None:
    parts = writer_parts()
    batches = [Batch([delivery(f"e{index}", confirmed=False)], "size") for index in range(5)]

    await write_through_the_mailbox(parts, batches)

    assert parts.clickhouse.inserted_rows == [row(f"e{index}").strip() for index in range(5)]


async def test_a_cancelled_writer_answers_every_waiter_with_pipeline_down() -> None:
    # ClickHouse is down: the batch being written and the one queued behind it wait for ever,
    # unless the Writer's end answers them.
    parts = writer_parts(FakeClickHouse(down=True))
    writer = parts.writer()
    task = asyncio.create_task(writer.run())
    writing, queued = delivery("a"), delivery("b")
    await writer.submit(Batch([writing], "size"))
    await writer.submit(Batch([queued], "size"))
    await asyncio.sleep(0.05)

    task.cancel()
    await asyncio.gather(task, return_exceptions=True)

    for waiter in (writing.confirmation, queued.confirmation):
        assert waiter is not None and isinstance(waiter.exception(), PipelineDown)


async def test_a_writer_cancelled_right_after_stop_ends_even_while_clickhouse_is_down() -> None:
    # What Service.stop does once SHUTDOWN_TIMEOUT is used up: stop() (which wakes the backoff
    # pause) and, in the same breath, cancel(). The cancellation must not be swallowed by the
    # woken pause, else the Writer retries forever and the shutdown never ends.
    parts = writer_parts(FakeClickHouse(down=True))
    writer = parts.writer()
    task = asyncio.create_task(writer.run())
    await writer.submit(Batch([delivery("a", confirmed=False)], "size"))  # so a stop alone does not end it
    await asyncio.sleep(0.05)  # in the backoff pause of the first connection

    await writer.stop()
    task.cancel()

    done, _ = await asyncio.wait([task], timeout=2.0)
    assert task in done, "the Writer swallowed its cancellation"


async def test_a_writer_cancelled_as_a_batch_arrives_ends_even_while_clickhouse_is_down() -> None:
    # The idle Writer waits for its mailbox; a batch put there just as the task is cancelled must
    # not be taken with the cancellation swallowed (its insert would be retried forever).
    parts = writer_parts()
    writer = parts.writer()
    task = asyncio.create_task(writer.run())
    await asyncio.sleep(0.05)  # connected, idle, waiting for the mailbox
    parts.clickhouse.down = True

    await writer.submit(Batch([delivery("a", confirmed=False)], "shutdown"))
    task.cancel()

    done, _ = await asyncio.wait([task], timeout=2.0)
    assert task in done, "the Writer swallowed its cancellation"


async def test_abandon_reports_what_was_submitted_and_not_written() -> None:
    parts = writer_parts(FakeClickHouse(down=True))
    writer = parts.writer()
    await writer.submit(Batch([delivery("a", "b", confirmed=False)], "size"))

    assert writer.abandon() == 2
    assert writer.pending_events == 0
    assert parts.metrics.inflight_batches.get({}) == 0
