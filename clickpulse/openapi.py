"""The OpenAPI 3.1 document of clickpulse's HTTP API, served at GET /openapi.json.

The request schema is the `Event` Struct the server decodes every body with; the answers are
the Structs below, which say what each route's JSON holds. msgspec writes their JSON Schema
(`msgspec.json.schema_components`), so the document cannot drift from the validation: a field
added to `Event` is in the document at once. `tests/test_openapi.py` validates the document;
`tests/integration/test_openapi_fuzz.py` runs schemathesis against a running service with it.
`docs/openapi.json` is this document, committed (a test keeps it current).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from clickpulse import __version__
from clickpulse.events import SERVER_FIELDS, Event, server_column_schema
from clickpulse.http.segment_mapping import MESSAGE_TYPES, MessageType
from clickpulse.messages import ACK_MODES

QUERY_FORMATS = ("PrettyCompactMonoBlock", "JSONCompact", "TSV", "TSVWithNames", "CSV", "CSVWithNames", "JSONEachRow")


class Accepted(msgspec.Struct, omit_defaults=True):
    """202: the events are in the pipeline (ack mode memory) or fsynced in the spool (disk).
    `accepted` is present for an array or NDJSON body."""

    status: Literal["accepted"]
    accepted: int | None = None


class Written(msgspec.Struct, omit_defaults=True):
    """200, in ack mode clickhouse (`?ack=clickhouse`, `?wait=true`): ClickHouse confirmed the
    insert of every event of the request. `written` is present for an array or NDJSON body."""

    status: Literal["written"]
    written: int | None = None


class Error(msgspec.Struct):
    """Every refusal: one line saying why (for 400, the event's index and the field)."""

    error: str


class PartlyRejected(msgspec.Struct):
    """422, in ack mode clickhouse: ClickHouse rejected some rows as data; they are in the
    quarantine, the others were written."""

    error: str
    rejected: int
    written: int


class SegmentMessage(msgspec.Struct):
    """One /v1 message. The server decodes it as clickpulse.http.segment.Message, whose
    properties, traits and context are kept as raw JSON (msgspec.Raw has no schema); a test holds
    the two to the same members. Any other member is ignored, never refused."""

    type: MessageType | None = None
    event: str | None = None
    userId: str | int | None = None
    anonymousId: str | int | None = None
    messageId: str | int | None = None
    timestamp: str | None = None
    sentAt: str | None = None
    properties: dict[str, Any] | None = None
    traits: dict[str, Any] | None = None
    context: dict[str, Any] | None = None
    name: str | None = None
    category: str | None = None
    previousId: str | int | None = None
    groupId: str | int | None = None
    writeKey: str | None = None


class SegmentBatch(msgspec.Struct):
    """A /v1/batch (or /v1/import) body: what the SDKs send."""

    batch: list[SegmentMessage]
    sentAt: str | None = None
    context: dict[str, Any] | None = None
    writeKey: str | None = None


class SegmentSuccess(msgspec.Struct):
    success: Literal[True]


class SegmentError(msgspec.Struct):
    """Segment's error body (what its SDKs read), with clickpulse's `error` beside it."""

    success: Literal[False]
    code: str
    message: str
    error: str


class Health(msgspec.Struct):
    status: Literal["ok"]


class Ready(msgspec.Struct):
    status: Literal["ready"]


class NotReady(msgspec.Struct):
    status: Literal["not ready"]
    reason: str


_STRUCTS = (Event, Accepted, Written, Error, PartlyRejected, Health, Ready, NotReady,
            SegmentMessage, SegmentBatch, SegmentSuccess, SegmentError)
_REF = "#/components/schemas/{name}"


def _ref(struct: type) -> dict[str, str]:
    return {"$ref": _REF.format(name=struct.__name__)}


def _json(struct: type, description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": _ref(struct)}}}
    if headers:
        response["headers"] = headers
    return response


_RETRY_AFTER = {
    "Retry-After": {
        "description": "seconds to wait before retrying (1 when full, 5 when shutting down)",
        "required": True,
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
}


_RATE_LIMIT = {
    **_RETRY_AFTER,
    "RateLimit-Limit": {"description": "the bucket's burst, in events", "schema": {"type": "string"}},
    "RateLimit-Remaining": {"description": "events left in the bucket", "schema": {"type": "string"}},
    "RateLimit-Reset": {"description": "seconds until the bucket is full again", "schema": {"type": "string"}},
}
_WWW_AUTHENTICATE = {
    "WWW-Authenticate": {"description": 'always `Bearer realm="clickpulse"`', "required": True, "schema": {"type": "string"}},
}
# What the edge (clickpulse/http/edge.py) answers for every route that writes.
_EDGE_RESPONSES = {
    "401": _json(Error, "INGEST_KEYS_FILE is set and the request has no key or an unknown one", _WWW_AUTHENTICATE),
    "403": _json(Error, "a browser key from an origin not in its list, or without Origin"),
    "408": _json(Error, "the body did not arrive within BODY_READ_TIMEOUT"),
    "429": _json(Error, "over the key's or the client address's rate limit; nothing of the request was stored", _RATE_LIMIT),
}
_KEY_PARAMETER = {
    "name": "key", "in": "query", "required": False,
    "description": "a browser key (sendBeacon cannot set headers); a server key here is refused",
    "schema": {"type": "string"},
}


def _preflight_operation() -> dict[str, Any]:
    return {
        "operationId": "preflightEvents",
        "summary": "CORS preflight: what a browser asks before a JSON fetch()",
        "responses": {
            "204": {
                "description": (
                    "from an allowed origin (CORS_ORIGINS or a browser key's origins) with the "
                    "Access-Control-Allow-* headers; from any other origin without them"
                ),
            },
        },
    }


def _events_operation() -> dict[str, Any]:
    event_or_events = {"oneOf": [_ref(Event), {"type": "array", "items": _ref(Event)}]}
    return {
        "operationId": "postEvents",
        "summary": "Send one event, an array of events, or NDJSON lines",
        "description": (
            "A request is all or nothing: if any event is invalid, nothing from it is stored. "
            "Beyond the schema: `event_type` and `source` must not be blank, `created_at` must lie between "
            "1970-01-01T00:00:00Z and 2105-12-31T23:59:59Z, and `properties` values are strings (at most "
            "1024 characters), numbers or booleans. The answer depends on the acknowledgement mode "
            "(ACK_MODE, or per request `ack` / `wait`)."
        ),
        "parameters": [
            {
                "name": "ack", "in": "query", "required": False,
                "description": "when to answer: memory, disk (needs SPOOL_DIR) or clickhouse; case-insensitive",
                "schema": {"type": "string", "enum": list(ACK_MODES)},
            },
            {
                "name": "wait", "in": "query", "required": False,
                "description": "`true` (or `1`, `yes`) is `ack=clickhouse`",
                "schema": {"type": "string", "enum": ["true", "false", "1", "0", "yes", "no"]},
            },
            _KEY_PARAMETER,
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": event_or_events},
                "application/x-ndjson": {
                    "schema": {"type": "string", "description": "one Event object as JSON per line; blank lines are skipped"},
                },
                "text/plain": {
                    "schema": {"type": "string", "description": "the same JSON as application/json (what navigator.sendBeacon sends)"},
                },
            },
        },
        "responses": {
            "200": _json(Written, "ack mode clickhouse: ClickHouse has the rows"),
            "202": _json(Accepted, "ack mode memory or disk: accepted"),
            "400": _json(Error, "invalid JSON, an invalid event, an empty body or an unknown ack mode"),
            "413": _json(Error, "body larger than MAX_BODY_BYTES, or more than MAX_BATCH_EVENTS events"),
            "415": _json(Error, "a Content-Type other than JSON, NDJSON or text/plain, or an unknown Content-Encoding"),
            "422": _json(PartlyRejected, "ack mode clickhouse: ClickHouse rejected some rows; they are in the quarantine"),
            "503": _json(Error, "the pipeline or the spool is full or unwritable, or the service is shutting down", _RETRY_AFTER),
            "504": _json(Error, "ack mode clickhouse: not confirmed within ACK_TIMEOUT; the events stay queued"),
            **_EDGE_RESPONSES,
        },
    }


def _segment_operation(operation_id: str, summary: str, body: type) -> dict[str, Any]:
    errors = {
        status: _json(SegmentError, description, headers)
        for status, description, headers in (
            ("400", "an invalid message, naming its index and member ($.batch[3].event)", None),
            ("401", "no write key or an unknown one (INGEST_KEYS_FILE set)", _WWW_AUTHENTICATE),
            ("403", "a browser key from an origin not in its list", None),
            ("408", "the body did not arrive within BODY_READ_TIMEOUT", None),
            ("413", "a message over SEGMENT_MAX_MESSAGE_BYTES, a batch over SEGMENT_MAX_BATCH_BYTES or MAX_BODY_BYTES", None),
            ("415", "a Content-Type other than JSON, or an unknown Content-Encoding", None),
            ("429", "over the key's or the client address's rate limit", _RATE_LIMIT),
            ("503", "the pipeline is full, or the service is shutting down", _RETRY_AFTER),
        )
    }
    return {
        "operationId": operation_id,
        "summary": summary,
        "description": "Segment's HTTP Tracking API: the write key is an ingest key (docs/segment.md has the mapping).",
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(body)}}},
        "responses": {"200": _json(SegmentSuccess, "every message is in the pipeline"), **errors},
    }


