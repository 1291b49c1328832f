"""The supervisor: builds the actors from one Config, starts them writer → batcher → spool →
receiver, stops them in reverse, and decides what an actor's unexpected death means (the process
exits non-zero so the orchestrator restarts it, rather than answering 202 while nothing writes).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

import aiohttp
from aiohttp import web
from aioprometheus import Registry

from clickpulse.batcher import Batcher
from clickpulse.clickhouse import ClickHouseConnection, EmbeddedClickHouse, HttpClickHouse
from clickpulse.config import Config
from clickpulse.memory_limit import MemoryLimit
from clickpulse.messages import Batch, Delivery
from clickpulse.metrics import PipelineMetrics
from clickpulse.receiver import Receiver
from clickpulse.spool import Spool
from clickpulse.writer import Writer

log = logging.getLogger(__name__)

# In-flight HTTP requests only wait for the pipeline to take them (or for their ack), so they
# finish quickly; this bounds how long a slow one can hold up the drain.
HTTP_DRAIN_SECONDS = 5.0
# Spool segments roll at this size (or a quarter of SPOOL_MAX_BYTES, if smaller), so confirmed
# data is deleted segment by segment while an outage is being caught up.
SPOOL_SEGMENT_BYTES = 32 << 20
NEARLY_FULL = 0.9


class Service:
    def __init__(self, config: Config, registry: Registry | None = None) -> None:
        self.config = config
        self.metrics = PipelineMetrics(registry)
        self.failed = asyncio.Event()
        self.port: int | None = None
        self._stopping = False
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.connection: ClickHouseConnection | None = None
        self.memory: MemoryLimit | None = None
        self.spool: Spool | None = None
        self.writer: Writer | None = None
        self.batcher: Batcher | None = None
        self.receiver: Receiver | None = None

    async def start(self) -> None:
        config = self.config
        self.memory = MemoryLimit(config.max_buffer_events)
        memory, memory_gauge = self.memory, self.metrics.writer.memory_events
        self.metrics.on_scrape(lambda: memory_gauge.set({}, memory.held))
        self.metrics.batcher.buffer_capacity_events.set({}, config.max_buffer_events)
        if config.spool_dir is not None:
            self.spool = Spool(
                directory=config.spool_dir,
                max_bytes=config.spool_max_bytes,
                segment_bytes=min(SPOOL_SEGMENT_BYTES, max(1, config.spool_max_bytes // 4)),
                memory=self.memory,
                deliver=self._deliver_to_batcher,
                metrics=self.metrics.spool,
            )
            self.metrics.spool.capacity_bytes.set({}, config.spool_max_bytes)
            self.metrics.on_scrape(self.spool.publish_metrics)
        # First, so that a missing chdb or a busy DATA_DIR stops the start before anything opens.
        embedded = EmbeddedClickHouse(config.data_dir) if config.clickhouse is None else None
        # Every ClickHouse request has its own time limit (CLICKHOUSE_TIMEOUT) in the Writer.
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        if config.clickhouse is None:
            self.connection, database = embedded, "default"
        else:
            self.connection = HttpClickHouse(config.clickhouse, self._session)
            database = config.clickhouse.database
        self.writer = Writer(
            connection=self.connection,
            database=database,
            table=config.clickhouse_table,
            create_table=config.clickhouse_create_table,
            timeout=config.clickhouse_timeout,
            metrics=self.metrics.writer,
            memory=self.memory,
            spool=self.spool,
            quarantine_directory=config.spool_dir,
            ready_grace=config.clickhouse_down_grace,
        )
        self.batcher = Batcher(
            batch_size=config.batch_size,
            flush_interval=config.flush_interval,
            hand_to_writer=self.writer.submit,
            metrics=self.metrics.batcher,
        )
        recovered = self.spool.open() if self.spool is not None else None
        self._start_actor("writer", self.writer.run())
        if recovered is not None:
            await self.writer.submit(recovered)  # the batch in flight at a crash goes first
        self._start_actor("batcher", self.batcher.run())
        if self.spool is not None:
            self._start_actor("spool", self.spool.run())
        self.receiver = Receiver(
            max_body_bytes=config.max_body_bytes,
            max_batch_events=config.max_batch_events,
            ack_mode=config.ack_mode,
            ack_timeout=config.ack_timeout,
            memory=self.memory,
            to_batcher=self._deliver_to_batcher,
            spool=self.spool,
            not_ready_reason=self.not_ready_reason,
            metrics=self.metrics,
            query=self.writer.query if embedded is not None else None,
        )
        # aiohttp waits up to shutdown_timeout for a handler to finish, then as long again once it
        # is cancelled: the HTTP drain takes at most half of SHUTDOWN_TIMEOUT, inside its deadline.
        http_drain = min(HTTP_DRAIN_SECONDS, config.shutdown_timeout / 4)
        self._runner = web.AppRunner(
            self.receiver.build_app(), access_log=None, handle_signals=False, shutdown_timeout=http_drain
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, config.http_host, config.http_port)
        await site.start()
        self.port = self._runner.addresses[0][1]  # the real port when HTTP_PORT=0
        if embedded is not None:
            local_host = "127.0.0.1" if config.http_host in ("0.0.0.0", "::", "") else config.http_host
            embedded.lock.advertise(f"http://{local_host}:{self.port}")
        log.info(
            "clickpulse listening on http://%s:%d, writing to %s, table %s; ack mode %s, %s",
            config.http_host, self.port, self.connection.description, config.clickhouse_table, config.ack_mode,
            f"spool in {config.spool_dir}" if config.spool_dir else "no spool (events are held in memory only)",
        )

    def _deliver_to_batcher(self, delivery: Delivery | Batch) -> None:
        assert self.batcher is not None
        self.batcher.put(delivery)

    def not_ready_reason(self) -> str | None:
        for name, task in self._tasks.items():
            if task.done():
                return f"{name} actor is not running"
        assert self.writer is not None and self.memory is not None
        if self.spool is not None:
            reason = self.spool.not_ready_reason()
            if reason:
                return reason
        elif self.memory.fill_ratio >= NEARLY_FULL:
            return f"buffer {self.memory.fill_ratio:.0%} full (MAX_BUFFER_EVENTS={self.memory.capacity_events})"
        return self.writer.not_ready_reason()

    async def stop(self) -> int:
        """Drains within SHUTDOWN_TIMEOUT; returns how many acknowledged events are lost (with a
        spool: none, whatever ClickHouse did not confirm is replayed at the next start)."""
        self._stopping = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.shutdown_timeout
        assert self.receiver and self.batcher and self.writer and self._runner and self._session
        self.receiver.stop_intake()
        await self._runner.cleanup()  # stops listening, waits for in-flight requests
        if self.spool is not None:
            self.spool.stop_forwarding()
        for name, stop in (("batcher", self.batcher.stop), ("writer", self.writer.stop)):
            task = self._tasks[name]
            try:
                async with asyncio.timeout_at(deadline):
                    if not task.done():
                        await stop()
                    await asyncio.shield(task)
            except TimeoutError:
                log.error("%s did not finish within SHUTDOWN_TIMEOUT=%ss", name, self.config.shutdown_timeout)
            except Exception:  # noqa: BLE001 - already logged by the task's callback
                pass
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        # Without a spool, what the Batcher still holds is lost too, and counted like the Writer's.
        held_by_batcher = 0 if self.spool is not None else self.batcher.held_events
        if held_by_batcher:
            self.metrics.writer.events_dropped.add({"reason": "shutdown"}, held_by_batcher)
        lost = self.writer.abandon() + held_by_batcher
        if self.spool is not None:
            self.spool.close()
            unconfirmed = self.spool.unconfirmed_events
            if unconfirmed:
                log.warning("shutdown: %d unconfirmed events stay in the spool for the next start", unconfirmed)
            else:
                log.info("shutdown: every acknowledged event was written")
        elif lost:
            log.error("shutdown: %d acknowledged events were NOT written to ClickHouse", lost)
        else:
            log.info("shutdown: every acknowledged event was written")
        await self.connection.close()
        await self._session.close()
        return lost

    def _start_actor(self, name: str, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine, name=f"clickpulse-{name}")
        task.add_done_callback(lambda finished: self._actor_ended(name, finished))
        self._tasks[name] = task

    def _actor_ended(self, name: str, task: asyncio.Task[None]) -> None:
        if self._stopping:
            return
        if task.cancelled():
            log.error("%s actor was cancelled unexpectedly", name)
        elif task.exception() is not None:
            log.error("%s actor crashed", name, exc_info=task.exception())
        else:
            log.error("%s actor returned unexpectedly", name)
        self.failed.set()


async def serve(config: Config) -> int:
    """Runs until SIGTERM/SIGINT or an actor failure; returns the process exit status."""
    service = Service(config)
    await service.start()
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    waiters = [asyncio.create_task(stop_requested.wait()), asyncio.create_task(service.failed.wait())]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for waiter in waiters:
        waiter.cancel()
    if stop_requested.is_set():
        log.info("signal received: draining (SHUTDOWN_TIMEOUT=%ss)", config.shutdown_timeout)
    lost = await service.stop()
    if service.failed.is_set():
        return 1
    return 1 if lost else 0
