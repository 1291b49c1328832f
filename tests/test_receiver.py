"""Unit tests for clickpulse.receiver: the HTTP routes and acknowledgement modes, with a fake
Batcher behind them and, for the spool cases, a real Spool on tmp_path."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import msgspec
import pytest
from aiohttp.test_utils import TestClient

from clickpulse import receiver as receiver_module
from clickpulse.memory_limit import MemoryLimit
from clickpulse.messages import Delivery, RowsRejected
from clickpulse.metrics import PipelineMetrics
from clickpulse.receiver import Receiver
from clickpulse.spool import LEDGER_NAME, Spool, scan_segment, segment_name

MAX_BODY_BYTES = 4096
MAX_BATCH_EVENTS = 5
MEMORY_CAPACITY = 20
ACK_TIMEOUT = 0.1
CREATED_AT = "2024-05-06T07:08:09Z"


def event_object(index: int = 0, **fields: object) -> dict[str, object]:
    event: dict[str, object] = {"event_type": f"type_{index}", "source": "web", "created_at": CREATED_AT}
    event.update(fields)
    return event


def encode(payload: object) -> bytes:
    return msgspec.json.encode(payload)


def ndjson(events: list[dict[str, object]]) -> bytes:
    return b"".join(encode(event) + b"\n" for event in events)


def event_types(rows: bytes) -> list[str]:
    return [msgspec.json.decode(line)["event_type"] for line in rows.splitlines()]


@dataclass
class FakeBatcher:
    """Stands in for Batcher.put (records each Delivery) and Service.not_ready_reason.
    `on_put`, when set, runs on every delivery: a test's stand-in for the Writer's confirmation."""

    not_ready: str | None = None
    deliveries: list[Delivery] = field(default_factory=list)
    on_put: Callable[[Delivery], None] | None = None
    arrival: asyncio.Event = field(default_factory=asyncio.Event)

    def put(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)
        self.arrival.set()
        if self.on_put is not None:
            self.on_put(delivery)

    def not_ready_reason(self) -> str | None:
        return self.not_ready

    @property
    def submitted_types(self) -> list[list[str]]:
        return [event_types(delivery.rows) for delivery in self.deliveries]

    async def wait_for_deliveries(self, count: int, timeout: float = 1.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.deliveries) < count:
                self.arrival.clear()
                await self.arrival.wait()


@dataclass
class App:
    client: TestClient
    pipeline: FakeBatcher
    receiver: Receiver
    metrics: PipelineMetrics
    memory: MemoryLimit
    spool: Spool | None

    async def post(self, body: bytes, content_type: str | None = "application/json", query: str = "", **kwargs: object) -> aiohttp.ClientResponse:
        url = "/events" + (f"?{query}" if query else "")
        if content_type is None:
            return await self.client.post(url, data=body, skip_auto_headers={"Content-Type"}, **kwargs)
        return await self.client.post(url, data=body, headers={"Content-Type": content_type}, **kwargs)

    async def metrics_text(self) -> str:
        response = await self.client.get("/metrics")
        assert response.status == 200
        return await response.text()


MakeApp = Callable[..., Awaitable[App]]


@pytest.fixture
async def make_app(aiohttp_client: Callable[..., Awaitable[TestClient]]) -> AsyncIterator[MakeApp]:
    built: list[App] = []
    spool_tasks: list[asyncio.Task[None]] = []

    async def make(
        *,
        ack_mode: str = "memory",
        ack_timeout: float = ACK_TIMEOUT,
        memory_capacity: int = MEMORY_CAPACITY,
        spool_dir: Path | None = None,
        spool_max_bytes: int = 1 << 20,
    ) -> App:
        pipeline = FakeBatcher()
        metrics = PipelineMetrics()
        memory = MemoryLimit(memory_capacity)
        spool = None
        if spool_dir is not None:
            spool = Spool(
                directory=spool_dir,
                max_bytes=spool_max_bytes,
                segment_bytes=1 << 20,
                memory=memory,
                deliver=pipeline.put,
                metrics=metrics.spool,
            )
            spool.open()
            spool_tasks.append(asyncio.create_task(spool.run()))
        receiver = Receiver(
            max_body_bytes=MAX_BODY_BYTES,
            max_batch_events=MAX_BATCH_EVENTS,
            ack_mode=ack_mode,
            ack_timeout=ack_timeout,
            memory=memory,
            to_batcher=pipeline.put,
            spool=spool,
            not_ready_reason=pipeline.not_ready_reason,
            metrics=metrics,
        )
        client = await aiohttp_client(receiver.build_app())
        app = App(client, pipeline, receiver, metrics, memory, spool)
        built.append(app)
        return app

    yield make
    for task in spool_tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    for app in built:
        if app.spool is not None:
            app.spool.close()
        # Whatever a test did, nothing may have ended in a 500.
        assert 'status="500"' not in app.metrics.render().decode()


@pytest.fixture
async def app(make_app: MakeApp) -> App:
    return await make_app()


@pytest.fixture
def short_enqueue_wait(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(receiver_module, "ENQUEUE_WAIT_SECONDS", 0.05)
    return 0.05


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


async def test_one_request_is_one_delivery_of_encoded_rows_reserved_in_the_memory_limit(app: App) -> None:
    before = asyncio.get_running_loop().time()

    response = await app.post(encode([event_object(index) for index in range(4)]))

    assert response.status == 202
    [delivery] = app.pipeline.deliveries
    assert delivery.count == 4
    assert delivery.rows.endswith(b"\n") and len(delivery.rows.splitlines()) == 4
    assert all(msgspec.json.decode(line)["event_id"] for line in delivery.rows.splitlines())
    assert delivery.position is None  # no spool
    assert delivery.confirmation is None  # ack=memory: nobody waits for ClickHouse
    assert before <= delivery.received_at <= asyncio.get_running_loop().time()
    # Held until the Writer releases it once ClickHouse confirmed the rows.
    assert app.memory.held == 4


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
    assert app.pipeline.deliveries[0].count == MAX_BATCH_EVENTS


# -- refused ----------------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["application/xml", "multipart/form-data; boundary=x", "application/octet-stream"])
async def test_other_content_type_is_415(app: App, content_type: str) -> None:
    response = await app.post(encode(event_object()), content_type)

    await json_error(response, 415)
    assert app.pipeline.deliveries == []


async def test_body_over_limit_with_content_length_is_413(app: App) -> None:
    body = encode([event_object(0, user_id="x" * MAX_BODY_BYTES)])

    response = await app.post(body)

    message = await json_error(response, 413)
    assert "MAX_BODY_BYTES" in message
    assert app.pipeline.deliveries == []


async def test_body_over_limit_sent_chunked_is_413(app: App) -> None:
    body = encode([event_object(0, user_id="x" * MAX_BODY_BYTES)])

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: Transfer-Encoding chunked
        for start in range(0, len(body), 512):
            yield body[start : start + 512]

    response = await app.client.post("/events", data=chunks(), headers={"Content-Type": "application/json"})

    await json_error(response, 413)
    assert app.pipeline.deliveries == []


async def test_body_under_limit_sent_chunked_is_accepted(app: App) -> None:
    body = encode([event_object(index) for index in range(3)])

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 16):
            yield body[start : start + 16]

    response = await app.client.post("/events", data=chunks(), headers={"Content-Type": "application/json"})

    assert response.status == 202
    assert app.pipeline.submitted_types == [["type_0", "type_1", "type_2"]]


@pytest.mark.parametrize(
    ("encoding", "body"),
    [("gzip", b"this is not gzip"), ("deflate", b"nor deflate")],
    ids=["not-gzip", "not-deflate"],
)
async def test_a_body_that_does_not_decode_as_its_content_encoding_is_400_not_500(
    app: App, encoding: str, body: bytes
) -> None:
    response = await app.client.post(
        "/events", data=body, headers={"Content-Type": "application/json", "Content-Encoding": encoding}
    )

    message = await json_error(response, 400)
    assert encoding in message
    assert app.pipeline.deliveries == []


async def test_a_gzip_body_is_decoded_and_accepted(app: App) -> None:
    body = gzip.compress(encode([event_object(0), event_object(1)]))

    response = await app.client.post(
        "/events", data=body, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
    )

    assert response.status == 202
    assert app.pipeline.submitted_types == [["type_0", "type_1"]]


@pytest.mark.parametrize("as_ndjson", [False, True], ids=["json-array", "ndjson"])
async def test_more_than_max_batch_events_is_413_and_nothing_submitted(app: App, as_ndjson: bool) -> None:
    events = [event_object(index) for index in range(MAX_BATCH_EVENTS + 1)]

    if as_ndjson:
        response = await app.post(ndjson(events), "application/x-ndjson")
    else:
        response = await app.post(encode(events))

    message = await json_error(response, 413)
    assert "MAX_BATCH_EVENTS" in message
    assert app.pipeline.deliveries == []


async def test_invalid_event_at_index_3_is_400_naming_path_and_field(app: App) -> None:
    events = [event_object(index) for index in range(5)]
    events[3]["created_at"] = "2024-05-06T07:08:09"  # no time zone

    response = await app.post(encode(events))

    message = await json_error(response, 400)
    assert "$[3]" in message
    assert "created_at" in message
    assert app.pipeline.deliveries == []


async def test_invalid_ndjson_line_is_400_naming_its_index(app: App) -> None:
    events = [event_object(index) for index in range(3)]
    del events[2]["source"]

    response = await app.post(ndjson(events), "application/x-ndjson")

    message = await json_error(response, 400)
    assert "$[2]" in message
    assert "source" in message
    assert app.pipeline.deliveries == []


@pytest.mark.parametrize(
    "body",
    [b"{", b"[{]", b'{"event_type": "a",}', b"not json", b"\xff\xfe\x00", b'{"event_type":"a"} trailing'],
    ids=["unclosed", "bad-array", "trailing-comma", "text", "binary", "trailing-garbage"],
)
async def test_malformed_json_is_400(app: App, body: bytes) -> None:
    response = await app.post(body)

    await json_error(response, 400)
    assert app.pipeline.deliveries == []


@pytest.mark.parametrize("body", [b"", b"   \n\t "], ids=["empty", "whitespace"])
@pytest.mark.parametrize("content_type", ["application/json", "application/x-ndjson"])
async def test_empty_body_is_400(app: App, body: bytes, content_type: str) -> None:
    response = await app.post(body, content_type)

    await json_error(response, 400)
    assert app.pipeline.deliveries == []


async def test_full_memory_limit_is_503_with_retry_after_once_the_enqueue_wait_ends(
    app: App, short_enqueue_wait: float
) -> None:
    assert app.memory.try_reserve(MEMORY_CAPACITY - 1)  # the Writer holds all but one event
    started = asyncio.get_running_loop().time()

    response = await app.post(encode([event_object(0), event_object(1)]))

    message = await json_error(response, 503)
    assert "MAX_BUFFER_EVENTS" in message
    assert int(response.headers["Retry-After"]) > 0
    assert asyncio.get_running_loop().time() - started >= short_enqueue_wait - 0.005
    assert app.pipeline.deliveries == []
    assert app.memory.held == MEMORY_CAPACITY - 1  # nothing reserved for the refused request
    assert app.metrics.receiver.requests_rejected.get({"reason": "overloaded"}) == 1
    assert app.metrics.receiver.events_received.get({}) == 0


async def test_request_waiting_for_room_is_accepted_when_room_appears_within_the_wait(app: App) -> None:
    # The real ENQUEUE_WAIT_SECONDS (1 s): room appears long before it ends.
    assert app.memory.try_reserve(MEMORY_CAPACITY)
    posting = asyncio.create_task(app.post(encode(event_object(3))))
    await asyncio.sleep(0.05)
    assert not posting.done()
    assert app.pipeline.deliveries == []

    app.memory.release(MEMORY_CAPACITY)
    response = await posting

    assert response.status == 202
    assert app.pipeline.submitted_types == [["type_3"]]
    assert app.memory.held == 1


async def test_after_stop_intake_post_is_503_and_readyz_is_503(app: App) -> None:
    app.receiver.stop_intake()

    response = await app.post(encode(event_object()))

    await json_error(response, 503)
    assert int(response.headers["Retry-After"]) > 0
    assert app.pipeline.deliveries == []
    ready = await app.client.get("/readyz")
    assert ready.status == 503
    assert "shutting down" in (await ready.json())["reason"]


# -- acknowledgement modes --------------------------------------------------------------------


def confirm_all(delivery: Delivery) -> None:
    """The Writer's part when ClickHouse took every row."""
    assert delivery.confirmation is not None
    delivery.confirmation.set_result(delivery.count)