def _segment_paths() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for kind in MESSAGE_TYPES:
        for path in (f"/v1/{kind}", f"/v1/{kind[0]}"):
            paths[path] = {
                "post": _segment_operation(f"segment_{kind}_{path.rsplit('/', 1)[1]}", f"One {kind} message", SegmentMessage),
                "options": {**_preflight_operation(), "operationId": f"preflight_{path.rsplit('/', 1)[1]}"},
            }
    for path in ("/v1/batch", "/v1/import", "/v1/b"):
        paths[path] = {
            "post": _segment_operation(f"segment_{path.rsplit('/', 1)[1]}", "A batch of messages", SegmentBatch),
            "options": {**_preflight_operation(), "operationId": f"preflight_{path.rsplit('/', 1)[1]}"},
        }
    paths["/v1/projects/{write_key}/settings"] = {"get": {
        "operationId": "segmentSettings",
        "summary": "What analytics.js fetches from its CDN before it sends: this host as its apiHost",
        "parameters": [{"name": "write_key", "in": "path", "required": True, "schema": {"type": "string"}}],
        "responses": {"200": {"description": "the settings", "content": {"application/json": {"schema": {"type": "object"}}}}},
    }}
    return paths


def _query_operation() -> dict[str, Any]:
    return {
        "operationId": "query",
        "summary": "Run one read-only statement on the embedded store (only from this machine)",
        "description": (
            "Present only with the embedded store (CLICKHOUSE_DSN unset): how `python -m clickpulse query` "
            "reaches a store the running service holds open. Only statements whose first word after any "
            "leading `--` or `/* */` comments is SELECT, WITH, SHOW, DESCRIBE, DESC, EXISTS or EXPLAIN."
        ),
        "parameters": [{
            "name": "format", "in": "query", "required": False,
            "description": "ClickHouse output format of the answer",
            "schema": {"type": "string", "enum": list(QUERY_FORMATS), "default": QUERY_FORMATS[0]},
        }],
        "requestBody": {"required": True, "content": {"text/plain": {"schema": {"type": "string"}}}},
        "responses": {
            "200": {"description": "the result in the asked format", "content": {"text/plain": {"schema": {"type": "string"}}}},
            "400": _json(Error, "not a read-only statement, an unknown format, or ClickHouse's error"),
            "401": _json(Error, "INGEST_KEYS_FILE is set and the request has no server key", _WWW_AUTHENTICATE),
            "403": _json(Error, "the request did not come from this machine"),
        },
    }


