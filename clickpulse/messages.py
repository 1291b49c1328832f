"""Every message, sentinel and signal the actors exchange, defined once.

A `Delivery` is one request's rows; a `Batch` is whole deliveries inserted together and resolves
the waiters of its requests itself (written, rejected into the quarantine, or failed). `Refused`
is the intake port's typed refusal; `PipelineDown` is the answer given to everyone still waiting
when an actor has died.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Final, Literal

import msgspec

AckMode = Literal["memory", "disk", "clickhouse"]
ACK_MODES: Final[tuple[AckMode, ...]] = ("memory", "disk", "clickhouse")
# "replay": the batch in flight at a crash, recovered from the spool and inserted as it was.
FlushTrigger = Literal["size", "interval", "shutdown", "replay"]
RefusalReason = Literal["overloaded", "shutting_down"]


@dataclass(frozen=True, slots=True, order=True)
class SpoolPosition:
    """Where a record starts in the spool: segment number, then byte offset. Orders like the log."""

    segment: int
    offset: int


class Delivery(msgspec.Struct, gc=False):
    """One request's events, already encoded as JSONEachRow lines. A batch never splits one.
    A Struct: one is made per request, in C (a dataclass's __init__ runs Python).

    `gc=False`: a second of single-event traffic is tens of thousands of Deliveries waiting for
    their batch, and the collector walked each of them again and again as they aged through its
    generations. No cycle through a Delivery outlives its batch: what it holds (bytes, numbers, a
    position, a future) leads back to it only through the waiting request's task and the running
    pipeline that holds the Delivery, and that path ends when the batch resolves the future."""

    rows: bytes
    count: int
    received_at: float  # event-loop clock, for flush deadlines and freshness
    position: SpoolPosition | None = None  # None when there is no spool
    # Completed with the number of rows written, for ?ack=clickhouse requests.
    confirmation: asyncio.Future[int] | None = None


@dataclass(slots=True)
class Batch:
    """Whole deliveries flushed together: one INSERT (or, on rejection, a few smaller ones)."""

    deliveries: list[Delivery]
    trigger: FlushTrigger
    count: int = field(default=0)
    size: int = field(default=0)  # bytes of rows, as reserved in the MemoryLimit

    def __post_init__(self) -> None:
        if not self.count:
            self.count = sum(delivery.count for delivery in self.deliveries)
        if not self.size:
            self.size = sum(len(delivery.rows) for delivery in self.deliveries)

    @property
    def oldest_received_at(self) -> float:
        return self.deliveries[0].received_at

    @property
    def first_position(self) -> SpoolPosition | None:
        return self.deliveries[0].position

    @property
    def last_position(self) -> SpoolPosition | None:
        return self.deliveries[-1].position

    def body(self) -> bytes:
        """The rows of every delivery, joined once: the INSERT's body."""
        deliveries = self.deliveries
        return deliveries[0].rows if len(deliveries) == 1 else b"".join(delivery.rows for delivery in deliveries)

    def resolve(self, rejected_rows: Collection[int] = (), quarantine: str = "") -> None:
        """ClickHouse has every row, except `rejected_rows` (indices in the batch), which went to
        `quarantine`. Each waiting request learns what happened to its own rows."""
        first_row = 0
        for delivery in self.deliveries:
            confirmation = delivery.confirmation
            if confirmation is not None and not confirmation.done():
                last_row = first_row + delivery.count
                rejected = sum(1 for row in rejected_rows if first_row <= row < last_row)
                if rejected:
                    fail_waiter(confirmation, RowsRejected(rejected, delivery.count - rejected, quarantine))
                else:
                    confirmation.set_result(delivery.count)
            first_row += delivery.count

    def fail(self, error: BaseException) -> None:
        """Nothing more will happen to these rows in this process: every waiter gets `error`."""
        for delivery in self.deliveries:
            fail_waiter(delivery.confirmation, error)


def fail_waiter(confirmation: asyncio.Future[int] | None, error: BaseException) -> None:
    """Completes a request's confirmation with `error`, unless it is already complete.
    Give it errors made to be set here, never caught ones: a traceback's frames can refer to a
    Delivery, which the collector does not track (`gc=False`), and the cycle would never be freed."""
    if confirmation is not None and not confirmation.done():
        confirmation.set_exception(error)
        # Nobody may be awaiting it any more (the request timed out): not an "unretrieved" error.
        confirmation.exception()


class Stop:
    """Mailbox message: finish what came before, then end `run()`."""

    __slots__ = ()


STOP: Final = Stop()


class RowsRejected(Exception):
    """ClickHouse refused some rows of a request as data; they went to the quarantine."""

    def __init__(self, rejected: int, written: int, destination: str) -> None:
        super().__init__(f"ClickHouse rejected {rejected} of {rejected + written} events; they are in the {destination}")
        self.rejected = rejected
        self.written = written
        self.destination = destination


class Refused(Exception):
    """The intake port could not take a request's rows; answered 503 with Retry-After."""

    def __init__(self, reason: RefusalReason, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.reason: RefusalReason = reason
        self.retry_after = retry_after


class PipelineDown(Exception):
    """An actor has died: whatever still waits on it is answered now (503), not at its timeout."""
