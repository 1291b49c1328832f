"""Unit tests for clickpulse.events: decoding, validation, and the JSONEachRow rows."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import msgspec
import pytest

from clickpulse.events import (
    MAX_PROPERTIES,
    MAX_PROPERTY_KEY_LENGTH,
    MAX_PROPERTY_VALUE_LENGTH,
    SERVER_FIELDS,
    Event,
    EventDecoder,
    EventIds,
    RowEncoder,
    RowStamp,
)

CREATED_AT = "2024-05-06T07:08:09.123Z"


def event_object(**fields: object) -> dict[str, object]:
    """A valid event as a client would POST it, with `fields` replaced (None removes a field)."""
    event: dict[str, object] = {"event_type": "page_view", "source": "web", "created_at": CREATED_AT}
    for name, value in fields.items():
        if value is None:
            event.pop(name, None)
        else:
            event[name] = value
    return event


def encode(payload: object) -> bytes:
    return msgspec.json.encode(payload)


def decode_one(**fields: object) -> Event:
    events, is_array = EventDecoder().decode_json(encode(event_object(**fields)))
    assert not is_array
    assert len(events) == 1
    return events[0]


def decode_error(body: bytes) -> str:
    with pytest.raises(msgspec.DecodeError) as caught:
        EventDecoder().decode_json(body)
    return str(caught.value)


# -- decoding shapes --------------------------------------------------------------------------


def test_decode_json_single_object() -> None:
    events, is_array = EventDecoder().decode_json(
        encode(event_object(user_id="u-1", value=2.5))
    )

    assert is_array is False
    assert len(events) == 1
    event = events[0]
    assert event.event_type == "page_view"
    assert event.source == "web"
    assert event.created_at == datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=timezone.utc)
    assert event.user_id == "u-1"
    assert event.value == 2.5


def test_decode_json_array_keeps_order() -> None:
    body = encode([event_object(event_type=f"type_{index}") for index in range(5)])

    events, is_array = EventDecoder().decode_json(body)

    assert is_array is True
    assert [event.event_type for event in events] == [f"type_{index}" for index in range(5)]


def test_decode_json_array_with_leading_whitespace() -> None:
    events, is_array = EventDecoder().decode_json(b"  \n[" + encode(event_object()) + b"]")

    assert is_array is True
    assert len(events) == 1


def test_decode_ndjson_one_event_per_line_skipping_blank_lines() -> None:
    lines = [encode(event_object(event_type=f"type_{index}")) for index in range(3)]
    body = lines[0] + b"\n\n" + lines[1] + b"\r\n   \n" + lines[2] + b"\n"

    events = EventDecoder().decode_ndjson(body)

    assert [event.event_type for event in events] == ["type_0", "type_1", "type_2"]


def test_decode_ndjson_names_the_failing_line_index() -> None:
    lines = [encode(event_object()) for _ in range(4)]
    lines[2] = encode(event_object(created_at="not a time"))

    with pytest.raises(msgspec.DecodeError) as caught:
        EventDecoder().decode_ndjson(b"\n".join(lines))

    assert "$[2].created_at" in str(caught.value)


def test_decode_ndjson_missing_field_names_the_line_index() -> None:
    lines = [encode(event_object()), encode(event_object(source=None))]

    with pytest.raises(msgspec.DecodeError) as caught:
        EventDecoder().decode_ndjson(b"\n".join(lines))

    message = str(caught.value)
    assert "$[1]" in message
    assert "source" in message


def test_decode_ndjson_malformed_line_names_its_index() -> None:
    body = encode(event_object()) + b"\n{not json\n"

    with pytest.raises(msgspec.DecodeError) as caught:
        EventDecoder().decode_ndjson(body)

    assert "$[1]" in str(caught.value)


# -- error paths ------------------------------------------------------------------------------


def test_error_in_single_object_carries_field_path() -> None:
    message = decode_error(encode(event_object(created_at="yesterday")))

    assert "$.created_at" in message


def test_error_in_array_names_index_and_field() -> None:
    events = [event_object() for _ in range(5)]
    events[3]["source"] = 42

    message = decode_error(encode(events))

    assert "$[3].source" in message


def test_missing_required_field_is_named() -> None:
    message = decode_error(encode(event_object(event_type=None)))

    assert "event_type" in message


@pytest.mark.parametrize("field", ["event_type", "source"])
@pytest.mark.parametrize("blank", ["", " ", "\t\n"])
def test_blank_event_type_or_source_rejected(field: str, blank: str) -> None:
    message = decode_error(encode(event_object(**{field: blank})))

    assert f"$.{field}" in message


def test_over_long_event_type_rejected() -> None:
    message = decode_error(encode(event_object(event_type="x" * 257)))

    assert "$.event_type" in message


def test_unknown_field_rejected_naming_it() -> None:
    message = decode_error(encode(event_object(colour="blue")))

    assert "colour" in message


def test_created_at_without_timezone_rejected() -> None:
    message = decode_error(encode(event_object(created_at="2024-05-06T07:08:09")))

    assert "$.created_at" in message


def test_created_at_with_offset_accepted_and_kept() -> None:
    event = decode_one(created_at="2024-05-06T09:08:09+02:00")

    assert event.created_at == datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc)
    assert event.created_at.utcoffset() == timedelta(hours=2)


@pytest.mark.parametrize(
    "created_at",
    [
        "1969-12-31T23:59:59Z",
        "1970-01-01T01:00:00+02:00",  # 1969-12-31T23:00:00Z
        "2106-01-01T00:00:00Z",
        "2105-12-31T23:00:00-01:00",  # 2106-01-01T00:00:00Z
        "1900-01-01T00:00:00Z",
    ],
)
def test_created_at_outside_clickhouse_range_rejected(created_at: str) -> None:
    message = decode_error(encode(event_object(created_at=created_at)))

    assert "created_at" in message


@pytest.mark.parametrize("created_at", ["1970-01-01T00:00:00Z", "2105-12-31T23:59:59Z"])
def test_created_at_range_ends_accepted(created_at: str) -> None:
    event = decode_one(created_at=created_at)

    assert event.created_at == datetime.fromisoformat(created_at)


def test_range_error_in_array_carries_index() -> None:
    body = encode([event_object(), event_object(created_at="1960-01-01T00:00:00Z")])

    assert "$[1]" in decode_error(body)


def test_value_out_of_float_range_rejected() -> None:
    body = encode(event_object())[:-1] + b',"value":1e999}'

    assert "$.value" in decode_error(body)


@pytest.mark.parametrize("value", ["1", True, [1], {"a": 1}])
def test_value_must_be_a_number(value: object) -> None:
    assert "$.value" in decode_error(encode(event_object(value=value)))


def test_event_id_generated_when_absent() -> None:
    first = decode_one()
    second = decode_one()

    assert uuid.UUID(first.event_id).version == 7
    assert uuid.UUID(second.event_id).version == 7
    assert first.event_id != second.event_id


def test_generated_event_ids_are_unique_and_time_ordered_within_a_request() -> None:
    events, _ = EventDecoder().decode_json(encode([event_object() for _ in range(1000)]))
    ids = [uuid.UUID(event.event_id) for event in events]
    assert len(set(ids)) == 1000
    assert all(identifier.variant == uuid.RFC_4122 and identifier.version == 7 for identifier in ids)
    assert ids == sorted(ids)


def test_event_id_kept_when_given() -> None:
    given = uuid.uuid4()

    assert decode_one(event_id=str(given)).event_id == given


def test_invalid_event_id_rejected() -> None:
    assert "$.event_id" in decode_error(encode(event_object(event_id="not-a-uuid")))


# -- properties -------------------------------------------------------------------------------


def test_flat_properties_accepted_and_stored_as_json_text() -> None:
    properties = {"path": "/home", "count": 3, "ratio": 0.25, "logged_in": True, "empty": ""}

    event = decode_one(properties=properties)

    assert isinstance(event.properties, str)
    assert msgspec.json.decode(str(event.properties)) == properties


def test_absent_and_null_properties_mean_none() -> None:
    assert not decode_one().properties
    body = encode(event_object())[:-1] + b',"properties":null}'
    events, _ = EventDecoder().decode_json(body)
    assert events[0].properties is None
    assert msgspec.json.decode(RowEncoder().encode(events)).get("properties", "") == ""


@pytest.mark.parametrize(
    "properties",
    [
        {"nested": {"a": 1}},
        {"list": [1, 2]},
        {"nothing": None},
        [1, 2],
        "text",
        7,
    ],
    ids=["nested-object", "array-value", "null-value", "array", "string", "number"],
)
def test_non_flat_properties_rejected(properties: object) -> None:
    assert "$.properties" in decode_error(encode(event_object(properties=properties)))


def test_too_many_properties_rejected() -> None:
    properties = {f"key_{index}": index for index in range(MAX_PROPERTIES + 1)}

    assert "$.properties" in decode_error(encode(event_object(properties=properties)))


def test_maximum_number_of_properties_accepted() -> None:
    properties = {f"key_{index}": index for index in range(MAX_PROPERTIES)}

    event = decode_one(properties=properties)

    assert event.properties is not None
    assert msgspec.json.decode(str(event.properties)) == properties


def test_over_long_property_value_rejected() -> None:
    properties = {"text": "x" * (MAX_PROPERTY_VALUE_LENGTH + 1)}

    assert "$.properties" in decode_error(encode(event_object(properties=properties)))


def test_property_value_at_length_limit_accepted() -> None:
    properties = {"text": "x" * MAX_PROPERTY_VALUE_LENGTH}

    event = decode_one(properties=properties)

    assert event.properties is not None
    assert msgspec.json.decode(str(event.properties)) == properties


def test_over_long_property_name_rejected() -> None:
    properties = {"k" * (MAX_PROPERTY_KEY_LENGTH + 1): "v"}

    assert "$.properties" in decode_error(encode(event_object(properties=properties)))


def test_property_error_in_array_carries_index() -> None:
    body = encode([event_object(), event_object(), event_object(properties={"a": {"b": 1}})])

    assert "$[2].properties" in decode_error(body)


# -- RowEncoder -------------------------------------------------------------------------------

AWKWARD_STRINGS = [
    'say "hi"',
    "back\\slash",
    "line\nbreak",
    "tab\there",
    "emoji 😀 and 漢字",
    "nul\x00byte",
    "\u2028separator\u2029",
    '\\"\n\t\x00😀',
]


def test_encode_one_json_line_per_event_with_properties_as_a_string() -> None:
    body = encode(
        [
            event_object(event_type="a", properties={"x": 1, "y": "z"}),
            event_object(event_type="b", user_id="u", value=1.5),
            event_object(event_type="c"),
        ]
    )
    events, _ = EventDecoder().decode_json(body)

    encoded = RowEncoder().encode(events)

    lines = encoded.splitlines()
    assert len(lines) == 3
    assert encoded.endswith(b"\n")
    rows = [msgspec.json.decode(line) for line in lines]
    assert [row["event_type"] for row in rows] == ["a", "b", "c"]
    assert isinstance(rows[0]["properties"], str)
    assert msgspec.json.decode(rows[0]["properties"]) == {"x": 1, "y": "z"}
    assert rows[1]["user_id"] == "u"
    assert rows[1]["value"] == 1.5
    for row, event in zip(rows, events):
        assert row["event_id"] == str(event.event_id)
        assert datetime.fromisoformat(row["created_at"]) == event.created_at


@pytest.mark.parametrize("text", AWKWARD_STRINGS)
def test_encode_escapes_awkward_strings_losslessly(text: str) -> None:
    body = encode(event_object(event_type=f"t{text}", source=f"s{text}", user_id=text, properties={"p": text, text: "key"}))
    events, _ = EventDecoder().decode_json(body)

    encoded = RowEncoder().encode(events)

    lines = encoded.split(b"\n")
    assert lines[-1] == b""
    assert len(lines) == 2, "a raw newline inside a string would split the row"
    row = msgspec.json.decode(lines[0])
    assert row["event_type"] == f"t{text}"
    assert row["source"] == f"s{text}"
    assert row["user_id"] == text
    assert isinstance(row["properties"], str)
    assert msgspec.json.decode(row["properties"]) == {"p": text, text: "key"}


def test_encode_many_events_has_one_line_each() -> None:
    events, _ = EventDecoder().decode_json(encode([event_object(user_id=f"line\n{index}") for index in range(100)]))

    lines = RowEncoder().encode(events).splitlines()

    assert len(lines) == 100
    assert [msgspec.json.decode(line)["user_id"] for line in lines] == [f"line\n{index}" for index in range(100)]


# -- the server's columns ---------------------------------------------------------------------


@pytest.mark.parametrize("field", SERVER_FIELDS)
def test_a_body_may_not_set_a_server_column(field: str) -> None:
    refused = "set by the server, never by a client"
    assert decode_error(encode(event_object(**{field: "2024-01-01T00:00:00Z"}))) == f"{refused} - at `$.{field}`"
    array = encode([event_object(), event_object(**{field: {"x": 1}})])
    assert decode_error(array) == f"{refused} - at `$[1].{field}`"
    line = encode(event_object())[:-1] + b',"' + field.encode() + b'":null}'
    with pytest.raises(msgspec.ValidationError, match=rf"{refused} - at `\$\[1\]\.{field}`"):
        EventDecoder().decode_ndjson(encode(event_object()) + b"\n" + line)


def test_the_stamp_is_copied_into_every_row() -> None:
    stamp = RowStamp(msgspec.Raw(b'"2024-05-06T07:08:10.000Z"'), msgspec.Raw(encode('{"ip":"10.0.0.1"}')), msgspec.Raw(b'"shop"'))
    events, _ = EventDecoder().decode_json(encode([event_object(properties={"a": 1}), event_object()]), stamp)

    rows = [msgspec.json.decode(line) for line in RowEncoder().encode(events).splitlines()]

    assert [row["received_at"] for row in rows] == ["2024-05-06T07:08:10.000Z"] * 2
    assert [msgspec.json.decode(row["context"]) for row in rows] == [{"ip": "10.0.0.1"}] * 2
    assert [row["source_key"] for row in rows] == ["shop", "shop"]
    assert msgspec.json.decode(rows[0]["properties"]) == {"a": 1}


def test_without_a_key_the_rows_have_no_source_key_member() -> None:
    stamp = RowStamp(msgspec.Raw(b'"2024-05-06T07:08:10.000Z"'), msgspec.Raw(b'"{}"'))
    events = EventDecoder().decode_ndjson(encode(event_object()) + b"\n", stamp)

    row = msgspec.json.decode(RowEncoder().encode(events))

    assert "source_key" not in row and row["context"] == "{}"


def test_event_ids_count_up_by_one_across_every_hex_digit_carry() -> None:
    ids = EventIds().batch(10_000)  # spans at least two carries of the last three hex digits

    counters = [int(event_id[-12:], 16) for event_id in ids]
    assert counters == list(range(counters[0], counters[0] + 10_000))
    assert len({event_id[:-12] for event_id in ids}) == 1
    assert all(uuid.UUID(event_id).version == 7 and len(event_id) == 36 for event_id in ids)