async def test_ack_clickhouse_answers_200_written_only_once_the_insert_is_confirmed(make_app: MakeApp) -> None:
    app = await make_app(ack_mode="clickhouse", ack_timeout=5.0)

    posting = asyncio.create_task(app.post(encode(event_object(1))))
    await app.pipeline.wait_for_deliveries(1)
    await asyncio.sleep(0.05)
    assert not posting.done()

    [delivery] = app.pipeline.deliveries
    assert delivery.confirmation is not None
    delivery.confirmation.set_result(1)
    response = await posting

    assert response.status == 200
    assert await response.json() == {"status": "written"}


@pytest.mark.parametrize("query", ["wait=true", "wait=1", "wait=yes", "ack=clickhouse", "ack=ClickHouse"])
async def test_wait_or_ack_clickhouse_query_overrides_memory_mode(make_app: MakeApp, query: str) -> None:
    app = await make_app(ack_mode="memory")
    app.pipeline.on_put = confirm_all

    response = await app.post(encode([event_object(index) for index in range(3)]), query=query)

    assert response.status == 200
    assert await response.json() == {"status": "written", "written": 3}


async def test_ack_memory_query_overrides_clickhouse_mode(make_app: MakeApp) -> None:
    app = await make_app(ack_mode="clickhouse")

    response = await app.post(encode(event_object()), query="ack=memory")

    assert response.status == 202
    assert app.pipeline.deliveries[0].confirmation is None


