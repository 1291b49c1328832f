"""The Segment-compatible /v1 API: what Segment's tracking SDKs send, as they send it.

    POST /v1/track | page | screen | identify | group | alias    one message (also /v1/t, /v1/p, ...: analytics.js)
    POST /v1/batch (and /v1/import, /v1/b)                      {"batch": [...], "sentAt", "context", "writeKey"}
    GET  /v1/projects/<writeKey>/settings                       what analytics.js fetches before it sends

Every request passes through the edge like POST /events (key, CORS, body bounds, rate limit).
The write key is an ingest key: HTTP Basic with the key as user name (what the SDKs send), the
edge's other forms, or a `writeKey` member of the body.

Each message is decoded by msgspec's C code into Structs whose `properties`, `traits` and
`context` stay `msgspec.Raw`: stored as the JSON text the SDK sent, never turned into dicts.
Members the spec allows but the table has no home for (`integrations`, `channel`, `version`,
`_metadata`, `receivedAt`, library extras) are ignored; only required members and their types
can fail a message. All or nothing: one bad message refuses the request, naming it
(`$.batch[3].event`).

The mapping of messages to rows is `segment_mapping`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Final

import msgspec
from aiohttp import hdrs, web

from clickpulse.events import EventIds
from clickpulse.http.adapter import AdapterWiring
from clickpulse.http.edge import OPEN, Admission
from clickpulse.http.enrich import now
from clickpulse.http.responses import json_response
from clickpulse.messages import PipelineDown, Refused, RowsRejected

from clickpulse.http.segment_mapping import (
    MESSAGE_TYPES, NO_KEY_SOURCE, BatchLimits, Invalid, MessageMapper, MessageType, RequestFacts, Row, WriteKeyOnly,
)

_SUCCESS: Final = msgspec.json.encode({"success": True})
RETRY_AFTER: Final = 5


ERROR_CODES: Final[dict[int, str]] = {
    400: "invalid_request", 401: "unauthorized", 403: "forbidden", 408: "timeout", 413: "too_large",
    415: "unsupported_media_type", 429: "rate_limited", 503: "unavailable", 504: "timeout",
}


def _as_segment_error(response: web.Response) -> None:
    """Adds Segment's `code` and `message` (what its SDKs read) beside the edge's `error`."""
    body = response.body
    try:
        payload = msgspec.json.decode(body) if isinstance(body, bytes) else None
    except msgspec.DecodeError:
        payload = None
    message = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(message, str):
        return
    response.body = msgspec.json.encode({
        "success": False, "code": ERROR_CODES.get(response.status, "error"), "message": message, "error": message,
    })



class SegmentEndpoint:
    def __init__(self, wiring: AdapterWiring, *, max_message_bytes: int, max_batch_bytes: int) -> None:
        self._intake = wiring.intake
        self._max_message = max_message_bytes
        self._max_batch = max_batch_bytes
        self._limits = BatchLimits(max_message_bytes, wiring.max_batch_events)
        self._ack_mode = wiring.ack_mode
        self._ack_timeout = wiring.ack_timeout
        self._draining = wiring.draining
        self._pipeline_down = wiring.pipeline_down
        self._rejections = wiring.rejections
        self._metrics = wiring.metrics
        self._edge = wiring.edge
        self._enricher = wiring.enricher
        self._mapper = MessageMapper()
        self._write_key = msgspec.json.Decoder(WriteKeyOnly)
        self._rows = msgspec.json.Encoder()
        self._ids = EventIds()

    def routes(self, app: web.Application) -> None:
        for kind in MESSAGE_TYPES:
            handler = self._single(kind)
            # analytics.js posts to the type's first letter: /v1/t, /v1/p, /v1/s, /v1/i, /v1/g, /v1/a.
            for path in (f"/v1/{kind}", f"/v1/{kind[0]}"):
                app.router.add_post(path, handler)
                app.router.add_route("OPTIONS", path, self._edge.preflight)
        for path in ("/v1/batch", "/v1/import", "/v1/b"):  # /v1/b: analytics.js's batching mode
            app.router.add_post(path, self.batch)
            app.router.add_route("OPTIONS", path, self._edge.preflight)
        app.router.add_get("/v1/projects/{write_key}/settings", self.settings)

    def _single(self, kind: MessageType) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def post(request: web.Request) -> web.StreamResponse:
            return await self._serve(request, kind)

        return post

    async def batch(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, None)

    # -- one request -------------------------------------------------------------------------

    async def _serve(self, request: web.Request, kind: MessageType | None) -> web.Response:
        response = await self._answer(request, kind)
        if response.status >= 400:
            _as_segment_error(response)
        return response

    async def _answer(self, request: web.Request, kind: MessageType | None) -> web.Response:
        edge = self._edge
        admission = edge.admit(request)
        body: bytes | None = None
        if isinstance(admission, web.Response):
            if edge.presents_key(request):
                return admission  # a wrong key, a browser key without its origin...
            # No key in a header or the query: perhaps `writeKey` in the body.
            provisional = edge.origin_admission(request)
            read = await self._read(request, provisional)
            if isinstance(read, web.Response):
                return read
            body = read
            try:
                write_key = self._write_key.decode(body).writeKey
            except msgspec.DecodeError:
                write_key = None
            if not write_key:
                return admission
            admission = edge.admit(request, body_secret=write_key)
            if isinstance(admission, web.Response):
                return admission
        response = await self._post(request, admission, kind, body)
        return response if admission is OPEN else edge.finish(admission, response)

    async def _read(self, request: web.Request, admission: Admission) -> bytes | web.Response:
        edge = self._edge
        body = edge.read_body_now(request, admission)
        if body is None:
            body = await edge.read_body(request, admission)
        return body

    async def _post(
        self, request: web.Request, admission: Admission, kind: MessageType | None, body: bytes | None
    ) -> web.Response:
        reject = self._rejections.reject
        if self._draining.started:
            return self._rejections.unavailable(
                "shutting_down", "clickpulse is shutting down; retry on another instance", RETRY_AFTER
            )
        if body is None:
            read = await self._read(request, admission)
            if isinstance(read, web.Response):
                return read
            body = read
        received_at = now()
        try:
            rows = self._rows_of(request, admission, kind, body, received_at)
        except Invalid as invalid:
            return reject("too_large" if invalid.status == 413 else "invalid", invalid.status, str(invalid))
        count = len(rows)
        if not count:
            return web.Response(status=200, body=_SUCCESS, content_type="application/json")
        limited = self._edge.charge(admission, count)
        if limited is not None:
            return limited
        without_id = [row for row in rows if not row.event_id]
        if without_id:
            for row, event_id in zip(without_id, self._ids.batch(len(without_id))):
                row.event_id = event_id
        data = self._rows.encode_lines(rows)
        loop = asyncio.get_running_loop()
        confirmation = loop.create_future() if self._ack_mode == "clickhouse" else None
        try:
            await self._intake.accept(
                data, count, loop.time(), durable=self._ack_mode != "memory", confirmation=confirmation
            )
        except Refused as refusal:
            return self._rejections.unavailable(refusal.reason, str(refusal), refusal.retry_after)
        except PipelineDown as down:
            return self._rejections.unavailable("overloaded", f"{down}; retry later", RETRY_AFTER)
        self._metrics.events_received.add({}, count)
        self._metrics.events_per_request.observe({}, count)
        self._edge.accepted(admission, count)
        if confirmation is not None:
            return await self._confirmed(confirmation)
        return web.Response(status=200, body=_SUCCESS, content_type="application/json")

    def _rows_of(
        self, request: web.Request, admission: Admission, kind: MessageType | None, body: bytes, received_at: datetime
    ) -> list[Row]:
        if not body.strip():
            raise Invalid("empty body: send a JSON object")
        key = admission.key
        source = key.name if key is not None else NO_KEY_SOURCE
        source_key = key.name if key is not None else ""
        request_context = self._enricher.context_members(request, self._edge.client_of(request, admission))
        mapper = self._mapper
        if kind is not None:
            if len(body) > self._max_message:
                raise Invalid(
                    f"message larger than {self._max_message} bytes (SEGMENT_MAX_MESSAGE_BYTES)", 413
                )
            message = mapper.decode(body, "$")
            facts = RequestFacts(
                received_at, source, source_key, request_context,
                batch_context=mapper.enriched(None, request_context).decode(),
            )
            return [mapper.row(message, kind, "$", facts)]
        if len(body) > self._max_batch:
            raise Invalid(f"batch larger than {self._max_batch} bytes (SEGMENT_MAX_BATCH_BYTES)", 413)
        return mapper.batch_rows(body, self._limits, RequestFacts(received_at, source, source_key, request_context))

    async def _confirmed(self, confirmation: asyncio.Future[int]) -> web.Response:
        done, _ = await asyncio.wait(
            (confirmation, self._pipeline_down), timeout=self._ack_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if confirmation not in done:
            return json_response(503, {"error": "ClickHouse has not confirmed the messages in time; retry later"},
                                 {hdrs.RETRY_AFTER: str(RETRY_AFTER)})
        error = confirmation.exception()
        if isinstance(error, RowsRejected):
            return json_response(400, {"error": str(error)})
        if error is not None:
            return json_response(503, {"error": "clickpulse stopped before ClickHouse confirmed; retry later"},
                                 {hdrs.RETRY_AFTER: str(RETRY_AFTER)})
        return web.Response(status=200, body=_SUCCESS, content_type="application/json")

    # -- analytics.js --------------------------------------------------------------------------

    async def settings(self, request: web.Request) -> web.Response:
        """What analytics.js fetches from its CDN: the Segment.io integration, pointed at this host."""
        api_host = f"{request.host}/v1"
        payload = {
            "integrations": {
                "Segment.io": {"apiKey": request.match_info["write_key"], "apiHost": api_host,
                               "protocol": request.scheme, "unbundledIntegrations": [], "addBundledMetadata": False},
            },
            "plan": {"track": {"__default": {"enabled": True}}, "identify": {"__default": {"enabled": True}},
                     "group": {"__default": {"enabled": True}}},
            "enabledMiddleware": {},
            "metrics": {"sampleRate": 0},
            "remotePlugins": [],
        }
        response = json_response(200, payload)
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = "*"  # public, like Segment's CDN
        response.headers[hdrs.CACHE_CONTROL] = "public, max-age=300"
        return response
