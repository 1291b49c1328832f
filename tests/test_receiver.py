"""Unit tests for clickpulse.receiver: the HTTP routes, with a fake Batcher behind them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import msgspec
import pytest
from aiohttp.test_utils import TestClient

from clickpulse.events import Event
from clickpulse.metrics import PipelineMetrics
from clickpulse.receiver import Receiver

MAX_BODY_BYTES = 4096
MAX_BATCH_EVENTS = 5
CREATED_AT = "2024-05-06T07:08:09Z"


def event_object(index: int = 0, **fields: object) -> dict[str, object]:
    event: dict[str, object] = {"event_type": f"type_{index}", "source": "web", "created_at": CREATED_AT}
    event.update(fields)
    return event


def encode(payload: object) -> bytes:
    return msgspec.json.encode(payload)


def ndjson(events: list[dict[str, object]]) -> bytes:
    return b"".join(encode(event) + b"\n" for event in events)


@dataclass
class FakePipeline:
    """Stands in for Batcher.submit and Service.not_ready_reason."""

    accept: bool = True
    not_ready: str | None = None
    submitted: list[list[Event]] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)

    async def submit(self, events: list[Event], received_at: float, wait: float) -> bool:
        if not self.accept:
            return False
        self.submitted.append(events)
        self.waits.append(wait)
        return True

    def not_ready_reason(self) -> str | None:
        return self.not_ready

    @property
    def submitted_types(self) -> list[list[str]]:
        return [[event.event_type for event in events] for events in self.submitted]


@dataclass
class App:
    client: TestClient
    pipeline: FakePipeline
    receiver: Receiver
    metrics: PipelineMetrics

    async def post(self, body: bytes, content_type: str | None = "application/json", **kwargs: object) -> aiohttp.ClientResponse:
        if content_type is None:
            return await self.client.post("/events", data=body, skip_auto_headers={"Content-Type"}, **kwargs)
        return await self.client.post("/events", data=body, headers={"Content-Type": content_type}, **kwargs)

    async def metrics_text(self) -> str:
        response = await self.client.get("/metrics")
        assert response.status == 200
        return await response.text()


@pytest.fixture
async def app(aiohttp_client: Callable[..., Awaitable[TestClient]]) -> AsyncIterator[App]:
    pipeline = FakePipeline()
    metrics = PipelineMetrics()
    receiver = Receiver(
        max_body_bytes=MAX_BODY_BYTES,
        max_batch_events=MAX_BATCH_EVENTS,
        submit=pipeline.submit,
        not_ready_reason=pipeline.not_ready_reason,
        metrics=metrics,
    )
    client = await aiohttp_client(receiver.build_app())
    yield App(client, pipeline, receiver, metrics)
    # Whatever a test did, nothing may have ended in a 500.
    assert 'status="500"' not in metrics.render().decode()


async def json_error(response: aiohttp.ClientResponse, status: int) -> str:
    """Checks an error response is JSON with an `error` string and returns it."""
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    payload = await response.json()
    assert isinstance(payload, dict)
    assert isinstance(payload.get("error"), str) and payload["error"]
    return payload["error"]


# -- accepted ---------------------------------------------------------------------------------


async def test_single_object_is_accepted(app: App) -> None:
    response = await app.post(encode(event_object(7)))

    assert response.status == 202
    assert await response.json() == {"status": "accepted"}
    assert app.pipeline.submitted_types == [["type_7"]]


async def test_array_is_accepted_with_a_count(app: App) -> None:
    response = await app.post(encode([event_object(index) for index in range(3)]))

    assert response.status == 202
    assert await response.json() == {"status": "accepted", "accepted": 3}
    assert app.pipeline.submitted_types == [["type_0", "type_1", "type_2"]]


async def test_one_request_is_one_submit_with_a_positive_wait(app: App) -> None:
    await app.post(encode([event_object(index) for index in range(4)]))

    assert len(app.pipeline.submitted) == 1
    assert app.pipeline.waits[0] > 0


@pytest.mark.parametrize("content_type", ["application/x-ndjson", "application/ndjson"])
async def test_ndjson_is_accepted(app: App, content_type: str) -> None:
    response = await app.post(ndjson([event_object(index) for index in range(4)]), content_type)

    assert response.status == 202
    assert await response.json() == {"status": "accepted", "accepted": 4}
    assert app.pipeline.submitted_types == [["type_0", "type_1", "type_2", "type_3"]]


async def test_text_plain_body_from_send_beacon_is_accepted(app: App) -> None:
    response = await app.post(encode(event_object(1)), "text/plain;charset=UTF-8")

    assert response.status == 202
    assert app.pipeline.submitted_types == [["type_1"]]


async def test_json_with_charset_parameter_is_accepted(app: App) -> None:
    response = await app.post(encode(event_object(1)), "application/json; charset=utf-8")

    assert response.status == 202


async def test_body_without_content_type_is_accepted(app: App) -> None:
    response = await app.post(encode([event_object(1), event_object(2)]), content_type=None)

    assert response.status == 202
    assert app.pipeline.submitted_types == [["type_1", "type_2"]]


async def test_exactly_max_batch_events_is_accepted(app: App) -> None:
    response = await app.post(encode([event_object(index) for index in range(MAX_BATCH_EVENTS)]))

    assert response.status == 202
    assert len(app.pipeline.submitted[0]) == MAX_BATCH_EVENTS


# -- refused ----------------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["application/xml", "multipart/form-data; boundary=x", "application/octet-stream"])
async def test_other_content_type_is_415(app: App, content_type: str) -> None:
    response = await app.post(encode(event_object()), content_type)

    await json_error(response, 415)
    assert app.pipeline.submitted == []


async def test_body_over_limit_with_content_length_is_413(app: App) -> None:
    body = encode([event_object(0, user_id="x" * MAX_BODY_BYTES)])

    response = await app.post(body)

    message = await json_error(response, 413)
    assert "MAX_BODY_BYTES" in message
    assert app.pipeline.submitted == []


async def test_body_over_limit_sent_chunked_is_413(app: App) -> None:
    body = encode([event_object(0, user_id="x" * MAX_BODY_BYTES)])

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: Transfer-Encoding chunked
        for start in range(0, len(body), 512):
            yield body[start : start + 512]

    response = await app.client.post("/events", data=chunks(), headers={"Content-Type": "application/json"})

    await json_error(response, 413)
    assert app.pipeline.submitted == []


async def test_body_under_limit_sent_chunked_is_accepted(app: App) -> None:
    body = encode([event_object(index) for index in range(3)])

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 16):
            yield body[start : start + 16]

    response = await app.client.post("/events", data=chunks(), headers={"Content-Type": "application/json"})

    assert response.status == 202
    assert app.pipeline.submitted_types == [["type_0", "type_1", "type_2"]]


@pytest.mark.parametrize("as_ndjson", [False, True], ids=["json-array", "ndjson"])
async def test_more_than_max_batch_events_is_413_and_nothing_submitted(app: App, as_ndjson: bool) -> None:
    events = [event_object(index) for index in range(MAX_BATCH_EVENTS + 1)]

    if as_ndjson:
        response = await app.post(ndjson(events), "application/x-ndjson")
    else:
        response = await app.post(encode(events))

    message = await json_error(response, 413)
    assert "MAX_BATCH_EVENTS" in message
    assert app.pipeline.submitted == []


async def test_invalid_event_at_index_3_is_400_naming_path_and_field(app: App) -> None:
    events = [event_object(index) for index in range(5)]
    events[3]["created_at"] = "2024-05-06T07:08:09"  # no time zone

    response = await app.post(encode(events))

    message = await json_error(response, 400)
    assert "$[3]" in message
    assert "created_at" in message
    assert app.pipeline.submitted == []


async def test_invalid_ndjson_line_is_400_naming_its_index(app: App) -> None:
    events = [event_object(index) for index in range(3)]
    del events[2]["source"]

    response = await app.post(ndjson(events), "application/x-ndjson")

    message = await json_error(response, 400)
    assert "$[2]" in message
    assert "source" in message
    assert app.pipeline.submitted == []


@pytest.mark.parametrize(
    "body",
    [b"{", b"[{]", b'{"event_type": "a",}', b"not json", b"\xff\xfe\x00", b'{"event_type":"a"} trailing'],
    ids=["unclosed", "bad-array", "trailing-comma", "text", "binary", "trailing-garbage"],
)
async def test_malformed_json_is_400(app: App, body: bytes) -> None:
    response = await app.post(body)

    await json_error(response, 400)
    assert app.pipeline.submitted == []


@pytest.mark.parametrize("body", [b"", b"   \n\t "], ids=["empty", "whitespace"])
@pytest.mark.parametrize("content_type", ["application/json", "application/x-ndjson"])
async def test_empty_body_is_400(app: App, body: bytes, content_type: str) -> None:
    response = await app.post(body, content_type)

    await json_error(response, 400)
    assert app.pipeline.submitted == []


async def test_submit_refused_is_503_with_retry_after(app: App) -> None:
    app.pipeline.accept = False

    response = await app.post(encode(event_object()))

    await json_error(response, 503)
    assert int(response.headers["Retry-After"]) > 0


async def test_after_stop_intake_post_is_503_and_readyz_is_503(app: App) -> None:
    app.receiver.stop_intake()

    response = await app.post(encode(event_object()))

    await json_error(response, 503)
    assert int(response.headers["Retry-After"]) > 0
    assert app.pipeline.submitted == []
    ready = await app.client.get("/readyz")
    assert ready.status == 503
    assert "shutting down" in (await ready.json())["reason"]


# -- routing errors ---------------------------------------------------------------------------


async def test_get_events_is_405_with_allow_header_and_json(app: App) -> None:
    response = await app.client.get("/events")

    await json_error(response, 405)
    assert "POST" in response.headers["Allow"]


async def test_unknown_path_is_404_json(app: App) -> None:
    response = await app.client.get("/nope")

    await json_error(response, 404)


async def test_post_to_unknown_path_is_404_json(app: App) -> None:
    response = await app.client.post("/events/extra", data=encode(event_object()))

    await json_error(response, 404)
    assert app.pipeline.submitted == []


# -- health -----------------------------------------------------------------------------------


async def test_healthz_is_200_ok(app: App) -> None:
    response = await app.client.get("/healthz")

    assert response.status == 200
    assert await response.json() == {"status": "ok"}


async def test_healthz_stays_ok_while_not_ready(app: App) -> None:
    app.pipeline.not_ready = "clickhouse not reachable"

    response = await app.client.get("/healthz")

    assert response.status == 200


async def test_readyz_is_200_when_ready(app: App) -> None:
    response = await app.client.get("/readyz")

    assert response.status == 200
    assert (await response.json())["status"] == "ready"


async def test_readyz_is_503_with_the_reason_when_not_ready(app: App) -> None:
    app.pipeline.not_ready = "clickhouse not reachable: connection: refused"

    response = await app.client.get("/readyz")

    assert response.status == 503
    assert (await response.json())["reason"] == "clickhouse not reachable: connection: refused"


async def test_readyz_follows_the_reason_as_it_changes(app: App) -> None:
    app.pipeline.not_ready = "writer actor is not running"
    assert (await app.client.get("/readyz")).status == 503

    app.pipeline.not_ready = None
    assert (await app.client.get("/readyz")).status == 200


# -- metrics ----------------------------------------------------------------------------------


async def test_metrics_count_requests_by_route_template_and_status(app: App) -> None:
    for _ in range(2):
        assert (await app.post(encode(event_object()))).status == 202
    assert (await app.post(b"{")).status == 400

    text = await app.metrics_text()

    assert 'http_requests_total{method="POST",path="/events",status="202"} 2' in text
    assert 'http_requests_total{method="POST",path="/events",status="400"} 1' in text
    assert app.metrics.receiver.events_received.get({}) == 2
    assert app.metrics.receiver.requests_rejected.get({"reason": "invalid"}) == 1


async def test_metrics_never_use_request_data_as_label_values(app: App) -> None:
    assert (await app.client.get("/secret-xyz")).status == 404
    assert (await app.client.post("/secret-abc?token=qqq", data=b"{}")).status == 404
    assert (await app.client.request("PROPFIND", "/secret-dav")).status == 404
    assert (await app.post(encode(event_object(0, source="secret-src")), "application/secret-type")).status == 415

    text = await app.metrics_text()

    assert "secret" not in text
    assert "PROPFIND" not in text
    assert "qqq" not in text
    assert 'path="unmatched",status="404"' in text


async def test_metrics_content_type_is_prometheus_text(app: App) -> None:
    response = await app.client.get("/metrics")

    assert response.status == 200
    assert response.content_type == "text/plain"
    assert "# TYPE http_requests_total counter" in await response.text()
