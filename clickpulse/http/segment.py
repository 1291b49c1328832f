"""The Segment-compatible /v1 API: what Segment's tracking SDKs send, as they send it.

    POST /v1/track | page | screen | identify | group | alias    one message (also /v1/t, /v1/p, ...: analytics.js)
    POST /v1/batch (and /v1/import, /v1/b)                      {"batch": [...], "sentAt", "context", "writeKey"}
    GET  /v1/projects/<writeKey>/settings                       what analytics.js fetches before it sends

Every request passes through the edge like POST /events (key, CORS, body bounds, rate limit).
The write key is an ingest key: HTTP Basic with the key as user name (what the SDKs send), the
edge's other forms, or a `writeKey` member of the body.

A body is decoded in two steps, both in msgspec's C code: the batch as a list of `msgspec.Raw`
(each message's bytes, to hold it to SEGMENT_MAX_MESSAGE_BYTES), then each message into a
`Message` Struct, whose `properties`, `traits` and `context` stay `msgspec.Raw`: stored as the
JSON text the SDK sent, never turned into dicts. Members the spec allows but the table has no
home for (`integrations`, `channel`, `version`, `_metadata`, `receivedAt`, library extras) are
ignored; only required members and their types can fail a message. All or nothing: one bad
message refuses the request, naming it (`$.batch[3].event`).
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Final, Literal

import msgspec
from aiohttp import hdrs, web
from msgspec import Raw, Struct

from clickpulse.events import MAX_NAME_LENGTH, MAX_USER_ID_LENGTH, EventIds
from clickpulse.http.adapter import AdapterWiring
from clickpulse.http.edge import OPEN, Admission
from clickpulse.http.enrich import now
from clickpulse.http.responses import json_response
from clickpulse.messages import PipelineDown, Refused, RowsRejected

MessageType = Literal["track", "page", "screen", "identify", "group", "alias"]
MESSAGE_TYPES: Final[tuple[MessageType, ...]] = ("track", "page", "screen", "identify", "group", "alias")
# The namespace of the deterministic event_id of a messageId that is not a UUID: uuid5(this, id).
MESSAGE_ID_NAMESPACE: Final = uuid.UUID("6f1c2a8e-4b1d-5e0a-9c3f-0c11c4a9e512")
NO_KEY_SOURCE: Final = "segment"  # `source` of rows sent without keys configured
RETRY_AFTER: Final = 5

_SUCCESS: Final = msgspec.json.encode({"success": True})
_NULL: Final = b"null"


class Message(Struct, gc=False):
    """One message, as the SDKs send it. Unknown members are ignored (msgspec's default)."""

    type: MessageType | None = None  # required inside a batch; the route decides otherwise
    event: str | None = None
    userId: str | int | None = None
    anonymousId: str | int | None = None
    messageId: str | int | None = None
    timestamp: datetime | None = None
    sentAt: datetime | None = None
    properties: Raw = Raw()
    traits: Raw = Raw()
    context: Raw = Raw()
    name: str | None = None
    category: str | None = None
    previousId: str | int | None = None
    groupId: str | int | None = None
    writeKey: str | None = None


class Envelope(Struct, gc=False):
    """A batch request's outer object."""

    batch: list[Raw]
    sentAt: datetime | None = None
    context: Raw = Raw()
    writeKey: str | None = None


class WriteKeyOnly(Struct, gc=False):
    writeKey: str | None = None


class _Present(Struct, gc=False):
    """Which of the members clickpulse would add an object already has (any value)."""

    name: Raw = Raw()
    category: Raw = Raw()
    previousId: Raw = Raw()
    groupId: Raw = Raw()
    ip: Raw = Raw()
    userAgent: Raw = Raw()


class Row(Struct, omit_defaults=True, gc=False):
    """One JSONEachRow line of the events table."""

    event_id: str
    event_type: str
    source: str
    created_at: datetime
    received_at: datetime
    properties: str
    context: str
    source_key: str = ""
    user_id: str | None = None
    anonymous_id: str | None = None
    original_timestamp: datetime | None = None


class Invalid(Exception):
    """A message or body clickpulse refuses: 400, or `status`."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


EVENT_TYPES: Final[dict[str, str]] = {
    "page": "$page", "screen": "$screen", "identify": "$identify", "group": "$group", "alias": "$alias",
}
EARLIEST: Final = datetime(1970, 1, 2, tzinfo=timezone.utc)
LATEST: Final = datetime(2105, 12, 31, tzinfo=timezone.utc)


_UUID_TEXT: Final = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def event_id_of(message_id: str | int | None) -> str | None:
    """The messageId when it is a UUID (in its usual 8-4-4-4-12 form); else
    uuid5(MESSAGE_ID_NAMESPACE, messageId); None when absent."""
    if message_id is None:
        return None
    text = message_id if type(message_id) is str else str(message_id)
    if len(text) == 36 and _UUID_TEXT.fullmatch(text):
        return text.lower()
    return str(uuid.uuid5(MESSAGE_ID_NAMESPACE, text))


def _object(raw: Raw, path: str, field: str) -> bytes | None:
    """The bytes of a JSON object member (None when absent or null); Invalid if not an object."""
    data = bytes(raw)
    if not data or data == _NULL:
        return None
    if data[:1] != b"{":
        raise Invalid(f"Expected `object`, got `{_json_kind(data)}` - at `{path}.{field}`")
    return data


def _json_kind(data: bytes) -> str:
    first = data[:1]
    return {b"[": "array", b'"': "str", b"t": "bool", b"f": "bool"}.get(first, "number")


def _with_members(obj: bytes | None, members: list[bytes]) -> bytes:
    """`members` (`"k":v`) put at the front of the JSON object `obj` (or a new object)."""
    if not members:
        return obj if obj is not None else b"{}"
    head = b",".join(members)
    if obj is None:
        return b"{" + head + b"}"
    rest = obj[1:].lstrip()
    return b"{" + head + (b"" if rest[:1] == b"}" else b",") + rest


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def _text_id(value: str | int | None, path: str, field: str) -> str | None:
    if value is None:
        return None
    text = value if type(value) is str else str(value)
    if len(text) > MAX_USER_ID_LENGTH:
        raise Invalid(f"Expected `str` of length <= {MAX_USER_ID_LENGTH} - at `{path}.{field}`")
    return text


class MessageMapper:
    """Messages → Rows (see the README's mapping table)."""

    def __init__(self) -> None:
        self._one = msgspec.json.Decoder(Message)
        self._present = msgspec.json.Decoder(_Present)
        self._encode = msgspec.json.encode

    def decode(self, data: bytes, path: str) -> Message:
        try:
            return self._one.decode(data)
        except msgspec.DecodeError as error:
            raise Invalid(_at(str(error), path)) from None

    def present(self, obj: bytes) -> _Present:
        return self._present.decode(obj)

    def enriched(self, context: bytes | None, request_context: tuple[bytes, bytes]) -> bytes:
        """`context` with the request's `ip` and `userAgent` members where it has none."""
        ip_member, agent_member = request_context
        if not ip_member and not agent_member:
            return context if context is not None else b"{}"
        have = self.present(context) if context is not None else None
        members = []
        if ip_member and (have is None or not have.ip):
            members.append(ip_member)
        if agent_member and (have is None or not have.userAgent):
            members.append(agent_member)
        return _with_members(context, members)

    def row(
        self,
        message: Message,
        kind: MessageType,
        path: str,
        *,
        received_at: datetime,
        sent_at: datetime | None,
        batch_context: bytes,
        request_context: tuple[bytes, bytes],
        source: str,
        source_key: str,
    ) -> Row:
        encode = self._encode
        if kind == "track":
            event = message.event
            if event is None:
                raise Invalid(f"Object missing required field `event` - at `{path}`")
            if not event.strip() or len(event) > MAX_NAME_LENGTH:
                raise Invalid(f"Expected `str` of length 1-{MAX_NAME_LENGTH}, not blank - at `{path}.event`")
            event_type = event
        else:
            event_type = EVENT_TYPES[kind]
        user_id = _text_id(message.userId, path, "userId")
        anonymous_id = _text_id(message.anonymousId, path, "anonymousId")
        if not user_id and not anonymous_id:
            raise Invalid(f"Either `userId` or `anonymousId` is required - at `{path}`")
        if kind in ("identify", "group"):
            properties = _object(message.traits, path, "traits")
        else:
            properties = _object(message.properties, path, "properties")
        extra: list[tuple[str, object]] = []
        if kind == "track":
            pass
        elif kind in ("page", "screen"):
            extra = [("name", message.name), ("category", message.category)]
        elif kind == "alias":
            previous = _text_id(message.previousId, path, "previousId")
            if not previous:
                raise Invalid(f"Object missing required field `previousId` - at `{path}`")
            extra = [("previousId", previous)]
        elif kind == "group":
            group = _text_id(message.groupId, path, "groupId")
            if not group:
                raise Invalid(f"Object missing required field `groupId` - at `{path}`")
            extra = [("groupId", group)]
        if extra:
            extra = [(name, value) for name, value in extra if value is not None]
        if extra:
            # The properties' own member of the same name wins; never a duplicate key.
            present = self.present(properties) if properties is not None else None
            members = [
                b'"' + name.encode() + b'":' + encode(value)
                for name, value in extra
                if present is None or not getattr(present, name)
            ]
            properties = _with_members(properties, members)
        context = _object(message.context, path, "context")
        if context is None:
            context = batch_context  # enriched once per request
        else:
            context = self.enriched(context, request_context)
        timestamp = message.timestamp
        if timestamp is not None and timestamp.tzinfo is None:
            timestamp = timestamp.replace(tzinfo=timezone.utc)
        sent = message.sentAt
        if sent is None:
            sent = sent_at
        elif sent.tzinfo is None:
            sent = sent.replace(tzinfo=timezone.utc)
        if timestamp is None:
            created_at = received_at
        elif sent is not None:
            try:
                created_at = timestamp + (received_at - sent)  # Segment's clock-skew correction
            except OverflowError:
                raise Invalid(f"`timestamp` corrected by `sentAt` is not a representable time - at `{path}.timestamp`") from None
        else:
            created_at = timestamp
        if not EARLIEST <= created_at <= LATEST:
            raise Invalid(
                f"`timestamp` {created_at.isoformat()} (after the clock-skew correction) is outside the range "
                f"ClickHouse stores (1970-01-02 to 2105-12-31) - at `{path}.timestamp`"
            )
        if timestamp is not None and not EARLIEST <= timestamp <= LATEST:
            raise Invalid(f"`timestamp` is outside the range ClickHouse stores - at `{path}.timestamp`")
        event_id = event_id_of(message.messageId)
        return Row(
            event_id=event_id if event_id is not None else "",
            event_type=event_type,
            source=source,
            created_at=created_at,
            received_at=received_at,
            properties=(properties if properties is not None else b"{}").decode(),
            context=context.decode(),
            source_key=source_key,
            user_id=user_id or None,
            anonymous_id=anonymous_id or None,
            original_timestamp=timestamp,
        )


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


def _at(message: str, prefix: str) -> str:
    marker = " - at `$"
    if marker in message:
        return message.replace(marker, f" - at `{prefix}", 1)
    return f"{message} - at `{prefix}`"


class SegmentEndpoint:
    def __init__(self, wiring: AdapterWiring, *, max_message_bytes: int, max_batch_bytes: int) -> None:
        self._intake = wiring.intake
        self._max_message = max_message_bytes
        self._max_batch = max_batch_bytes
        self._max_events = wiring.max_batch_events
        self._ack_mode = wiring.ack_mode
        self._ack_timeout = wiring.ack_timeout
        self._draining = wiring.draining
        self._pipeline_down = wiring.pipeline_down
        self._rejections = wiring.rejections
        self._metrics = wiring.metrics
        self._edge = wiring.edge
        self._enricher = wiring.enricher
        self._mapper = MessageMapper()
        self._envelope = msgspec.json.Decoder(Envelope)
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
        if self._draining():
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
            return [mapper.row(
                message, kind, "$", received_at=received_at, sent_at=None,
                batch_context=mapper.enriched(None, request_context),
                request_context=request_context, source=source, source_key=source_key,
            )]
        if len(body) > self._max_batch:
            raise Invalid(f"batch larger than {self._max_batch} bytes (SEGMENT_MAX_BATCH_BYTES)", 413)
        try:
            envelope = self._envelope.decode(body)
        except msgspec.DecodeError as error:
            raise Invalid(str(error)) from None
        if len(envelope.batch) > self._max_events:
            raise Invalid(
                f"{len(envelope.batch)} messages in one request; the limit is {self._max_events} (MAX_BATCH_EVENTS)",
                413,
            )
        sent_at = _aware(envelope.sentAt) if envelope.sentAt is not None else None
        batch_context = mapper.enriched(_object(envelope.context, "$", "context"), request_context)
        rows = []
        for index, raw in enumerate(envelope.batch):
            path = f"$.batch[{index}]"
            data = bytes(raw)
            if len(data) > self._max_message:
                raise Invalid(
                    f"message larger than {self._max_message} bytes (SEGMENT_MAX_MESSAGE_BYTES) - at `{path}`", 413
                )
            message = mapper.decode(data, path)
            if message.type is None:
                raise Invalid(f"Object missing required field `type` - at `{path}`")
            rows.append(mapper.row(
                message, message.type, path, received_at=received_at, sent_at=sent_at, batch_context=batch_context,
                request_context=request_context, source=source, source_key=source_key,
            ))
        return rows

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
