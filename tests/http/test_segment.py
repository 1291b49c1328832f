"""The Segment-compatible /v1 API on the real application: mapping, keys, limits, all or nothing;
and its two mapping paths held to the same rows."""

from __future__ import annotations

import asyncio
import base64
import gzip
import logging
import random
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import msgspec
import pytest

from clickpulse.events import MAX_NAME_LENGTH, MAX_USER_ID_LENGTH
from clickpulse.http.segment_mapping import (
    MESSAGE_ID_NAMESPACE,
    BatchLimits,
    CommonMembers,
    CommonMessage,
    Envelope,
    Invalid,
    Message,
    MessageMapper,
    RequestFacts,
    Row,
    event_id_of,
    event_ids_of,
)
from tests.http.conftest import App, MakeApp, encode, json_error

SERVER_SECRET = "sk_live_0123456789abcdef"
BROWSER_SECRET = "pk_live_fedcba9876543210"
KEYS_TOML = f"""
[[keys]]
name = "backend"
secret = "{SERVER_SECRET}"
kind = "server"

[[keys]]
name = "landing"
secret = "{BROWSER_SECRET}"
kind = "browser"
origins = ["https://shop.example"]
"""


def basic(secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{secret}:".encode()).decode()}


async def post(app: App, path: str, payload: object, headers: dict[str, str] | None = None, raw: bytes | None = None) -> Any:
    return await app.client.post(
        path, data=raw if raw is not None else encode(payload),
        headers={"Content-Type": "application/json", **(headers or {})},
    )


def rows(app: App) -> list[dict[str, Any]]:
    return [msgspec.json.decode(line) for d in app.pipeline.deliveries for line in d.rows.splitlines()]


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(KEYS_TOML)
    return path


async def test_track_maps_onto_the_events_table(app: App) -> None:
    message_id = str(uuid.uuid4())
    response = await post(app, "/v1/track", {
        "userId": "u1", "anonymousId": "a1", "event": "Order Completed", "messageId": message_id,
        "properties": {"total": 12.5, "items": [{"sku": "x", "n": 2}], "big": 12345678901234567890},
        "timestamp": "2026-01-01T10:00:00.000Z", "context": {"library": {"name": "test"}},
        "integrations": {"All": True}, "channel": "server", "version": 2, "_metadata": {"x": 1},
    }, headers={"User-Agent": "sdk/1"})

    assert response.status == 200
    assert await response.json() == {"success": True}
    [row] = rows(app)
    assert row["event_type"] == "Order Completed"
    assert row["event_id"] == message_id
    assert row["user_id"] == "u1" and row["anonymous_id"] == "a1"
    assert row["source"] == "segment" and row.get("source_key", "") == ""
    assert row["properties"] == '{"total":12.5,"items":[{"sku":"x","n":2}],"big":12345678901234567890}'
    assert row["created_at"] == "2026-01-01T10:00:00Z"
    assert row["original_timestamp"] == "2026-01-01T10:00:00Z"
    assert msgspec.json.decode(row["context"]) == {"ip": "127.0.0.1", "userAgent": "sdk/1", "library": {"name": "test"}}
    assert "received_at" in row


async def test_the_other_calls_get_dollar_types_and_keep_their_extra_members(app: App) -> None:
    batch = [
        {"type": "page", "anonymousId": "a", "name": "Home", "category": "Docs", "properties": {"url": "/"}},
        {"type": "screen", "userId": "u", "name": "Settings"},
        {"type": "identify", "userId": "u", "traits": {"email": "e@x", "plan": {"tier": 2}}},
        {"type": "group", "userId": "u", "groupId": "g1", "traits": {"size": 5}},
        {"type": "alias", "userId": "u", "previousId": "a"},
    ]
    response = await post(app, "/v1/batch", {"batch": batch})
    assert response.status == 200, await response.text()
    response = await post(app, "/v1/page", {"anonymousId": "a", "name": "Top", "properties": {"name": "Own"}})
    assert response.status == 200, await response.text()
    got = rows(app)
    assert [row["event_type"] for row in got] == ["$page", "$screen", "$identify", "$group", "$alias", "$page"]
    assert [msgspec.json.decode(row["properties"]) for row in got] == [
        {"name": "Home", "category": "Docs", "url": "/"},
        {"name": "Settings"},
        {"email": "e@x", "plan": {"tier": 2}},
        {"groupId": "g1", "size": 5},
        {"previousId": "a"},
        {"name": "Own"},  # the properties' own member wins, never a duplicate key
    ]


async def test_clock_skew_is_corrected_with_sent_at(app: App) -> None:
    now = datetime.now(timezone.utc)
    skewed = now + timedelta(hours=1)  # the device's clock is an hour ahead
    timestamp = skewed - timedelta(minutes=5)
    response = await post(app, "/v1/batch", {
        "batch": [{"type": "track", "event": "e", "userId": "u", "timestamp": timestamp.isoformat()}],
        "sentAt": skewed.isoformat(),
    })

    assert response.status == 200
    [row] = rows(app)
    created = datetime.fromisoformat(row["created_at"])
    assert abs(created - (now - timedelta(minutes=5))) < timedelta(seconds=5)
    assert datetime.fromisoformat(row["original_timestamp"]) == timestamp


async def test_message_ids_give_deterministic_event_ids(app: App) -> None:
    assert event_id_of("ajs-next-abc") == str(uuid.uuid5(MESSAGE_ID_NAMESPACE, "ajs-next-abc"))
    batch = [{"type": "track", "event": "e", "userId": "u", "messageId": "ajs-next-abc"}]
    for _ in range(2):
        assert (await post(app, "/v1/batch", {"batch": batch})).status == 200
    await post(app, "/v1/track", {"event": "e", "userId": "u"})
    first, again, generated = (row["event_id"] for row in rows(app))
    assert first == again == event_id_of("ajs-next-abc")
    assert uuid.UUID(generated).version == 7


@pytest.mark.parametrize(("message", "path", "words"), [
    ({"type": "track", "userId": "u"}, "$.batch[1]", "`event`"),
    ({"type": "track", "event": "e"}, "$.batch[1]", "anonymousId"),
    ({"type": "track", "event": "e", "userId": "u", "properties": [1]}, "$.batch[1].properties", "object"),
    ({"type": "identify", "userId": "u", "traits": "x"}, "$.batch[1].traits", "object"),
    ({"type": "track", "event": 5, "userId": "u"}, "$.batch[1].event", "str"),
    ({"type": "bogus", "userId": "u"}, "$.batch[1].type", ""),
    ({"event": "e", "userId": "u"}, "$.batch[1]", "`type`"),
    ({"type": "track", "event": "e", "userId": "u", "timestamp": "yesterday"}, "$.batch[1].timestamp", ""),
    ({"type": "track", "event": "e", "userId": "u", "context": 1}, "$.batch[1].context", "object"),
    ({"type": "group", "userId": "u"}, "$.batch[1]", "groupId"),
    ({"type": "alias", "userId": "u"}, "$.batch[1]", "previousId"),
    ({"type": "track", "event": "e", "userId": "u", "timestamp": "9999-12-31T23:59:59Z", "sentAt": "0001-01-02T00:00:00Z"},
     "$.batch[1].timestamp", ""),
    ({"type": "track", "event": "e", "userId": "u", "timestamp": "1960-01-01T00:00:00Z"}, "$.batch[1].timestamp", "range"),
    ({"type": "track", "event": " ", "userId": "u"}, "$.batch[1].event", "blank"),
    ({"type": "track", "event": "e", "userId": "u" * 300}, "$.batch[1].userId", "length"),
])
async def test_one_bad_message_refuses_the_whole_batch_naming_it(
    app: App, message: dict[str, object], path: str, words: str
) -> None:
    good = {"type": "track", "event": "ok", "userId": "u"}
    response = await post(app, "/v1/batch", {"batch": [good, message, good]})

    error = await json_error(response, 400)
    assert f"`{path}" in error and words in error
    assert rows(app) == []


@pytest.mark.parametrize("body", [b"", b"[]", b"{", b'{"batch": 3}', b'"x"'])
async def test_malformed_batches_are_400(app: App, body: bytes) -> None:
    await json_error(await post(app, "/v1/batch", None, raw=body), 400)
    assert rows(app) == []


async def test_oversize_messages_and_batches_are_413(make_app: MakeApp) -> None:
    app = await make_app(segment_max_message_bytes=200, segment_max_batch_bytes=1000)
    big = {"type": "track", "event": "e", "userId": "u", "properties": {"x": "y" * 300}}
    small = {"type": "track", "event": "e", "userId": "u"}

    assert "$.batch[1]" in await json_error(await post(app, "/v1/batch", {"batch": [small, big]}), 413)
    assert "SEGMENT_MAX_MESSAGE_BYTES" in await json_error(await post(app, "/v1/track", big), 413)
    assert "SEGMENT_MAX_BATCH_BYTES" in await json_error(await post(app, "/v1/batch", {"batch": [small] * 30}), 413)
    assert rows(app) == []


async def test_gzip_bodies_are_taken(app: App) -> None:
    body = gzip.compress(encode({"batch": [{"type": "track", "event": "e", "userId": "u"}]}))
    response = await post(app, "/v1/batch", None, raw=body, headers={"Content-Encoding": "gzip"})
    assert response.status == 200
    assert len(rows(app)) == 1


async def test_the_write_key_is_an_ingest_key(make_app: MakeApp, keys_file: Path) -> None:
    app = await make_app(keys_file=keys_file)
    message = {"event": "e", "userId": "u"}

    assert (await post(app, "/v1/track", message, basic(SERVER_SECRET))).status == 200
    assert (await post(app, "/v1/batch", {"batch": [{"type": "track", **message}], "writeKey": SERVER_SECRET})).status == 200
    assert (await post(app, "/v1/track", {**message, "writeKey": SERVER_SECRET})).status == 200
    await json_error(await post(app, "/v1/track", message), 401)
    await json_error(await post(app, "/v1/track", message, basic("wrong-key-0123456789")), 401)
    await json_error(await post(app, "/v1/track", {**message, "writeKey": "wrong-key-0123456789"}), 401)
    # A browser key from elsewhere: 403, as on /events.
    await json_error(await post(app, "/v1/track", message, {**basic(BROWSER_SECRET), "Origin": "https://evil.example"}), 403)
    ok = await post(app, "/v1/track", message, {**basic(BROWSER_SECRET), "Origin": "https://shop.example"})
    assert ok.status == 200
    assert ok.headers["Access-Control-Allow-Origin"] == "https://shop.example"
    got = rows(app)
    assert [row["source"] for row in got] == ["backend"] * 3 + ["landing"]
    assert [row["source_key"] for row in got] == ["backend"] * 3 + ["landing"]


async def test_rate_limit_is_429(make_app: MakeApp) -> None:
    app = await make_app(rate_limit=1, rate_burst=2)
    batch = {"batch": [{"type": "track", "event": "e", "userId": "u"}] * 3}
    await json_error(await post(app, "/v1/batch", batch), 429)


@pytest.mark.parametrize(("mode", "ip"), [("true", "10.1.2.3"), ("anonymize", "10.1.2.0"), ("false", None)])
async def test_enrich_ip_modes_on_v1_and_events(make_app: MakeApp, mode: Any, ip: str | None) -> None:
    app = await make_app(enrich_ip=mode, trusted_proxies="127.0.0.1")
    headers = {"X-Forwarded-For": "10.1.2.3", "User-Agent": "ua/1"}
    assert (await post(app, "/v1/track", {"event": "e", "userId": "u"}, headers)).status == 200
    assert (await post(app, "/v1/track", {"event": "e", "userId": "u", "context": {"ip": "1.1.1.1"}}, headers)).status == 200
    assert (await app.post(encode({"event_type": "x", "source": "s", "created_at": "2026-01-01T00:00:00Z"}),
                           headers=headers)).status == 202
    first, own, plain = (msgspec.json.decode(row["context"]) for row in rows(app))
    expected = {"userAgent": "ua/1", **({"ip": ip} if ip else {})}
    assert first == expected and plain == expected
    assert own == {"ip": "1.1.1.1", "userAgent": "ua/1"}  # the sender's own context.ip is kept
    assert all("received_at" in row for row in rows(app))


async def test_a_user_agent_that_is_not_utf8_is_stored_with_replacement_characters_on_v1_and_events(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    app = await make_app()

    async def raw_post(path: bytes, body: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(app.client.server.host, app.client.server.port)
        writer.write(
            b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"User-Agent: bot/\xff\xfe1\r\nContent-Length: " + str(len(body)).encode() + b"\r\n"
            b"Connection: close\r\n\r\n" + body
        )
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return answer.split(b"\r\n", 1)[0]

    with caplog.at_level(logging.INFO):
        v1 = await raw_post(b"/v1/track", encode({"event": "e", "userId": "u"}))
        events = await raw_post(b"/events", encode({"event_type": "x", "source": "s", "created_at": "2026-01-01T00:00:00Z"}))

    assert (v1, events) == (b"HTTP/1.1 200 OK", b"HTTP/1.1 202 Accepted")
    assert [msgspec.json.decode(row["context"])["userAgent"] for row in rows(app)] == ["bot/\ufffd\ufffd1"] * 2
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR or record.exc_info]


async def test_settings_point_analytics_js_at_this_host(app: App) -> None:
    response = await app.client.get("/v1/projects/pk_anything/settings")
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    settings = await response.json()
    segment = settings["integrations"]["Segment.io"]
    assert segment["apiKey"] == "pk_anything"
    assert segment["apiHost"] == f"{app.client.host}:{app.client.port}/v1"
    assert segment["protocol"] == "http"


@pytest.mark.parametrize("path", ["/v1/track", "/v1/page", "/v1/identify", "/v1/group", "/v1/alias", "/v1/batch", "/v1/t"])
@pytest.mark.parametrize("body", [
    b"null", b"[]", b"{}", b'{"batch": null}', b'{"batch": [null]}', b'{"batch": [{"type": "track"}], "context": []}',
    b'{"userId": {"a": 1}}', b'{"userId": 1.5}', b'{"timestamp": 5, "userId": "u"}', b"\xff\xfe", b'{"writeKey": 3}',
    b'{"properties": {"a": 1}, "traits": "x", "userId": "u", "event": "e", "groupId": "g", "previousId": "p"}',
    b'{"userId": "u", "event": "e", "properties": {"deep": ' + b"[" * 200 + b"]" * 200 + b"}}",
])
async def test_garbage_is_a_4xx_naming_something_never_a_500(app: App, path: str, body: bytes) -> None:
    response = await post(app, path, None, raw=body)
    assert response.status in (200, 400, 413), await response.text()
    if response.status != 200:
        payload = await response.json()
        assert payload["success"] is False and payload["message"] == payload["error"] and payload["code"]


async def test_invalid_utf8_inside_a_member_kept_as_text_is_a_400_naming_it(app: App) -> None:
    # msgspec checks the UTF-8 of what it decodes, not of what it keeps as Raw text.
    good = b'{"type":"track","event":"e","userId":"u"}'
    for body, path in [
        (b'{"batch":[' + good + b',{"type":"track","event":"e","userId":"u","properties":{"a":"\xff"}}]}',
         "$.batch[1].properties"),
        (b'{"batch":[{"type":"identify","userId":"u","traits":{"\xff":1}}]}', "$.batch[0].traits"),
        (b'{"batch":[{"type":"track","event":"e","userId":"u","context":{"a":"\xff"}}]}', "$.batch[0].context"),
        (b'{"batch":[' + good + b'],"context":{"a":"\xff"}}', "$.context"),
    ]:
        assert f"`{path}`" in await json_error(await post(app, "/v1/batch", None, raw=body), 400)
    response = await post(app, "/v1/track", None, raw=b'{"event":"e","userId":"u","properties":{"a":"\xff"}}')
    assert "`$.properties`" in await json_error(response, 400)
    assert rows(app) == []


@pytest.mark.parametrize(("batch", "path", "status"), [
    # A bad member of an early message is named before a later message that fails to decode...
    ([{"type": "track", "event": " ", "userId": "u"}, {"type": "track", "event": 5, "userId": "u"}],
     "$.batch[1].event", 400),
    # ...or is too large; and the other way round.
    ([{"type": "track", "event": "e"}, {"type": "track", "event": "e", "userId": "u", "properties": {"x": "y" * 300}}],
     "$.batch[1]`", 400),
    ([{"type": "track", "event": "e", "userId": "u", "properties": {"x": "y" * 300}}, {"type": "track", "event": "e"}],
     "$.batch[1]`", 413),
])
async def test_the_first_bad_message_is_the_one_named(
    make_app: MakeApp, batch: list[dict[str, object]], path: str, status: int
) -> None:
    app = await make_app(segment_max_message_bytes=200)
    good = {"type": "track", "event": "ok", "userId": "u", "timestamp": "2026-01-01T00:00:00Z", "properties": {}}
    error = await json_error(await post(app, "/v1/batch", {"batch": [good, *batch]}), status)
    assert f"`{path}" in error
    assert rows(app) == []


# -- the common path gives the general path's rows ----------------------------------------------------

RECEIVED_AT = datetime(2026, 3, 4, 5, 6, 7, 891234, tzinfo=timezone.utc)
SENT_AT = "2026-03-04T06:06:00.5Z"  # the sender's clock, an hour ahead
REQUEST_CONTEXT = (b'"ip":"10.1.2.3"', b'"userAgent":"sdk/1"')
LIMITS = BatchLimits(max_message_bytes=32 * 1024, max_events=10_000)


def track(index: int, **members: object) -> dict[str, object]:
    message: dict[str, object] = {
        "type": "track", "event": f"Event {index}", "userId": f"user_{index}", "messageId": str(uuid.uuid4()),
        "timestamp": f"2026-03-04T06:0{index % 10}:00.{index:03d}Z",
        "properties": {"n": index, "nested": {"list": [1, "two", None]}, "text": "naïve \"quoted\" \u2603"},
    }
    message.update(members)
    return {name: value for name, value in message.items() if value is not ...}  # `...`: leave the member out


def request_facts(request_context: tuple[bytes, bytes] = REQUEST_CONTEXT) -> RequestFacts:
    return RequestFacts(RECEIVED_AT, "backend", "backend", request_context)


# What the request brings beside its messages: the batch's sentAt and context, the ip and userAgent.
SENDERS = {
    "sent": ({"sentAt": SENT_AT}, REQUEST_CONTEXT),
    "unsent": ({}, REQUEST_CONTEXT),
    "batch-context": ({"sentAt": SENT_AT, "context": {"library": {"name": "batch"}}}, REQUEST_CONTEXT),
    "no-ip": ({"sentAt": SENT_AT}, (b"", REQUEST_CONTEXT[1])),
    "nothing-to-add": ({"sentAt": SENT_AT}, (b"", b"")),
}


def both_paths(body: bytes, request: RequestFacts, limits: BatchLimits = LIMITS) -> tuple[bytes | None, bytes, bytes]:
    """The rows of the common path (None when it does not take the batch), of the endpoint's
    choice, and of the general path alone, message by message: each as JSONEachRow."""
    mapper = MessageMapper()
    lines = msgspec.json.Encoder().encode_lines
    common_batch = mapper.decode_common(body)
    common = None
    if common_batch is not None:
        facts = mapper.batch_facts(request, common_batch.sentAt, common_batch.context)
        common = mapper.common_rows(CommonMembers.of(common_batch.batch), facts)
    chosen = mapper.batch_rows(body, limits, request)
    general = mapper.general_batch_rows(body, limits, request)
    return (lines(common) if common is not None else None), lines(chosen), lines(general)


def batch_body(batch: list[dict[str, object]], sender: str) -> tuple[bytes, RequestFacts]:
    envelope, request_context = SENDERS[sender]
    return encode({"batch": batch, **envelope}), request_facts(request_context)


COMMON_BATCHES: dict[str, list[dict[str, object]]] = {
    "uuid messageIds": [track(index) for index in range(20)],
    "upper-case uuids": [track(index, messageId=str(uuid.uuid4()).upper()) for index in range(5)],
    "non-uuid, near-uuid and absent messageIds": [
        track(0, messageId="ajs-next-0123456789abcdef0123456789abcdef"), track(1, messageId=...),
        track(2, messageId="0123456789abcdef0123456789abcdef"), track(3, messageId="0123456-89ab-cdef-0123-456789abcdef0"),
        track(4, messageId=str(uuid.uuid4()).replace("-", "_")), track(5, messageId="é" * 36), track(6, messageId=""),
    ],
    "a sentAt on every message": [track(index, sentAt=f"2026-03-04T0{index}:00:00+0{index}:00") for index in range(5)],
    "anonymous, both ids, unicode, offsets": [
        track(0, userId=..., anonymousId="anon-0"), track(1, anonymousId="anon-1"),
        track(2, event="Ünïcödé ☃", timestamp="2026-03-04T08:00:00.123456+02:00"),
        track(3, properties={}), track(4, properties={"a": {"b": {"c": [[], {}]}}, "big": 12345678901234567890}),
    ],
    "a server SDK's context on each": [
        track(index, anonymousId=None, integrations={}, context={"library": {"name": "analytics-python", "version": "2"}})
        for index in range(5)
    ],
    "analytics.js's context on each, its userAgent in it": [
        track(index, messageId=f"ajs-next-{index:032x}", anonymousId=f"anon-{index}", sentAt="2026-03-04T06:06:00Z",
              context={"userAgent": "Mozilla/5.0 \"quoted\"", "page": {"path": "/", "title": "Ünï ☃"}, "locale": "en"})
        for index in range(5)
    ],
    "contexts with their own ip and userAgent": [
        track(index, context={"ip": None, "userAgent": f"own/{index}", "n": index}) for index in range(3)
    ],
}


@pytest.mark.parametrize("name", sorted(COMMON_BATCHES))
@pytest.mark.parametrize("sender", sorted(SENDERS))
def test_the_common_path_takes_common_batches_and_gives_the_general_rows(name: str, sender: str) -> None:
    common, chosen, general = both_paths(*batch_body(COMMON_BATCHES[name], sender))
    assert common is not None, "the common path declined"
    assert common == chosen == general


@pytest.mark.parametrize("context", [b'{ "locale": "en"}', b'{\n"locale":"en"}', b'{"locale" :\t"en" }', b"{ }"])
@pytest.mark.parametrize("request_context", [REQUEST_CONTEXT, (b"", b"")], ids=["enriched", "plain"])
def test_contexts_with_white_space_give_the_general_rows(context: bytes, request_context: tuple[bytes, bytes]) -> None:
    message = b'{"type":"track","event":"e","userId":"u","timestamp":"2026-03-04T06:00:00Z","properties":{},"context":'
    body = b'{"batch":[' + message + context + b"}," + message + b'{"locale":"en"}}]}'
    _, chosen, general = both_paths(body, request_facts(request_context))
    assert chosen == general
    assert msgspec.json.decode(general.splitlines()[0])["context"].endswith(context[1:].lstrip().decode())


def test_the_common_path_keeps_properties_as_sent() -> None:
    body = (b'{"batch":[{"type":"track","event":"e","userId":"u","timestamp":"2026-03-04T06:00:00Z",'
            b'"properties":  {"a" : [1, 2],\n "b":"\\u2603"}  }]}')
    [row] = MessageMapper().batch_rows(body, LIMITS, request_facts())
    assert row.properties == '{"a" : [1, 2],\n "b":"\\u2603"}'


OTHER_BATCHES: dict[str, list[dict[str, object]]] = {
    "every message type": [
        track(0), {"type": "page", "anonymousId": "a", "name": "Home", "category": "Docs", "properties": {"url": "/"}},
        {"type": "screen", "userId": "u", "name": "Settings"}, {"type": "identify", "userId": "u", "traits": {"plan": 2}},
        {"type": "group", "userId": "u", "groupId": 7, "traits": {"size": 5}}, {"type": "alias", "userId": 3, "previousId": "a"},
    ],
    "integer messageIds and userIds": [track(0, messageId=12345), track(1, userId=42), track(2)],
    "contexts of their own, of every shape": [
        track(0, context={"library": {"name": "analytics-python"}}), track(1, context={"ip": "1.1.1.1"}),
        track(2, context={"userAgent": "own/1", "ip": "2.2.2.2"}), track(3), track(4, context={}),
    ],
    "no timestamp, one without a zone": [track(0, timestamp=...), track(1, timestamp="2026-03-04T06:00:00"), track(2)],
    "a sentAt on some": [track(0, sentAt="2026-03-04T06:00:00Z"), track(1)],
    "a sentAt without a zone": [track(0, sentAt="2026-03-04T06:00:00"), track(1, sentAt="2026-03-04T06:00:00Z")],
    "no properties, null properties": [track(0, properties=...), track(1, properties=None), track(2)],
    "an empty userId beside an anonymousId": [track(0, userId="", anonymousId="a"), track(1)],
    "a null context": [track(0, context=None), track(1)],
    "a context on some": [track(0, context={"library": {"name": "x"}}), track(1)],
    "a userAgent in some contexts": [track(0, context={"userAgent": "own/1"}), track(1, context={"locale": "en"})],
    "an ip in some contexts": [track(0, context={"ip": "1.1.1.1"}), track(1, context={"locale": "en"})],
    "an empty context": [track(0, context={}), track(1, context={"locale": "en"})],
    "the same text as both ids": [track(0, userId="same", anonymousId="same")],
}


@pytest.mark.parametrize("name", sorted(OTHER_BATCHES))
@pytest.mark.parametrize("sender", ["sent", "unsent"])
def test_other_batches_take_the_general_path(name: str, sender: str) -> None:
    common, chosen, general = both_paths(*batch_body(OTHER_BATCHES[name], sender))
    assert chosen == general
    if name != "the same text as both ids":  # which path takes that one is msgspec's business
        assert common is None, "the common path took an uncommon batch"


@pytest.mark.parametrize("message", [
    {"event": " "}, {"event": ""}, {"event": "e" * 257}, {"userId": ...}, {"userId": "u" * 257},
    {"timestamp": "1960-01-01T00:00:00Z"}, {"timestamp": "2106-01-01T00:00:00Z"},
    {"timestamp": "1970-01-02T00:30:00Z"}, {"properties": [1]},
    {"properties": "x"}, {"sentAt": "0001-01-02T00:00:00Z", "timestamp": "9999-12-31T23:59:59Z"}, {"type": "bogus"},
])
def test_the_common_path_declines_a_batch_the_general_path_refuses(message: dict[str, object]) -> None:
    body, request = batch_body([track(0), track(1, **message)], "sent")
    mapper = MessageMapper()
    common_batch = mapper.decode_common(body)
    assert common_batch is None or mapper.common_rows(CommonMembers.of(common_batch.batch), mapper.batch_facts(
        request, common_batch.sentAt, common_batch.context)) is None
    with pytest.raises(Invalid, match=r"\$\.batch\[1\]"):
        mapper.batch_rows(body, LIMITS, request)


def outcome(run: Callable[[], list[Row]]) -> bytes | str:
    """The rows, or the error."""
    try:
        return msgspec.json.Encoder().encode_lines(run())
    except Invalid as invalid:
        return f"{invalid.status} {invalid}"


def test_every_message_over_the_limit_is_refused_whatever_it_is_made_of() -> None:
    # The common path skips measuring each message when their members prove none can be over
    # SEGMENT_MAX_MESSAGE_BYTES: white space, ignored members and escapes are what they cannot see.
    rng = random.Random(20260304)
    limits = BatchLimits(max_message_bytes=4000, max_events=10_000)
    for _ in range(300):
        batch = []
        for index in range(rng.choice([1, 2, 5, 20])):
            message = track(index, properties={"text": "x" * rng.randrange(0, 3000)})
            if rng.random() < 0.2:
                message["integrations"] = {"All": "y" * rng.randrange(0, 3000)}
            if rng.random() < 0.2:
                message["context"] = {"library": {"name": "é" * rng.randrange(0, 1500)}}
            if rng.random() < 0.1:
                message["sentAt"] = "2026-03-04T06:06:00Z"
            batch.append(message)
        body = encode({"batch": batch, "sentAt": SENT_AT})
        if rng.random() < 0.3:  # white space, in a message or between them
            cut = rng.randrange(len(body) // 2, len(body))
            cut = body.rindex(b",", 0, cut) + 1
            body = body[:cut] + b" " * rng.randrange(0, 3000) + body[cut:]
        if rng.random() < 0.2:  # escapes: six bytes a character
            body = body.replace(b'"x', b'"\\u0078', rng.randrange(0, 20))
        raw_messages = msgspec.json.decode(body, type=Envelope).batch
        mapper = MessageMapper()
        chosen = outcome(lambda: mapper.batch_rows(body, limits, request_facts()))
        assert chosen == outcome(lambda: mapper.general_batch_rows(body, limits, request_facts()))
        too_large = max(map(len, raw_messages)) > limits.max_message_bytes
        assert isinstance(chosen, str) == too_large and (not too_large or chosen.startswith("413 ")), chosen


def random_message(rng: random.Random, index: int) -> dict[str, object]:
    """A track message of the common shape, one member in fifteen of another value, right or wrong."""
    message = track(index)
    choices: dict[str, list[object]] = {
        "type": ["page", "identify", "group", "alias", "screen", "bogus", ...],
        "event": [" ", "", "e" * 257, 5, None, ..., "Ünï ☃"],
        "userId": ["", 42, "u" * 257, None, ..., {"a": 1}],
        "anonymousId": ["a", "", 7, None],
        "messageId": [str(uuid.uuid4()).upper(), "ajs-next-1", "", 12345, None, ..., "m" * 300],
        "timestamp": ["2026-03-04T06:00:00", "1960-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "1970-01-02T00:10:00Z", 5, ...],
        "sentAt": ["2026-03-04T07:00:00Z", "2026-03-04T07:00:00", "0001-01-02T00:00:00Z", "bad"],
        "properties": [{}, None, [1], "x", ..., {"name": "own", "groupId": "g"}],
        "traits": [{"plan": 1}, "x", None],
        "context": [{"library": {"name": "x"}}, {"ip": "9.9.9.9"}, {"userAgent": "own"}, {}, None, [], "x"],
        "name": ["Home", 5, None], "groupId": ["g", 7], "previousId": ["p", 8], "integrations": [{"All": True}],
    }
    for member, values in choices.items():
        if rng.random() < 1 / 15:
            message[member] = rng.choice(values)
    return {name: value for name, value in message.items() if value is not ...}


def test_random_batches_get_the_same_rows_or_the_same_error_on_either_path() -> None:
    rng = random.Random(20260305)
    limits = BatchLimits(max_message_bytes=1500, max_events=30)
    for _ in range(1500):
        envelope: dict[str, object] = {"batch": [random_message(rng, index) for index in range(rng.choice([0, 1, 3, 10, 31]))]}
        if rng.random() < 0.7:
            envelope["sentAt"] = rng.choice([SENT_AT, "2026-03-04T06:06:00", "bad"])
        if rng.random() < 0.2:
            envelope["context"] = rng.choice([{"library": {"name": "batch"}}, [], {"ip": "1.2.3.4"}])
        body = encode(envelope)
        request = request_facts(rng.choice([REQUEST_CONTEXT, (b"", REQUEST_CONTEXT[1]), (b"", b"")]))
        mapper = MessageMapper()
        assert outcome(lambda: mapper.batch_rows(body, limits, request)) == outcome(
            lambda: mapper.general_batch_rows(body, limits, request)
        ), body


@pytest.mark.parametrize("count", [1, 20])
@pytest.mark.parametrize("padding", [b"", b" ", b'"integrations":{},', b'"version":2 ,\n'])
def test_a_message_one_byte_over_the_limit_is_refused(count: int, padding: bytes) -> None:
    # Every text at its longest: the bound on each message's size is then at its tightest.
    batch = [track(index, event="e" * MAX_NAME_LENGTH, userId="u" * MAX_USER_ID_LENGTH,
                   anonymousId="a" * MAX_USER_ID_LENGTH, messageId=f"{index:0256d}") for index in range(count)]
    body = encode({"batch": batch})
    last = body.rindex(b'{"type"')
    body = body[:last + 1] + padding + body[last + 1:]  # in the last message only
    sizes = [len(raw) for raw in msgspec.json.decode(body, type=Envelope).batch]
    longest = max(sizes)
    mapper = MessageMapper()
    assert len(mapper.batch_rows(body, BatchLimits(longest, 10_000), request_facts())) == count
    first_over = sizes.index(longest)
    with pytest.raises(Invalid, match=rf"larger than {longest - 1} bytes .* at `\$\.batch\[{first_over}\]`") as refused:
        mapper.batch_rows(body, BatchLimits(longest - 1, 10_000), request_facts())
    assert refused.value.status == 413


def test_event_ids_of_is_event_id_of_each() -> None:
    uuids = [str(uuid.uuid4()) for _ in range(50)]
    cases = [
        uuids, [text.upper() for text in uuids], [], [uuids[0]], [None, uuids[0]], [1, uuids[0]],
        uuids[:3] + ["not-a-uuid"], [uuids[0][:35], uuids[1] + "0"], [uuids[0][:35] + "\n", uuids[1]],
        [uuids[0].replace("-", "0", 1), uuids[1][:8] + "-" + uuids[1][9:]], [uuids[0][:-1] + "g"],
        ["0123456789abcdef0123456789abcdef"], [uuids[0][:8] + "\n" + uuids[0][9:]], ["-" * 36], ["\n" * 36],
    ]
    for ids in cases:
        assert event_ids_of(list(ids)) == [event_id_of(message_id) or "" for message_id in ids], ids


def test_uuid5_event_ids_are_python_uuid5() -> None:
    for name in ["ajs-next-0123456789abcdef", "", "é☃", "x" * 1000, "12345", str(uuid.uuid4()).upper()[:35]]:
        assert event_id_of(name) == str(uuid.uuid5(MESSAGE_ID_NAMESPACE, name))


def test_a_common_message_has_the_members_of_a_message() -> None:
    # Each the same type or a narrower one: a message the common path takes, the general path takes alike.
    assert set(CommonMessage.__struct_fields__) == set(Message.__struct_fields__)