def openapi_document(*, with_query: bool = True) -> dict[str, Any]:
    """The whole API; `with_query` False leaves out POST /query (a service writing to a server)."""
    _, components = msgspec.json.schema_components(_STRUCTS, ref_template=_REF, schema_hook=server_column_schema)
    # The server's own columns are members of the Struct, not of what a client may send.
    event = components["Event"]
    for name in SERVER_FIELDS:
        del event["properties"][name]
    # Event's docstring is about its implementation; the reader of the API needs the rules.
    event["description"] = (
        "One analytical event. Any other field is refused (400 naming it). `created_at` is RFC 3339 with `Z` "
        "or an offset, stored in UTC; `event_id` is generated (a UUIDv7) when absent; `properties` is a flat "
        "object of at most 64 entries, stored as JSON text."
    )
    paths: dict[str, Any] = {
        "/events": {"post": _events_operation(), "options": _preflight_operation()},
        "/healthz": {"get": {
            "operationId": "healthz", "summary": "Liveness: 200 while the process serves",
            "responses": {"200": _json(Health, "the process serves")},
        }},
        "/readyz": {"get": {
            "operationId": "readyz",
            "summary": "Readiness: ClickHouse answers, the table exists, every actor runs, buffer and spool below 90 %",
            "responses": {
                "200": _json(Ready, "ready to take events"),
                "503": _json(NotReady, "not ready; `reason` says why"),
            },
        }},
        "/metrics": {"get": {
            "operationId": "metrics", "summary": "Prometheus metrics in the text exposition format",
            "responses": {"200": {"description": "the metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}},
        }},
        "/openapi.json": {"get": {
            "operationId": "openapi", "summary": "This document",
            "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}}},
        }},
    }
    paths.update(_segment_paths())
    if with_query:
        paths["/query"] = {"post": _query_operation()}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "clickpulse",
            "version": __version__,
            "description": "Self-hosted HTTP event collector that batches analytical events into ClickHouse.",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "paths": paths,
        "components": {"schemas": components},
    }


def encoded_document(*, with_query: bool = True) -> bytes:
    return msgspec.json.format(msgspec.json.encode(openapi_document(with_query=with_query)), indent=2) + b"\n"
