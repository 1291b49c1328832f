"""A Batch resolves the waiters of its own requests."""

from __future__ import annotations

import asyncio
import gc

import pytest

from clickpulse.messages import Batch, Delivery, PipelineDown, RowsRejected, SpoolPosition


def delivery(count: int, confirmed: bool = True) -> Delivery:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[int] | None = loop.create_future() if confirmed else None
    return Delivery(b"{}\n" * count, count, loop.time(), None, future)


async def test_resolve_maps_rejected_row_indices_to_their_deliveries() -> None:
    unconfirmed = delivery(2, confirmed=False)  # rows 0-1: ack=memory, nobody waits
    second, third, fourth = delivery(3), delivery(1), delivery(2)  # rows 2-4, 5, 6-7
    batch = Batch([unconfirmed, second, third, fourth], "size")

    batch.resolve([1, 3, 4, 7], "events_quarantine")

    assert second.confirmation is not None and third.confirmation is not None and fourth.confirmation is not None
    rejection = second.confirmation.exception()
    assert isinstance(rejection, RowsRejected)
    assert (rejection.rejected, rejection.written, rejection.destination) == (2, 1, "events_quarantine")
    assert third.confirmation.result() == 1
    rejection = fourth.confirmation.exception()
    assert isinstance(rejection, RowsRejected) and (rejection.rejected, rejection.written) == (1, 1)


async def test_resolve_leaves_an_already_finished_future_alone() -> None:
    abandoned, waiting = delivery(1), delivery(1)
    assert abandoned.confirmation is not None
    abandoned.confirmation.cancel()  # its request went away

    Batch([abandoned, waiting], "size").resolve()

    assert waiting.confirmation is not None and waiting.confirmation.result() == 1


async def test_fail_gives_every_waiter_the_error() -> None:
    first, second = delivery(1), delivery(2)

    Batch([first, second], "size").fail(PipelineDown("the writer has stopped"))

    for waiting in (first, second):
        assert waiting.confirmation is not None
        with pytest.raises(PipelineDown):
            waiting.confirmation.result()


async def test_body_joins_the_rows_of_every_delivery_once() -> None:
    first, second = delivery(1), delivery(2)
    assert Batch([first, second], "size").body() == first.rows + second.rows
    assert Batch([first], "size").body() is first.rows


def test_a_delivery_is_out_of_the_collectors_sight_even_with_a_waiter() -> None:
    loop = asyncio.new_event_loop()
    try:
        confirmation: asyncio.Future[int] = loop.create_future()
        delivery = Delivery(b'{"a":1}\n', 1, 0.0, SpoolPosition(1, 0), confirmation)
        assert not gc.is_tracked(delivery)
    finally:
        loop.close()
