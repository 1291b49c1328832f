"""The Writer actor: takes batches from its mailbox, one at a time, and gets each into ClickHouse.

It does one INSERT per batch (the units: `Inserter` retries, `Splitter` and `Quarantine` deal
with rejected data, `Readiness` keeps the schema and the account of ClickHouse's answers). It
manages no one else's state: it tells its ledger before and after each insert (the spool keeps
its marks, the memory intake releases the reservation), and the batch resolves its own waiters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from clickpulse.messages import STOP, Batch, PipelineDown, Stop
from clickpulse.metrics import WriterMetrics
from clickpulse.ports import Ledger
from clickpulse.writer.errors import backoff_seconds
from clickpulse.writer.quarantine import Quarantine, Splitter
from clickpulse.writer.readiness import Readiness

log = logging.getLogger("clickpulse.writer")

HEALTH_CHECK_SECONDS = 5.0


class Writer:
    """Talk to it through `submit()` and `stop()`."""

    def __init__(
        self,
        *,
        readiness: Readiness,
        splitter: Splitter,
        quarantine: Quarantine,
        ledger: Ledger,
        metrics: WriterMetrics,
        inflight_batches: int = 2,
    ) -> None:
        self.readiness = readiness
        self._splitter = splitter
        self._quarantine = quarantine
        self._ledger = ledger
        self._metrics = metrics
        self._mailbox: asyncio.Queue[Batch | Stop] = asyncio.Queue(maxsize=inflight_batches)
        self._writing: Batch | None = None
        self._pending_events = 0
        self._stop_requested = asyncio.Event()

    # -- messages ---------------------------------------------------------------------------

    async def submit(self, batch: Batch) -> None:
        """Waits while the mailbox is full: that wait is the backpressure."""
        self._change_pending(batch.count)
        self._metrics.inflight_batches.inc({})
        await self._mailbox.put(batch)

    async def stop(self) -> None:
        """Asks `run()` to write every batch already submitted and return."""
        self._stop_requested.set()
        await self._mailbox.put(STOP)

    @property
    def pending_events(self) -> int:
        """Events submitted and not yet confirmed by ClickHouse (or quarantined)."""
        return self._pending_events

    def not_ready_reason(self) -> str | None:
        return self.readiness.not_ready_reason()

    # -- the task ---------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._connect()
            await self._serve_mailbox()
        finally:
            self._fail_waiters()

    async def _serve_mailbox(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns a result that arrives
            # together with a cancellation and swallows the cancellation, so a shutdown that
            # cancels the Writer as a batch arrives would leave it retrying that batch forever.
            try:
                async with asyncio.timeout(HEALTH_CHECK_SECONDS):
                    message = await self._mailbox.get()
            except TimeoutError:
                await self.readiness.health_check()
                continue
            if isinstance(message, Stop):
                return
            self._writing = message
            await self._write(message)
            self._writing = None
            self._metrics.inflight_batches.dec({})

    def abandon(self) -> int:
        """Called when shutdown ran out of time: returns how many submitted events were not
        written. Whether that is a loss is for the supervisor to say (not with a spool)."""
        unwritten = self._pending_events
        self._change_pending(-unwritten)
        self._metrics.inflight_batches.set({}, 0)
        return unwritten

    def _fail_waiters(self) -> None:
        """The task has ended: whatever waits on a batch it will never write is answered now."""
        down = PipelineDown("the writer has stopped")
        if self._writing is not None:
            self._writing.fail(down)
        while not self._mailbox.empty():
            message = self._mailbox.get_nowait()
            if isinstance(message, Batch):
                message.fail(down)

    async def _connect(self) -> None:
        """Retries until the schema exists, or until a stop finds nothing left to write."""
        attempt = 0
        while not self.readiness.schema_ready:
            if self._stop_requested.is_set() and self._pending_events == 0:
                return
            try:
                await self.readiness.ensure_schema()
            except Exception as error:  # noqa: BLE001 - every failure here is retried
                failure = self.readiness.record_failure(error)
                delay = backoff_seconds(attempt)
                (log.error if failure.kind == "auth" else log.warning)(
                    "ClickHouse not ready (%s); retrying in %.1fs", failure.detail, delay
                )
                attempt += 1
                await self._sleep_unless_stopped(delay)

    async def _sleep_unless_stopped(self, delay: float) -> None:
        """A backoff pause that a stop request cuts short (once: after that, pauses are whole)."""
        if self._stop_requested.is_set():
            await asyncio.sleep(delay)
            return
        # Not wait_for: see _serve_mailbox(); stop() wakes this pause as the shutdown may cancel us.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._stop_requested.wait()

    async def _write(self, batch: Batch) -> None:
        body = batch.body()
        self._metrics.batch_bytes.observe({}, len(body))
        try:
            await self._ledger.before_insert(batch)
        except OSError as error:  # the insert still goes ahead; a crash now may replay it differently
            log.warning("spool: cannot record the batch before inserting it: %s", error)
        # The batch in flight at a crash may have been stored before it: on servers without
        # deduplication tokens the Inserter asks which rows landed first.
        rejected = await self._splitter.insert_or_split(body, batch.count, maybe_landed=batch.trigger == "replay")
        where = self._quarantine.describe(await self._quarantine.keep(rejected)) if rejected else ""
        self._metrics.end_to_end_latency.observe({}, asyncio.get_running_loop().time() - batch.oldest_received_at)
        await self._ledger.after_insert(batch)
        batch.resolve([entry.index for entry in rejected], where)
        self._change_pending(-batch.count)

    def _change_pending(self, delta: int) -> None:
        self._pending_events += delta
        self._metrics.pending_events.set({}, self._pending_events)