async def test_rows_rejected_by_clickhouse_are_422_with_counts_and_where_they_went(make_app: MakeApp) -> None:
    app = await make_app(ack_mode="clickhouse")

    def reject_one(delivery: Delivery) -> None:
        assert delivery.confirmation is not None
        delivery.confirmation.set_exception(RowsRejected(1, delivery.count - 1, "events_quarantine"))

    app.pipeline.on_put = reject_one

    response = await app.post(encode([event_object(index) for index in range(3)]))

    message = await json_error(response, 422)
    assert "events_quarantine" in message
    payload = await response.json()
    assert (payload["rejected"], payload["written"]) == (1, 2)


async def test_no_confirmation_within_ack_timeout_is_504_and_the_events_stay_queued(make_app: MakeApp) -> None:
    app = await make_app(ack_mode="clickhouse", ack_timeout=0.05)
    started = asyncio.get_running_loop().time()

    response = await app.post(encode(event_object()))

    message = await json_error(response, 504)
    assert "ACK_TIMEOUT" in message
    assert asyncio.get_running_loop().time() - started >= 0.05 - 0.005
    # Accepted into the pipeline all the same: the Writer may still confirm it later.
    [delivery] = app.pipeline.deliveries
    assert delivery.confirmation is not None and not delivery.confirmation.cancelled()
    delivery.confirmation.set_result(1)
    assert app.metrics.receiver.events_received.get({}) == 1


