"""POST /events: validation, limits, refusals and the acknowledgement modes."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator

import msgspec
import pytest

from clickpulse.messages import Delivery, PipelineDown, RowsRejected
from tests.http.conftest import (
    MAX_BATCH_EVENTS,
    MAX_BODY_BYTES,
    MEMORY_CAPACITY,
    App,
    MakeApp,
    confirm_all,
    encode,
    event_object,
    json_error,
    ndjson,
)


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


async def test_full_memory_limit_is_503_with_retry_after_once_the_enqueue_wait_ends(make_app: MakeApp) -> None:
    short_enqueue_wait = 0.05
    app = await make_app(enqueue_wait=short_enqueue_wait)
    assert app.memory.try_reserve(MEMORY_CAPACITY - 1, 0)  # the Writer holds all but one event
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
    assert app.memory.try_reserve(MEMORY_CAPACITY, 0)
    posting = asyncio.create_task(app.post(encode(event_object(3))))
    await asyncio.sleep(0.05)
    assert not posting.done()
    assert app.pipeline.deliveries == []

    app.memory.release(MEMORY_CAPACITY, 0)
    response = await posting

    assert response.status == 202
    assert app.pipeline.submitted_types == [["type_3"]]
    assert app.memory.held == 1


async def test_after_stop_intake_post_is_503_and_readyz_is_503(app: App) -> None:
    app.http.stop_intake()

    response = await app.post(encode(event_object()))

    await json_error(response, 503)
    assert int(response.headers["Retry-After"]) > 0
    assert app.pipeline.deliveries == []
    ready = await app.client.get("/readyz")
    assert ready.status == 503
    assert "shutting down" in (await ready.json())["reason"]


# -- acknowledgement modes --------------------------------------------------------------------




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
    app.pipeline.on_delivery = confirm_all

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

    app.pipeline.on_delivery = reject_one

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
    app.pipeline.on_delivery = confirm_all

    response = await app.post(encode(event_object()), query="utm_source=x")

    assert response.status == 200


# -- with a spool -----------------------------------------------------------------------------


# -- when the pipeline dies -------------------------------------------------------------------


async def test_a_request_waiting_for_clickhouse_is_answered_503_at_once_when_an_actor_dies(make_app: MakeApp) -> None:
    app = await make_app(ack_mode="clickhouse", ack_timeout=30.0)
    started = asyncio.get_running_loop().time()
    posting = asyncio.create_task(app.post(encode(event_object())))
    await app.pipeline.wait_for_deliveries(1)

    app.pipeline_down.set_result(None)  # what the supervisor does when an actor dies
    response = await posting

    message = await json_error(response, 503)
    assert "retry" in message
    assert int(response.headers["Retry-After"]) > 0
    assert asyncio.get_running_loop().time() - started < 5.0  # not ACK_TIMEOUT


async def test_a_confirmation_failed_with_pipeline_down_is_503(make_app: MakeApp) -> None:
    app = await make_app(ack_mode="clickhouse", ack_timeout=30.0)
    app.pipeline.on_delivery = lambda delivery: delivery.confirmation.set_exception(  # type: ignore[union-attr]
        PipelineDown("the writer has stopped")
    )

    response = await app.post(encode(event_object()))

    await json_error(response, 503)
    assert int(response.headers["Retry-After"]) > 0
