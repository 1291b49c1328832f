"""The event schema: decoding, validation and the NDJSON rows sent to ClickHouse.

msgspec decides everything it can in C, in one pass over the body: field types, lengths,
unknown fields, timestamps with a time zone. The few rules it cannot express (the DateTime
range, the shape of `properties`, a generated `event_id`) run in one loop over the decoded
events, and their errors name the event's index and the field the same way msgspec's do
(`$[3].created_at`).
"""

from __future__ import annotations

import os
import time
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
PropertyName = Annotated[str, Meta(max_length=MAX_PROPERTY_KEY_LENGTH)]
PropertyValue = Annotated[str, Meta(max_length=MAX_PROPERTY_VALUE_LENGTH)] | int | float | bool
Properties = Annotated[dict[PropertyName, PropertyValue], Meta(max_length=MAX_PROPERTIES)]

_NO_PROPERTIES = msgspec.Raw(b"")


class Event(Struct, forbid_unknown_fields=True, omit_defaults=True, gc=False):
    """One analytical event as POSTed, and as encoded into its JSONEachRow line.

    After `EventDecoder` returns it, `event_id` is always set (a UUID, or its text when
    generated) and `properties` is the object's JSON text, which ClickHouse stores in a String
    column. `gc=False`: events hold no reference cycles, and a collector walking hundreds of
    thousands of buffered events costs more than decoding them.
    """

    event_type: NonBlankName
    source: NonBlankName
    created_at: AwareDatetime
    user_id: UserId | None = None
    value: float | None = None
    # Decoded as these types; the decoder then stores generated ids and properties as text.
    event_id: uuid.UUID | None = None
    properties: msgspec.Raw = _NO_PROPERTIES


class EventIds:
    """UUIDv7 texts (RFC 9562): a millisecond timestamp, then random bits that count up within a
    request. Time-ordered like the rows they identify, and about 20 times cheaper than uuid4()."""

    _RANDOM_62_BITS = (1 << 62) - 1
    _VARIANT = 1 << 63

    def batch(self, count: int) -> list[str]:
        milliseconds = time.time_ns() // 1_000_000
        random_bits = int.from_bytes(os.urandom(10), "big")
        prefix = f"{milliseconds >> 16 & 0xFFFFFFFF:08x}-{milliseconds & 0xFFFF:04x}-7{random_bits >> 68 & 0xFFF:03x}-"
        start = random_bits & self._RANDOM_62_BITS
        ids = []
        for offset in range(count):
            tail = (start + offset) & self._RANDOM_62_BITS | self._VARIANT
            ids.append(f"{prefix}{tail >> 48:04x}-{tail & 0xFFFFFFFFFFFF:012x}")
        return ids


class EventDecoder:
    """Decodes request bodies into Events; raises msgspec.DecodeError naming the path."""

    def __init__(self) -> None:
        self._one = msgspec.json.Decoder(Event)
        self._many = msgspec.json.Decoder(list[Event])
        self._properties = msgspec.json.Decoder(Properties | None)
        self._ids = EventIds()

    def decode_json(self, body: bytes) -> tuple[list[Event], bool]:
        """A JSON object or array. Returns the events and whether the body was an array."""
        first = body[:1]
        if first.isspace():
            first = body.lstrip()[:1]
        if first == b"[":
            events = self._many.decode(body)
            self._complete(events, batch=True)
            return events, True
        events = [self._one.decode(body)]
        self._complete(events, batch=False)
        return events, False

    def decode_ndjson(self, body: bytes) -> list[Event]:
        """One JSON object per line; blank lines are skipped and not counted in `$[i]`."""
        events: list[Event] = []
        decode = self._one.decode
        for line in body.splitlines():
            if not line.strip():
                continue
            try:
                events.append(decode(line))
            except msgspec.DecodeError as error:
                raise type(error)(_at_path(str(error), f"$[{len(events)}]")) from None
        self._complete(events, batch=True)
        return events

    def _complete(self, events: list[Event], batch: bool) -> None:
        """The per-event rules msgspec cannot express, then ids for events that came without."""
        without_id = 0
        for index, event in enumerate(events):
            created_at = event.created_at
            if not 1970 < created_at.year < 2105 and not EARLIEST_CREATED_AT <= created_at <= LATEST_CREATED_AT:
                path = f"$[{index}]" if batch else "$"
                raise msgspec.ValidationError(
                    f"`created_at` {created_at.isoformat()} is outside the range ClickHouse stores "
                    f"(1970-01-01T00:00:00Z to 2105-12-31T23:59:59Z) - at `{path}.created_at`"
                )
            properties = event.properties
            if properties:
                event.properties = self._properties_text(properties, f"$[{index}]" if batch else "$")
            if event.event_id is None:
                without_id += 1
        if without_id:
            ids = iter(self._ids.batch(without_id))
            for event in events:
                if event.event_id is None:
                    event.event_id = next(ids)

    def _properties_text(self, raw: msgspec.Raw, event_path: str) -> str:
        """The object's JSON text as sent; "" for null, like an absent object."""
        try:
            properties = self._properties.decode(raw)
        except msgspec.DecodeError as error:
            raise msgspec.ValidationError(_at_path(str(error), f"{event_path}.properties")) from None
        return "" if properties is None else bytes(raw).decode()


def _at_path(message: str, prefix: str) -> str:
    """Puts `prefix` in front of the `$...` path of an error about a part of the body."""
    marker = " - at `$"
    if marker in message:
        return message.replace(marker, f" - at `{prefix}", 1)
    return f"{message} - at `{prefix}`"


class RowEncoder:
    """Encodes events into JSONEachRow: one JSON object per line."""

    def __init__(self) -> None:
        self._encoder = msgspec.json.Encoder()

    def encode(self, events: list[Event]) -> bytes:
        return self._encoder.encode_lines(events)
