"""POST /events: bytes → validated events → JSONEachRow rows, once per request, handed to the
intake port as one piece. It keeps no buffer of its own.

When it answers depends on the acknowledgement mode (ACK_MODE, or `?ack=` per request):
`memory` once the events are in the pipeline, `disk` once they are fsynced in the spool,
`clickhouse` (also `?wait=true`) once ClickHouse confirmed the insert.
"""

from __future__ import annotations

import asyncio

import msgspec
from aiohttp import hdrs, web
from msgspec import UNSET, Raw

from clickpulse.events import EventDecoder, RowEncoder, RowStamp
from clickpulse.http.adapter import AdapterWiring
from clickpulse.http.edge import OPEN, Admission
from clickpulse.http.responses import JSON_HEADERS, json_response
from clickpulse.messages import ACK_MODES, AckMode, PipelineDown, Refused, RowsRejected

JSON_TYPES = frozenset({"application/json", "text/plain"})  # text/plain: navigator.sendBeacon
NDJSON_TYPES = frozenset({"application/x-ndjson", "application/ndjson"})
RETRY_AFTER_SHUTTING_DOWN = 5
RETRY_AFTER_PIPELINE_DOWN = 5

_ACCEPTED_ONE = msgspec.json.encode({"status": "accepted"})


class EventsEndpoint:
    def __init__(self, wiring: AdapterWiring, *, max_body_bytes: int) -> None:
        # Read on every request: attributes of their own rather than through `wiring`.
        self._enricher = wiring.enricher
        self._source_keys: dict[str, Raw] = {}
        self._intake = wiring.intake
        self._edge = wiring.edge
        self._max_body_bytes = max_body_bytes
        self._max_batch_events = wiring.max_batch_events
        self._ack_mode = wiring.ack_mode
        self._ack_timeout = wiring.ack_timeout
        self._draining = wiring.draining
        self._pipeline_down = wiring.pipeline_down
        self._rejections = wiring.rejections
        self._metrics = wiring.metrics
        self._decoder = EventDecoder()
        self._encoder = RowEncoder()
        # The event loop, taken once: on Python 3.11 every get_running_loop() is a getpid() call.
        self._loop = wiring.pipeline_down.get_loop()

    async def post(self, request: web.Request) -> web.Response:
        edge = self._edge
        admission = edge.admit(request)
        if isinstance(admission, web.Response):
            return admission
        response = await self._post(request, admission)
        return response if admission is OPEN else edge.finish(admission, response)

    async def _post(self, request: web.Request, admission: Admission) -> web.Response:
        reject = self._rejections.reject
        if self._draining.started:
            return self._rejections.unavailable(
                "shutting_down", "clickpulse is shutting down; retry on another instance", RETRY_AFTER_SHUTTING_DOWN
            )
        # Without a query string (the common case) the service's mode, and no call to parse one.
        ack_mode = self._ack_mode if not request.query_string else self._ack_mode_of(request)
        if ack_mode is None:
            return reject("invalid", 400, f"unknown ack mode; use ack={', '.join(ACK_MODES)} or wait=true")
        if ack_mode == "disk" and not self._intake.takes_durable:
            return reject("invalid", 400, "ack=disk needs a spool: start clickpulse with SPOOL_DIR")
        is_ndjson = False
        declared = request.headers.get(hdrs.CONTENT_TYPE)
        # The header exactly as most clients send it needs no parsing.
        if declared is not None and declared != "application/json":
            content_type = request.content_type
            is_ndjson = content_type in NDJSON_TYPES
            if not is_ndjson and content_type not in JSON_TYPES:
                return reject(
                    "unsupported_type", 415,
                    f"unsupported Content-Type {content_type!r}; send application/json, "
                    "application/x-ndjson or text/plain",
                )
        edge = self._edge
        body = edge.read_body_now(request, admission)
        if body is None:
            body = await edge.read_body(request, admission)
        if isinstance(body, web.Response):
            return body
        if not body or body.isspace():  # not body.strip(), which copies the body
            return reject("invalid", 400, "empty body: send a JSON object, a JSON array or NDJSON lines")
        enricher = self._enricher
        key = admission.key
        stamp = RowStamp(
            enricher.received_at_value(),
            enricher.context_value(request, edge.client_of(request, admission)),
            UNSET if key is None else self._source_keys.get(key.name) or self._source_key_value(key.name),
        )
        try:
            if is_ndjson:
                events, is_batch = self._decoder.decode_ndjson(body, stamp), True
            else:
                events, is_batch = self._decoder.decode_json(body, stamp)
        except msgspec.DecodeError as error:
            return reject("invalid", 400, str(error))
        count = len(events)
        if count > self._max_batch_events:
            return reject(
                "too_large", 413,
                f"{count} events in one request; the limit is {self._max_batch_events} (MAX_BATCH_EVENTS)",
            )
        if not count:
            return json_response(202, {"status": "accepted", "accepted": 0})
        if edge.rate_limited:
            limited = edge.charge(admission, count)
            if limited is not None:
                return limited
        rows = self._encoder.encode(events)
        loop = self._loop
        confirmation = loop.create_future() if ack_mode == "clickhouse" else None
        try:
            await self._intake.accept(
                rows, count, loop.time(), durable=ack_mode != "memory", confirmation=confirmation,
            )
        except Refused as refusal:
            return self._rejections.unavailable(refusal.reason, str(refusal), refusal.retry_after)
        except PipelineDown as down:
            return self._rejections.unavailable("overloaded", f"{down}; retry later", RETRY_AFTER_PIPELINE_DOWN)
        metrics = self._metrics
        metrics.events_received.add_at((), count)  # unlabelled: the series' key is ()
        metrics.events_per_request.observe_at((), count)
        self._edge.accepted(admission, count)
        if confirmation is not None:
            return await self._await_confirmation(confirmation, is_batch)
        if is_batch:
            return json_response(202, {"status": "accepted", "accepted": count})
        return web.Response(status=202, body=_ACCEPTED_ONE, headers=JSON_HEADERS)

    async def _await_confirmation(self, confirmation: asyncio.Future[int], is_batch: bool) -> web.Response:
        # Raced against the pipeline's death: a request must not wait out ACK_TIMEOUT for an actor
        # that is gone. asyncio.wait neither cancels the confirmation nor the shared future.
        done, _ = await asyncio.wait(
            (confirmation, self._pipeline_down), timeout=self._ack_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if confirmation not in done:
            if self._pipeline_down in done:
                return self._pipeline_down_response()
            return json_response(504, {
                "error": f"accepted, but ClickHouse has not confirmed it within ACK_TIMEOUT={self._ack_timeout:g}s; "
                "the events are still queued and will be written",
            })
        error = confirmation.exception()
        if isinstance(error, RowsRejected):
            return json_response(422, {"error": str(error), "rejected": error.rejected, "written": error.written})
        if error is not None:
            return self._pipeline_down_response()
        if is_batch:
            return json_response(200, {"status": "written", "written": confirmation.result()})
        return json_response(200, {"status": "written"})

    def _pipeline_down_response(self) -> web.Response:
        return json_response(
            503, {"error": "clickpulse stopped before ClickHouse confirmed these events; retry later"},
            {hdrs.RETRY_AFTER: str(RETRY_AFTER_PIPELINE_DOWN)},
        )

    def _source_key_value(self, name: str) -> Raw:
        value = Raw(msgspec.json.encode(name))
        if len(self._source_keys) < 1024:  # key names come from INGEST_KEYS_FILE: few
            self._source_keys[name] = value
        return value

    def _ack_mode_of(self, request: web.Request) -> AckMode | None:
        """The acknowledgement mode the request's query asks for, or None when it is unknown."""
        query = request.query
        if query.get("wait", "").lower() in ("true", "1", "yes"):
            return "clickhouse"
        mode = query.get("ack", self._ack_mode).lower()
        for known in ACK_MODES:
            if mode == known:
                return known
        return None