async def test_ack_disk_without_a_spool_is_400_naming_spool_dir(app: App) -> None:
    response = await app.post(encode(event_object()), query="ack=disk")

    message = await json_error(response, 400)
    assert "SPOOL_DIR" in message
    assert app.pipeline.deliveries == []
    assert app.memory.held == 0


@pytest.mark.parametrize("query", ["ack=eventually", "ack=", "ack=disk2"])
async def test_unknown_ack_mode_is_400_listing_the_modes(app: App, query: str) -> None:
    response = await app.post(encode(event_object()), query=query)

    message = await json_error(response, 400)
    assert all(mode in message for mode in ("memory", "disk", "clickhouse"))
    assert app.pipeline.deliveries == []


async def test_unrelated_query_parameters_keep_the_configured_mode(make_app: MakeApp) -> None:
    app = await make_app(ack_mode="clickhouse")
    app.pipeline.on_put = confirm_all

    response = await app.post(encode(event_object()), query="utm_source=x")

    assert response.status == 200


# -- with a spool -----------------------------------------------------------------------------


def spool_records(spool_dir: Path, segment: int = 1) -> list[bytes]:
    data = (spool_dir / segment_name(segment)).read_bytes()
    records, intact = scan_segment(segment, data)
    assert intact == len(data)
    return [record.payload for record in records]


