"""The receiver: aiohttp routes. It decodes and validates, then hands each request's events to
the Batcher's mailbox as one message. It keeps no buffer of its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import hdrs, web

from clickpulse.events import Event, EventDecoder
from clickpulse.metrics import PipelineMetrics

log = logging.getLogger(__name__)

JSON_TYPES = frozenset({"application/json", "text/plain"})  # text/plain: navigator.sendBeacon
NDJSON_TYPES = frozenset({"application/x-ndjson", "application/ndjson"})
METHOD_LABELS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
REJECT_REASONS = ("invalid", "too_large", "unsupported_type", "overloaded", "shutting_down")

# How long a request may wait for room in a full Batcher mailbox before it is answered 503.
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
        submit: Callable[[list[Event], float, float], Awaitable[bool]],
        not_ready_reason: Callable[[], str | None],
        metrics: PipelineMetrics,
    ) -> None:
        self._max_body_bytes = max_body_bytes
        self._max_batch_events = max_batch_events
        self._submit = submit
        self._not_ready_reason = not_ready_reason
        self._metrics = metrics
        self._decoder = EventDecoder()
        self._draining = False

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=self._max_body_bytes, middlewares=[self._observe])
        app.router.add_post("/events", self.post_events)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
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
        if count and not await self._submit(events, asyncio.get_running_loop().time(), ENQUEUE_WAIT_SECONDS):
            return self._reject(
                "overloaded", 503, "the pipeline is full; retry later",
                {hdrs.RETRY_AFTER: RETRY_AFTER_OVERLOADED},
            )
        self._metrics.receiver.events_received.add({}, count)
        if is_batch:
            return json_response(202, {"status": "accepted", "accepted": count})
        return web.Response(status=202, body=_ACCEPTED_ONE, content_type="application/json")

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
