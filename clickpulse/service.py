"""Building and supervising the pipeline.

`build_pipeline` makes every part from one Config into a `Pipeline` whose fields are never None:
the ClickHouse connection, the buffering path (the memory intake, or the spool when SPOOL_DIR is
set: the same object is the HTTP layer's intake port and the Writer's ledger), the Writer, the
Batcher and the HTTP application. The supervisor, `Service`, only orders them: it starts
writer → batcher → buffering path → HTTP, stops them in reverse, and decides what an actor's
unexpected death means: everyone still waiting is answered at once (503), and the process exits
non-zero so the orchestrator restarts it, rather than answering 202 while nothing writes.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from aioprometheus import Registry

from clickpulse.batcher import Batcher
from clickpulse.clickhouse import ClickHouseConnection, EmbeddedClickHouse, HttpClickHouse
from clickpulse.config import Config
from clickpulse.http.app import HttpApp
from clickpulse.http.enrich import Enricher
from clickpulse.http.connections import ConnectionGuard, GuardedSite
from clickpulse.http.edge import Edge
from clickpulse.http.keys import KeyStore
from clickpulse.http.origins import OriginPatterns
from clickpulse.http.query_guard import readonly_statement
from clickpulse.http.ratelimit import parse_networks
from clickpulse.http.responses import Rejections
from clickpulse.http.tls import TlsFiles
from clickpulse.intake import MemoryIntake
from clickpulse.memory_limit import MemoryLimit
from clickpulse.messages import Batch, Delivery
from clickpulse.metrics import PipelineMetrics
from clickpulse.ports import BufferingPath
from clickpulse.spool import Spool
from clickpulse.writer import Writer, build_writer

log = logging.getLogger(__name__)

# In-flight HTTP requests only wait for the pipeline to take them (or for their ack), so they
# finish quickly; this bounds how long a slow one can hold up the drain.
HTTP_DRAIN_SECONDS = 5.0
# Spool segments roll at this size (or a quarter of SPOOL_MAX_BYTES, if smaller), so confirmed
# data is deleted segment by segment while an outage is being caught up.
SPOOL_SEGMENT_BYTES = 32 << 20
# How long start() waits for the spool's recovery before it listens anyway.
RECOVERY_WAIT_SECONDS = 1.0

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})

Actor = Callable[[], Coroutine[Any, Any, None]]


class Lifeline:
    """Whether every actor still runs. `down` completes when one has died; whoever waits on the
    pipeline (a request waiting for its confirmation) races against it."""

    def __init__(self) -> None:
        self.down: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.dead_actor: str | None = None

    def actor_died(self, name: str) -> None:
        self.dead_actor = self.dead_actor or name
        if not self.down.done():
            self.down.set_result(None)


@dataclass(frozen=True, slots=True)
class Pipeline:
    config: Config
    metrics: PipelineMetrics
    lifeline: Lifeline
    session: aiohttp.ClientSession
    connection: ClickHouseConnection
    memory: MemoryLimit
    buffering: BufferingPath
    writer: Writer
    batcher: Batcher
    http: HttpApp
    actors: Mapping[str, Actor]  # in start order
    listening: Callable[[str], None]  # told the service's own URL once it listens

    def not_ready_reason(self) -> str | None:
        if self.lifeline.dead_actor is not None:
            return f"{self.lifeline.dead_actor} actor is not running"
        return self.buffering.not_ready_reason() or self.writer.not_ready_reason()


def build_pipeline(config: Config, metrics: PipelineMetrics) -> Pipeline:
    """Every part, wired; nothing started. Call inside the event loop that will run it."""
    # The keys file first: a bad one (KeyFileError, exit 2) must not leave DATA_DIR locked.
    keys = KeyStore(config.ingest_keys_file)
    # First, so that a missing chdb or a busy DATA_DIR stops the start before anything opens.
    embedded = EmbeddedClickHouse(config.data_dir) if config.clickhouse is None else None
    # Every ClickHouse request has its own time limit (CLICKHOUSE_TIMEOUT) in the Writer.
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
    connection: ClickHouseConnection
    if config.clickhouse is None:
        assert embedded is not None
        connection, database = embedded, "default"
    else:
        connection, database = HttpClickHouse(config.clickhouse, session), config.clickhouse.database
    metrics.writer.backend_info.set({"backend": connection.backend}, 1)

    memory = MemoryLimit(config.max_buffer_events, config.max_buffer_bytes)
    metrics.batcher.buffer_capacity_events.set({}, config.max_buffer_events)
    metrics.batcher.buffer_capacity_bytes.set({}, config.max_buffer_bytes)

    def publish_memory() -> None:
        metrics.writer.memory_events.set({}, memory.held)
        metrics.writer.memory_bytes.set({}, memory.held_bytes)

    metrics.on_scrape(publish_memory)

    def to_batcher(message: Delivery | Batch) -> None:
        batcher.put(message)  # bound below: data flows to the Batcher, outcomes back to the path

    buffering: BufferingPath
    actors: dict[str, Actor] = {}
    if config.spool_dir is not None:
        spool = Spool(
            directory=config.spool_dir,
            max_bytes=config.spool_max_bytes,
            segment_bytes=min(SPOOL_SEGMENT_BYTES, max(1, config.spool_max_bytes // 4)),
            memory=memory,
            deliver=to_batcher,
            metrics=metrics.spool,
        )
        metrics.spool.capacity_bytes.set({}, config.spool_max_bytes)
        metrics.on_scrape(spool.publish_metrics)
        buffering = spool
    else:
        buffering = MemoryIntake(memory=memory, to_batcher=to_batcher)
    writer = build_writer(
        connection=connection,
        database=database,
        table=config.clickhouse_table,
        create_table=config.clickhouse_create_table,
        timeout=config.clickhouse_timeout,
        ready_grace=config.clickhouse_down_grace,
        quarantine_directory=config.spool_dir,
        ledger=buffering,
        metrics=metrics.writer,
    )
    batcher = Batcher(
        batch_size=config.batch_size,
        flush_interval=config.flush_interval,
        hand_to_writer=writer.submit,
        metrics=metrics.batcher,
    )
    metrics.on_scrape(batcher.publish_metrics)
    actors["writer"] = writer.run
    actors["batcher"] = batcher.run
    if isinstance(buffering, Spool):
        actors["spool"] = buffering.run

    lifeline = Lifeline()
    query = None
    if embedded is not None:
        # Through the same connection as the Writer's inserts: the embedded store admits one user.
        store, time_limit = embedded, config.query_timeout

        async def query(sql: str, output_format: str) -> str:
            # The server-side limit ends the statement; this one, a little later, the wait for it.
            async with asyncio.timeout(time_limit + 5):
                return await store.query_text(readonly_statement(sql), "default", output_format, time_limit)

    def listening(url: str) -> None:
        if embedded is not None:
            embedded.lock.advertise(url)
        if isinstance(buffering, Spool):
            buffering.advertise(url)

    rejections = Rejections(metrics.receiver)
    edge = Edge(
        keys=keys,
        cors_origins=OriginPatterns.parse(config.cors_origins or ()),
        rate_limit=config.rate_limit_events_per_second,
        rate_burst=config.rate_limit_burst,
        trusted_proxies=parse_networks(",".join(config.trusted_proxies or ())),
        max_body_bytes=config.max_body_bytes,
        max_inflight_body_bytes=config.max_inflight_body_bytes,
        body_timeout=config.body_read_timeout,
        rejections=rejections,
        metrics=metrics.receiver,
    )
    pipeline: Pipeline
    http = HttpApp(
        intake=buffering,
        max_body_bytes=config.max_body_bytes,
        max_batch_events=config.max_batch_events,
        ack_mode=config.ack_mode,
        ack_timeout=config.ack_timeout,
        not_ready_reason=lambda: pipeline.not_ready_reason(),
        pipeline_down=lifeline.down,
        metrics=metrics,
        query=query,
        edge=edge,
        rejections=rejections,
        keepalive_timeout=config.keepalive_timeout,
        enricher=Enricher(config.enrich_ip),
        segment_max_message_bytes=config.segment_max_message_bytes,
        segment_max_batch_bytes=config.segment_max_batch_bytes,
        access_log=config.access_log,
    )
    pipeline = Pipeline(
        config=config,
        metrics=metrics,
        lifeline=lifeline,
        session=session,
        connection=connection,
        memory=memory,
        buffering=buffering,
        writer=writer,
        batcher=batcher,
        http=http,
        actors=actors,
        listening=listening,
    )
    return pipeline


def local_address(http_host: str) -> str:
    """How a process on this machine reaches a service listening on HTTP_HOST, for URLs."""
    if http_host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if http_host == "::":  # IPv6 only: asyncio sets IPV6_V6ONLY, so 127.0.0.1 would not answer
        return "[::1]"
    return f"[{http_host}]" if ":" in http_host else http_host


class Service:
    """The supervisor. Build inside the event loop that runs it; then `start()` and `stop()`."""

    def __init__(self, config: Config, registry: Registry | None = None) -> None:
        self.config = config
        # TLS first: a bad certificate is a ConfigError (exit 2) before anything opens.
        self._tls = (
            TlsFiles(config.tls_cert_file, config.tls_key_file)
            if config.tls_cert_file is not None and config.tls_key_file is not None else None
        )
        self.metrics = PipelineMetrics(registry)
        self.pipeline = build_pipeline(config, self.metrics)
        self.failed = asyncio.Event()
        self.port = 0  # the real port once started (HTTP_PORT=0 picks a free one)
        self.stopping = False
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._opening: asyncio.Task[None] | None = None  # held so the recovery task is not collected
        # aiohttp waits up to shutdown_timeout for a handler to finish, then as long again once it
        # is cancelled: the HTTP drain takes at most half of SHUTDOWN_TIMEOUT, inside its deadline.
        http_drain = min(HTTP_DRAIN_SECONDS, config.shutdown_timeout / 4)
        http = self.pipeline.http
        self.admin_port: int | None = None
        self._runner = web.AppRunner(
            http.build(operational=config.admin_port is None), handle_signals=False, shutdown_timeout=http_drain,
            **http.server_options(),
        )
        self._admin_runner = (
            web.AppRunner(
                http.build_admin(), handle_signals=False, shutdown_timeout=http_drain, **http.admin_server_options(),
            )
            if config.admin_port is not None else None
        )

    async def start(self) -> None:
        pipeline, config = self.pipeline, self.config
        try:
            # Recovery runs off the event loop. A short one is over before HTTP listens; a long
            # one goes on while HTTP already answers (/healthz live, /readyz not ready, intake 503),
            # and the spool's own task waits for it.
            self._opening = opening = asyncio.create_task(pipeline.buffering.open())
            await asyncio.wait({opening}, timeout=RECOVERY_WAIT_SECONDS)
            if opening.done():
                opening.result()  # SpoolDirInUse: another process holds SPOOL_DIR (exit 2)
            for name, run in pipeline.actors.items():
                self._start_actor(name, run())
            await self._runner.setup()
            guard = ConnectionGuard(
                max_connections=config.max_connections, head_timeout=config.head_read_timeout,
                rejections=pipeline.http.rejections,
            )
            await GuardedSite(
                self._runner, config.http_host, config.http_port, guard=guard,
                ssl_context=self._tls.context if self._tls is not None else None,
            ).start()
            if self._admin_runner is not None:
                assert config.admin_port is not None
                await self._admin_runner.setup()
                await web.TCPSite(self._admin_runner, config.admin_host, config.admin_port).start()
                self.admin_port = self._admin_runner.addresses[0][1]
        except BaseException:
            # The port is taken, say: nothing may be left open behind the error.
            await self._close_after_failed_start()
            raise
        self.port = self._runner.addresses[0][1]
        scheme = "https" if self._tls is not None else "http"
        if self.admin_port is not None:  # where `python -m clickpulse query` finds /query
            pipeline.listening(f"http://{local_address(config.admin_host)}:{self.admin_port}")
        else:
            pipeline.listening(f"{scheme}://{local_address(config.http_host)}:{self.port}")
        log.info(
            "clickpulse listening on %s://%s:%d%s, writing to %s, table %s; ack mode %s, %s",
            scheme, config.http_host, self.port,
            f" (operational routes on http://{config.admin_host}:{self.admin_port})" if self.admin_port else "",
            pipeline.connection.description, config.clickhouse_table, config.ack_mode,
            f"spool in {config.spool_dir}" if config.spool_dir else "no spool (events are held in memory only)",
        )

        if not self.pipeline.http.edge.keys.configured and config.http_host not in LOOPBACK_HOSTS:
            log.warning(
                "no INGEST_KEYS_FILE: anyone who can reach %s:%d can write events; "
                "set INGEST_KEYS_FILE (see README, Security) or listen on 127.0.0.1",
                config.http_host, self.port,
            )

    def reload(self) -> None:
        """SIGHUP: the ingest keys file and the TLS files again; bad ones keep what is in use."""
        self.pipeline.http.edge.reload()
        if self._tls is not None:
            self._tls.reload()

    def not_ready_reason(self) -> str | None:
        return self.pipeline.not_ready_reason()

    async def _close_after_failed_start(self) -> None:
        self.stopping = True
        self.abort()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        await self._runner.cleanup()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        pipeline = self.pipeline
        await self._recovery_ended()
        await pipeline.buffering.close()
        await pipeline.connection.close()
        await pipeline.session.close()

    async def stop(self) -> int:
        """Drains within SHUTDOWN_TIMEOUT; returns how many acknowledged events are lost (with a
        spool: none, whatever ClickHouse did not confirm is replayed at the next start)."""
        self.stopping = True
        pipeline = self.pipeline
        deadline = asyncio.get_running_loop().time() + self.config.shutdown_timeout
        pipeline.http.stop_intake()
        await self._runner.cleanup()  # stops listening, waits for in-flight requests
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        pipeline.buffering.stop_forwarding()
        for name, stop in (("batcher", pipeline.batcher.stop), ("writer", pipeline.writer.stop)):
            task = self._tasks[name]
            if task.done():  # crashed or cancelled already: nothing to drain
                continue
            try:
                async with asyncio.timeout_at(deadline):
                    await stop()
                    await asyncio.shield(task)
            except TimeoutError:
                log.error("%s did not finish within SHUTDOWN_TIMEOUT=%ss", name, self.config.shutdown_timeout)
            except Exception:  # noqa: BLE001 - already logged by the task's callback
                pass
        self.abort()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        lost = self._count_unwritten()
        await self._recovery_ended()
        await pipeline.buffering.close()
        if pipeline.buffering.keeps_unwritten and pipeline.buffering.unconfirmed_events:
            log.warning(
                "shutdown: %d unconfirmed events stay in the spool for the next start",
                pipeline.buffering.unconfirmed_events,
            )
        elif lost:
            log.error("shutdown: %d acknowledged events were NOT written to ClickHouse", lost)
        else:
            log.info("shutdown: every acknowledged event was written")
        await pipeline.connection.close()
        await pipeline.session.close()
        return lost

    async def _recovery_ended(self) -> None:
        """A recovery still reading in its thread must end before the files are closed."""
        if self._opening is not None:
            await asyncio.gather(self._opening, return_exceptions=True)

    def abort(self) -> None:
        """Cancels every actor task (a drain that ran out of time, or a test that must end)."""
        for task in self._tasks.values():
            task.cancel()

    def _count_unwritten(self) -> int:
        """Events accepted and never written; with a spool they are kept, so none is lost."""
        pipeline = self.pipeline
        unwritten_by_writer = pipeline.writer.abandon()
        held_by_batcher = pipeline.batcher.held_events
        if pipeline.buffering.keeps_unwritten:
            return 0
        lost = unwritten_by_writer + held_by_batcher
        if lost:
            self.metrics.writer.events_dropped.add({"reason": "shutdown"}, lost)
        return lost

    def _start_actor(self, name: str, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine, name=f"clickpulse-{name}")
        task.add_done_callback(lambda finished: self._actor_ended(name, finished))
        self._tasks[name] = task

    def _actor_ended(self, name: str, task: asyncio.Task[None]) -> None:
        if self.stopping:
            return
        if task.cancelled():
            log.error("%s actor was cancelled unexpectedly", name)
        elif task.exception() is not None:
            log.error("%s actor crashed", name, exc_info=task.exception())
        else:
            log.error("%s actor returned unexpectedly", name)
        self.pipeline.lifeline.actor_died(name)
        self.failed.set()


async def serve(config: Config) -> int:
    """Runs until SIGTERM/SIGINT or an actor failure; returns the process exit status."""
    service = Service(config)
    await service.start()
    # What exists now (modules, the app, the pipeline) lives as long as the process: out of the
    # collector's sight, a full collection no longer walks it. Measured under wrk: the collector
    # took ~2 µs of every single-event request, against none in a bare aiohttp handler.
    gc.freeze()
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    loop.add_signal_handler(signal.SIGHUP, service.reload)
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