async def test_ack_disk_answers_202_once_the_record_is_fsynced_and_forwards_it(make_app: MakeApp, tmp_path: Path) -> None:
    app = await make_app(ack_mode="disk", spool_dir=tmp_path)

    response = await app.post(encode([event_object(0), event_object(1)]))

    assert response.status == 202
    assert await response.json() == {"status": "accepted", "accepted": 2}
    assert app.metrics.spool.fsync_duration.get({})["count"] >= 1
    [payload] = spool_records(tmp_path)
    assert event_types(payload) == ["type_0", "type_1"]
    await app.pipeline.wait_for_deliveries(1)
    [delivery] = app.pipeline.deliveries
    assert delivery.rows == payload
    assert delivery.position is not None and delivery.position.segment == 1 and delivery.position.offset == 0
    assert app.memory.held == 2  # reserved by the spool as it forwarded the record


async def test_ack_memory_with_a_spool_still_writes_the_record(make_app: MakeApp, tmp_path: Path) -> None:
    app = await make_app(ack_mode="disk", spool_dir=tmp_path)

    response = await app.post(encode(event_object(4)), query="ack=memory")

    assert response.status == 202
    assert [event_types(payload) for payload in spool_records(tmp_path)] == [["type_4"]]


async def test_ack_clickhouse_with_a_spool_carries_the_confirmation_through_it(make_app: MakeApp, tmp_path: Path) -> None:
    app = await make_app(ack_mode="disk", spool_dir=tmp_path)
    app.pipeline.on_put = confirm_all

    response = await app.post(encode(event_object()), query="wait=true")

    assert response.status == 200
    assert await response.json() == {"status": "written"}
    assert app.pipeline.deliveries[0].position is not None


async def test_with_a_spool_a_full_memory_limit_does_not_refuse_the_request(make_app: MakeApp, tmp_path: Path) -> None:
    app = await make_app(ack_mode="disk", spool_dir=tmp_path)
    assert app.memory.try_reserve(MEMORY_CAPACITY)

    response = await app.post(encode(event_object(9)))

    assert response.status == 202
    assert [event_types(payload) for payload in spool_records(tmp_path)] == [["type_9"]]
    await asyncio.sleep(0.02)
    assert app.pipeline.deliveries == []  # waits in the spool for room

    app.memory.release(MEMORY_CAPACITY)
    await app.pipeline.wait_for_deliveries(1)
    assert app.pipeline.submitted_types == [["type_9"]]


async def test_full_spool_is_503_naming_spool_max_bytes(make_app: MakeApp, tmp_path: Path) -> None:
    app = await make_app(ack_mode="disk", spool_dir=tmp_path, spool_max_bytes=200)
    assert (await app.post(encode(event_object(0)))).status == 202  # one record fits

    response = await app.post(encode(event_object(1)))

    message = await json_error(response, 503)
    assert "full" in message and "SPOOL_MAX_BYTES" in message
    assert int(response.headers["Retry-After"]) > 0
    assert [event_types(payload) for payload in spool_records(tmp_path)] == [["type_0"]]
    assert app.metrics.spool.rejected_full.get({}) == 1
    assert app.metrics.receiver.requests_rejected.get({"reason": "overloaded"}) == 1


async def test_unwritable_spool_directory_is_503_naming_the_error(make_app: MakeApp, tmp_path: Path) -> None:
    not_a_directory = tmp_path / "plain-file"
    not_a_directory.write_bytes(b"")
    app = await make_app(ack_mode="disk", spool_dir=not_a_directory / "spool")

    response = await app.post(encode(event_object()))

    message = await json_error(response, 503)
    assert "Not a directory" in message
    assert str(not_a_directory / "spool") in message
    assert int(response.headers["Retry-After"]) > 0
    assert app.pipeline.deliveries == []


async def test_spool_ledger_is_not_touched_by_the_receiver(make_app: MakeApp, tmp_path: Path) -> None:
    # Only the Writer moves the confirmed mark: an acknowledged request stays unconfirmed.
    app = await make_app(ack_mode="disk", spool_dir=tmp_path)

    assert (await app.post(encode(event_object()))).status == 202

    assert (tmp_path / LEDGER_NAME).read_text() == "C 0 0\n"
    assert app.spool is not None and app.spool.unconfirmed_events == 1


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
    assert app.pipeline.deliveries == []


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
