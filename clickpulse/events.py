"""The event schema: decoding, validation and the NDJSON rows sent to ClickHouse.

Everything here is decided by msgspec in C where it can be: field types, lengths, unknown
fields, timestamps with a time zone. The few rules msgspec cannot express (the DateTime range,
a generated event_id, the flat `properties` object stored as JSON text) run per event in
`__post_init__` or in the `properties` hook, and their errors come back through msgspec with the
same `$[i].field` paths as the built-in ones.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Annotated

import msgspec
from msgspec import Meta, Struct

MAX_NAME_LENGTH = 256
MAX_USER_ID_LENGTH = 256
MAX_PROPERTIES = 64
MAX_PROPERTY_KEY_LENGTH = 128
MAX_PROPERTY_VALUE_LENGTH = 1024

# ClickHouse's DateTime is an unsigned 32-bit count of seconds; DateTime64 reaches further, but
# one range for every server keeps an event valid or invalid whatever ClickHouse stores it.
EARLIEST_CREATED_AT = datetime(1970, 1, 1, tzinfo=timezone.utc)
LATEST_CREATED_AT = datetime(2105, 12, 31, 23, 59, 59, 999000, tzinfo=timezone.utc)

# "not blank": at least one character that is not white space.
NonBlankName = Annotated[str, Meta(min_length=1, max_length=MAX_NAME_LENGTH, pattern=r"\S")]
UserId = Annotated[str, Meta(max_length=MAX_USER_ID_LENGTH)]
AwareDatetime = Annotated[datetime, Meta(tz=True)]


class PropertiesJson(str):
    """The JSON text of a validated flat `properties` object, as stored in its String column."""

    __slots__ = ()


class Event(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One analytical event as POSTed, validated, and as encoded into a JSONEachRow line."""

    event_type: NonBlankName
    source: NonBlankName
    created_at: AwareDatetime
    user_id: UserId | None = None
    value: float | None = None
    event_id: uuid.UUID | None = None
    properties: PropertiesJson | None = None

    def __post_init__(self) -> None:
        if not EARLIEST_CREATED_AT <= self.created_at <= LATEST_CREATED_AT:
            raise ValueError(
                f"`created_at` {self.created_at.isoformat()} is outside the range ClickHouse "
                "stores (1970-01-01T00:00:00Z to 2105-12-31T23:59:59Z)"
            )
        if self.event_id is None:
            self.event_id = uuid.uuid4()


def _validate_properties(raw: object) -> PropertiesJson:
    if not isinstance(raw, dict):
        raise TypeError(f"Expected `object`, got `{_json_type_name(raw)}`")
    if len(raw) > MAX_PROPERTIES:
        raise ValueError(f"Expected an object with at most {MAX_PROPERTIES} properties")
    for key, value in raw.items():
        if len(key) > MAX_PROPERTY_KEY_LENGTH:
            raise ValueError(
                f"Property name longer than {MAX_PROPERTY_KEY_LENGTH} characters: `{key[:32]}…`"
            )
        value_type = type(value)
        if value_type is str:
            if len(value) > MAX_PROPERTY_VALUE_LENGTH:
                raise ValueError(
                    f"Property `{key}` is longer than {MAX_PROPERTY_VALUE_LENGTH} characters"
                )
        elif value_type not in (int, float, bool):
            raise TypeError(
                f"Property `{key}` must be a string, number or bool, got `{_json_type_name(value)}`"
            )
    return PropertiesJson(msgspec.json.encode(raw).decode())


def _json_type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "str"
    return type(value).__name__


def _decode_hook(target_type: type, raw: object) -> object:
    if target_type is PropertiesJson:
        return _validate_properties(raw)
    raise NotImplementedError(f"no decoder for {target_type!r}")


def _encode_hook(value: object) -> object:
    if isinstance(value, PropertiesJson):
        return str(value)
    raise NotImplementedError(f"cannot encode {type(value)!r}")


class EventDecoder:
    """Decodes request bodies into Events; raises msgspec.DecodeError with a `$` path."""

    def __init__(self) -> None:
        self._one = msgspec.json.Decoder(Event, dec_hook=_decode_hook)
        self._many = msgspec.json.Decoder(list[Event], dec_hook=_decode_hook)

    def decode_json(self, body: bytes) -> tuple[list[Event], bool]:
        """A JSON object or array. Returns the events and whether the body was an array."""
        first = body[:1]
        if first.isspace():
            first = body.lstrip()[:1]
        if first == b"[":
            return self._many.decode(body), True
        return [self._one.decode(body)], False

    def decode_ndjson(self, body: bytes) -> list[Event]:
        """One JSON object per line; blank lines are skipped."""
        events: list[Event] = []
        decode = self._one.decode
        for line in body.splitlines():
            if not line.strip():
                continue
            try:
                events.append(decode(line))
            except msgspec.DecodeError as error:
                raise type(error)(_at_index(str(error), len(events))) from None
        return events


def _at_index(message: str, index: int) -> str:
    """Rewrites a single-object error's `$...` path to name the event's index in the request."""
    marker = " - at `$"
    if marker in message:
        return message.replace(marker, f"{marker}[{index}]", 1)
    return f"{message} - at `$[{index}]`"


class RowEncoder:
    """Encodes a batch once into the JSONEachRow body of one INSERT."""

    def __init__(self) -> None:
        self._encoder = msgspec.json.Encoder(enc_hook=_encode_hook)

    def encode(self, events: list[Event]) -> bytes:
        return self._encoder.encode_lines(events)
