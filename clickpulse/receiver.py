"""The receiver: aiohttp routes. It decodes and validates, encodes the request's events once
into JSONEachRow lines, then hands them on as one message: to the Spool when there is one, else
straight to the Batcher's mailbox. It keeps no buffer of its own.

When it answers depends on the acknowledgement mode (ACK_MODE, or `?ack=` per request):
`memory` once the events are in the pipeline, `disk` once they are fsynced in the spool,
`clickhouse` (also `?wait=true`) once ClickHouse confirmed the insert.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import hdrs, web

from clickpulse.events import EventDecoder, RowEncoder
from clickpulse.memory_limit import MemoryLimit
from clickpulse.messages import Delivery, RowsRejected
from clickpulse.metrics import PipelineMetrics
from clickpulse.spool import Spool, SpoolUnavailable

log = logging.getLogger(__name__)

JSON_TYPES = frozenset({"application/json", "text/plain"})  # text/plain: navigator.sendBeacon
NDJSON_TYPES = frozenset({"application/x-ndjson", "application/ndjson"})
METHOD_LABELS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
REJECT_REASONS = ("invalid", "too_large", "unsupported_type", "overloaded", "shutting_down")
ACK_MODES = ("memory", "disk", "clickhouse")
LOOPBACK_ADDRESSES = frozenset({"127.0.0.1", "::1"})
READ_ONLY_STATEMENTS = frozenset({"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXISTS", "EXPLAIN"})

# How long a request may wait for room under MAX_BUFFER_EVENTS before it is answered 503.
ENQUEUE_WAIT_SECONDS = 1.0
RETRY_AFTER_OVERLOADED = "1"
RETRY_AFTER_SHUTTING_DOWN = "5"

_ACCEPTED_ONE = msgspec.json.encode({"status": "accepted"})


def json_response(status: int, payload: object, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=msgspec.json.encode(payload), content_type="application/json", headers=headers
    )


class Receiver:
    def __init__(
        self,
        *,
        max_body_bytes: int,
        max_batch_events: int,
        ack_mode: str,
        ack_timeout: float,
        memory: MemoryLimit,
        to_batcher: Callable[[Delivery], None],
        spool: Spool | None,
        not_ready_reason: Callable[[], str | None],
        metrics: PipelineMetrics,
        query: Callable[[str], Awaitable[str]] | None = None,
    ) -> None:
        self._max_body_bytes = max_body_bytes
        self._max_batch_events = max_batch_events
        self._ack_mode = ack_mode
        self._ack_timeout = ack_timeout
        self._memory = memory
        self._to_batcher = to_batcher
        self._spool = spool
        self._not_ready_reason = not_ready_reason
        self._query = query
        self._metrics = metrics
        self._decoder = EventDecoder()
        self._encoder = RowEncoder()
        self._draining = False
        for reason in REJECT_REASONS:  # a series from the start, so rate() sees the first rejection
            metrics.receiver.requests_rejected.add({"reason": reason}, 0)

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=self._max_body_bytes, middlewares=[self._observe])
        app.router.add_post("/events", self.post_events)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        if self._query is not None:
            app.router.add_post("/query", self.run_query)
        return app

    def stop_intake(self) -> None:
        """From now on POST /events answers 503 and /readyz reports shutting down."""
        self._draining = True

    # -- handlers ---------------------------------------------------------------------------

    async def post_events(self, request: web.Request) -> web.Response:
        if self._draining:
            return self._reject(
                "shutting_down", 503, "clickpulse is shutting down; retry on another instance",
                {hdrs.RETRY_AFTER: RETRY_AFTER_SHUTTING_DOWN},
            )
        ack_mode = self._ack_mode_of(request)
        if ack_mode is None:
            return self._reject("invalid", 400, f"unknown ack mode; use ack={', '.join(ACK_MODES)} or wait=true")
        if ack_mode == "disk" and self._spool is None:
            return self._reject("invalid", 400, "ack=disk needs a spool: start clickpulse with SPOOL_DIR")
        is_ndjson = False
        if hdrs.CONTENT_TYPE in request.headers:
            content_type = request.content_type
            is_ndjson = content_type in NDJSON_TYPES
            if not is_ndjson and content_type not in JSON_TYPES:
                return self._reject(
                    "unsupported_type", 415,
                    f"unsupported Content-Type {content_type!r}; send application/json, "
                    "application/x-ndjson or text/plain",
                )
        if request.content_length is not None and request.content_length > self._max_body_bytes:
            return self._too_large_body()
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._too_large_body()
        except web.RequestPayloadError as error:  # e.g. Content-Encoding: gzip on a body that is not
            cause = getattr(error.__cause__, "message", None) or str(error.__cause__ or error)
            return self._reject("invalid", 400, f"cannot read the request body: {' '.join(str(cause).split())}")
        self._metrics.receiver.request_body_bytes.observe({}, len(body))
        if not body.strip():
            return self._reject("invalid", 400, "empty body: send a JSON object, a JSON array or NDJSON lines")
        try:
            if is_ndjson:
                events, is_batch = self._decoder.decode_ndjson(body), True
            else:
                events, is_batch = self._decoder.decode_json(body)
        except msgspec.DecodeError as error:
            return self._reject("invalid", 400, str(error))
        count = len(events)
        if count > self._max_batch_events:
            return self._reject(
                "too_large", 413,
                f"{count} events in one request; the limit is {self._max_batch_events} (MAX_BATCH_EVENTS)",
            )
        if not count:
            return json_response(202, {"status": "accepted", "accepted": 0})
        confirmation = asyncio.get_running_loop().create_future() if ack_mode == "clickhouse" else None
        refusal = await self._hand_on(self._encoder.encode(events), count, ack_mode, confirmation)
        if refusal is not None:
            return self._reject("overloaded", 503, refusal, {hdrs.RETRY_AFTER: RETRY_AFTER_OVERLOADED})
        self._metrics.receiver.events_received.add({}, count)
        self._metrics.receiver.events_per_request.observe({}, count)
        if confirmation is not None:
            return await self._await_confirmation(confirmation, is_batch)
        if is_batch:
            return json_response(202, {"status": "accepted", "accepted": count})
        return web.Response(status=202, body=_ACCEPTED_ONE, content_type="application/json")

    async def _hand_on(
        self, rows: bytes, count: int, ack_mode: str, confirmation: asyncio.Future[int] | None
    ) -> str | None:
        """Gives the rows to the pipeline; returns why it could not take them, else None."""
        received_at = asyncio.get_running_loop().time()
        if self._spool is not None:
            try:
                await self._spool.append(
                    rows, count, received_at, durable=ack_mode != "memory", confirmation=confirmation
                )
            except SpoolUnavailable as error:
                return str(error)
            return None
        if not self._memory.try_reserve(count) and not await self._memory.reserve(count, ENQUEUE_WAIT_SECONDS):
            return "the pipeline is full (MAX_BUFFER_EVENTS); retry later"
        self._to_batcher(Delivery(rows, count, received_at, None, confirmation))
        return None

    async def _await_confirmation(self, confirmation: asyncio.Future[int], is_batch: bool) -> web.Response:
        try:
            async with asyncio.timeout(self._ack_timeout):
                written = await asyncio.shield(confirmation)
        except TimeoutError:
            return json_response(504, {
                "error": f"accepted, but ClickHouse has not confirmed it within ACK_TIMEOUT={self._ack_timeout:g}s; "
                "the events are still queued and will be written",
            })
        except RowsRejected as rejection:
            return json_response(422, {
                "error": str(rejection), "rejected": rejection.rejected, "written": rejection.written,
            })
        if is_batch:
            return json_response(200, {"status": "written", "written": written})
        return json_response(200, {"status": "written"})

    def _ack_mode_of(self, request: web.Request) -> str | None:
        """The request's acknowledgement mode, or None when its query asks for an unknown one."""
        if not request.query_string:  # the common case, without parsing a query
            return self._ack_mode
        query = request.query
        if query.get("wait", "").lower() in ("true", "1", "yes"):
            return "clickhouse"
        mode = query.get("ack", self._ack_mode).lower()
        return mode if mode in ACK_MODES else None

    async def run_query(self, request: web.Request) -> web.Response:
        """Only with the embedded store, only from this machine, only statements that read: how
        `python -m clickpulse query` reaches a store that the running service holds open."""
        assert self._query is not None
        if request.remote not in LOOPBACK_ADDRESSES:
            return json_response(403, {"error": "queries are answered only from this machine"})
        sql = (await request.text()).strip()
        first_word = sql.split(None, 1)[0].upper() if sql else ""
        if first_word not in READ_ONLY_STATEMENTS:
            return json_response(400, {
                "error": f"only statements that read: {', '.join(sorted(READ_ONLY_STATEMENTS))}",
            })
        try:
            text = await self._query(sql)
        except Exception as error:  # noqa: BLE001 - ClickHouse's own message is the answer
            return json_response(400, {"error": str(error).strip().splitlines()[0] if str(error).strip() else repr(error)})
        return web.Response(text=text, content_type="text/plain")

    async def healthz(self, request: web.Request) -> web.Response:
        return json_response(200, {"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        reason = "shutting down" if self._draining else self._not_ready_reason()
        if reason:
            return json_response(503, {"status": "not ready", "reason": reason})
        return json_response(200, {"status": "ready"})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self._metrics.render(), headers={hdrs.CONTENT_TYPE: self._metrics.content_type})

    # -- helpers ----------------------------------------------------------------------------

    def _too_large_body(self) -> web.Response:
        return self._reject(
            "too_large", 413, f"request body larger than {self._max_body_bytes} bytes (MAX_BODY_BYTES)"
        )

    def _reject(self, reason: str, status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
        self._metrics.receiver.requests_rejected.inc({"reason": reason})
        return json_response(status, {"error": message}, headers)

    @web.middleware
    async def _observe(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        """Counts and times every request by route template, and answers HTTP errors in JSON."""
        started = time.perf_counter()
        try:
            response = await handler(request)
        except web.HTTPException as error:
            headers = {name: value for name, value in error.headers.items() if name == hdrs.ALLOW}
            message = error.reason if error.status != 404 else f"no route for {request.path}"
            response = json_response(error.status, {"error": message}, headers)
        except Exception:
            log.exception("unexpected error while serving %s %s", request.method, request.path)
            response = json_response(500, {"error": "internal error; see the clickpulse log"})
        resource = request.match_info.route.resource
        labels = {
            "method": request.method if request.method in METHOD_LABELS else "other",
            "path": resource.canonical if resource is not None else "unmatched",
        }
        self._metrics.receiver.http_request_duration.observe(labels, time.perf_counter() - started)
        labels["status"] = str(response.status)
        self._metrics.receiver.http_requests.inc(labels)
        return response
