"""The typed messages actors pass to each other."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True, order=True)
class SpoolPosition:
    """Where a record starts in the spool: segment number, then byte offset. Orders like the log."""

    segment: int
    offset: int


@dataclass(slots=True)
class Delivery:
    """One request's events, already encoded as JSONEachRow lines. A batch never splits one."""

    rows: bytes
    count: int
    received_at: float  # event-loop clock, for flush deadlines and freshness
    position: SpoolPosition | None = None  # None when there is no spool
    # Completed by the Writer with the number of rows written, for ?ack=clickhouse requests.
    confirmation: asyncio.Future[int] | None = None


@dataclass(slots=True)
class Batch:
    """Whole deliveries flushed together: one INSERT (or, on rejection, a few smaller ones)."""

    deliveries: list[Delivery]
    trigger: str
    count: int = field(default=0)

    def __post_init__(self) -> None:
        if not self.count:
            self.count = sum(delivery.count for delivery in self.deliveries)

    @property
    def oldest_received_at(self) -> float:
        return self.deliveries[0].received_at

    @property
    def first_position(self) -> SpoolPosition | None:
        return self.deliveries[0].position

    @property
    def last_position(self) -> SpoolPosition | None:
        return self.deliveries[-1].position


class RowsRejected(Exception):
    """ClickHouse refused some rows of a request as data; they went to the quarantine."""

    def __init__(self, rejected: int, written: int, destination: str) -> None:
        super().__init__(f"ClickHouse rejected {rejected} of {rejected + written} events; they are in the {destination}")
        self.rejected = rejected
        self.written = written
        self.destination = destination
