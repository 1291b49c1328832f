"""POST /events with a real Spool as the intake port."""

from __future__ import annotations

import asyncio
from pathlib import Path


from tests.http.conftest import (
    MEMORY_CAPACITY,
    MakeApp,
    confirm_all,
    encode,
    event_object,
    event_types,
    json_error,
)

from clickpulse.spool import LEDGER_NAME, scan_segment, segment_name


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
    app.pipeline.on_delivery = confirm_all

    response = await app.post(encode(event_object()), query="wait=true")

    assert response.status == 200
    assert await response.json() == {"status": "written"}
    assert app.pipeline.deliveries[0].position is not None


async def test_with_a_spool_a_full_memory_limit_does_not_refuse_the_request(make_app: MakeApp, tmp_path: Path) -> None:
    app = await make_app(ack_mode="disk", spool_dir=tmp_path)
    assert app.memory.try_reserve(MEMORY_CAPACITY, 0)

    response = await app.post(encode(event_object(9)))

    assert response.status == 202
    assert [event_types(payload) for payload in spool_records(tmp_path)] == [["type_9"]]
    await asyncio.sleep(0.02)
    assert app.pipeline.deliveries == []  # waits in the spool for room

    app.memory.release(MEMORY_CAPACITY, 0)
    await app.pipeline.wait_for_deliveries(1)
    assert app.pipeline.submitted_types == [["type_9"]]


async def test_full_spool_is_503_naming_spool_max_bytes(make_app: MakeApp, tmp_path: Path) -> None:
    app = await make_app(ack_mode="disk", spool_dir=tmp_path, spool_max_bytes=400)  # a row, with received_at and context
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


async def test_spool_ledger_is_not_touched_by_the_http_layer(make_app: MakeApp, tmp_path: Path) -> None:
    # Only the Writer moves the confirmed mark: an acknowledged request stays unconfirmed.
    app = await make_app(ack_mode="disk", spool_dir=tmp_path)

    assert (await app.post(encode(event_object()))).status == 202

    assert (tmp_path / LEDGER_NAME).read_text() == "C 0 0\n"
    assert app.intake.unconfirmed_events == 1
