"""Did an attempt land? Exactly-once retries on servers without insert deduplication.

ClickHouse before 22.2 has no `insert_deduplication_token` for plain MergeTree tables, and an
INSERT whose answer was lost (a time-out while the server stalled, a connection reset after the
body was sent) may still be executed: each blind retry of it stored the batch once more. So
before a batch whose previous attempt may have reached the server is sent again, this finds out
what of it landed: it waits until that attempt no longer runs (system.processes, by the
attempt's query_id), then asks which of the batch's event ids the table holds (within the
batch's time range, so ClickHouse reads only the partitions and granules they can be in), and
the retry sends only the rows still missing.

It costs nothing on the path without failures: it runs only before re-sending after an
ambiguous failure, and for a batch replayed from the spool that was in flight at a crash.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

import msgspec

from clickpulse.clickhouse import ClickHouseConnection
from clickpulse.schema import quote_identifier, quote_string

# Ids per lookup query: 36 characters and quotes each, well under max_query_size (256 KiB).
IDS_PER_QUERY = 2000
RUNNING_POLL_SECONDS = 0.2
# A server that resumes after a stall takes the connections queued meanwhile in order, so an old
# attempt may start a moment after the server first answers again: "not running" must hold twice,
# this far apart, before the table is asked.
SETTLE_SECONDS = 0.5


class RowKey(msgspec.Struct, gc=False):
    """What a JSONEachRow line says about its identity (the encoder always writes both)."""

    event_id: str
    created_at: str


@dataclass(frozen=True, slots=True)
class Remaining:
    body: bytes
    count: int
    indices: list[int]  # of the rows still missing, in the body asked about


_decode_key = msgspec.json.Decoder(RowKey).decode


class LandedCheck:
    def __init__(
        self,
        *,
        connection: ClickHouseConnection,
        database: str,
        table: str,
        timeout: float,
        pause: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._connection = connection
        self._table = f"{quote_identifier(database)}.{quote_identifier(table)}"
        self._timeout = timeout
        self._pause = pause

    async def remaining(self, body: bytes, count: int, previous_query_ids: list[str]) -> Remaining:
        """The rows of `body` that the table does not hold, once none of the earlier attempts
        runs any more. Raises what ClickHouse raises (the caller retries the whole check, as it
        would the insert)."""
        if previous_query_ids:
            await self._wait_until_finished(previous_query_ids)
        lines = body.split(b"\n")[:count]
        keys = [_decode_key(line) for line in lines]
        present = await self._present_ids(keys)
        if not present:
            return Remaining(body, count, list(range(count)))
        indices = [index for index, key in enumerate(keys) if key.event_id not in present]
        return Remaining(b"".join(lines[index] + b"\n" for index in indices), len(indices), indices)

    async def _wait_until_finished(self, query_ids: list[str]) -> None:
        listed = ", ".join(quote_string(query_id) for query_id in query_ids)
        sql = f"SELECT count() FROM system.processes WHERE query_id IN ({listed})"
        quiet = 0
        while quiet < 2:
            async with asyncio.timeout(self._timeout):
                running = int(await self._connection.query_value(sql))
            quiet = 0 if running else quiet + 1
            if quiet < 2:
                await self._pause(SETTLE_SECONDS if quiet else RUNNING_POLL_SECONDS)

    async def _present_ids(self, keys: list[RowKey]) -> set[str]:
        seconds = [int(datetime.fromisoformat(key.created_at).timestamp()) for key in keys]
        earliest, latest = min(seconds), max(seconds) + 1
        present: set[str] = set()
        for start in range(0, len(keys), IDS_PER_QUERY):
            ids = ", ".join(quote_string(key.event_id) for key in keys[start : start + IDS_PER_QUERY])
            sql = (
                f"SELECT arrayStringConcat(groupArray(toString(event_id)), ',') FROM {self._table} "
                f"WHERE created_at >= toDateTime({earliest}) AND created_at <= toDateTime({latest}) "
                f"AND toString(event_id) IN ({ids})"
            )
            async with asyncio.timeout(self._timeout):
                found = (await self._connection.query_value(sql)).strip()
            present.update(found.split(",") if found else ())
        return present
