"""The event schema: decoding, validation and the NDJSON rows sent to ClickHouse.

msgspec decides everything it can in C, in one pass over the body: field types, lengths,
unknown fields, timestamps with a time zone. The few rules it cannot express (the DateTime
range, the shape of `properties`, a generated `event_id`) run in one loop over the decoded
events, and their errors name the event's index and the field the same way msgspec's do
(`$[3].created_at`).
"""

from __future__ import annotations

import random
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

# Not blank: msgspec checks the length; the decoder then rejects white space only (`isspace()` is
# several times cheaper than a regular expression per field).
NonBlankName = Annotated[str, Meta(min_length=1, max_length=MAX_NAME_LENGTH)]
UserId = Annotated[str, Meta(max_length=MAX_USER_ID_LENGTH)]
AwareDatetime = Annotated[datetime, Meta(tz=True)]
PropertyName = Annotated[str, Meta(max_length=MAX_PROPERTY_KEY_LENGTH)]
PropertyValue = Annotated[str, Meta(max_length=MAX_PROPERTY_VALUE_LENGTH)] | int | float | bool
Properties = Annotated[dict[PropertyName, PropertyValue], Meta(max_length=MAX_PROPERTIES)]

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
    properties: Properties | None = None


class EventIds:
    """UUIDv7 texts (RFC 9562): a millisecond timestamp, 12 random bits, the variant, 14 random
    bits, then a 48-bit counter that starts at a random value each millisecond and counts up.
    Unique and time-ordered like the rows they identify, and many times cheaper than uuid4():
    within a millisecond, an id is one string format."""

    _COUNTER_SPAN = 1 << 48

    def __init__(self) -> None:
        # Seeded from os.urandom once; a system call per request cost more than the ids.
        self._random = random.Random()
        self._millisecond = -1
        self._prefix = ""
        self._next = 0

    def batch(self, count: int) -> list[str]:
        milliseconds = time.time_ns() // 1_000_000
        if milliseconds != self._millisecond or self._next + count > self._COUNTER_SPAN:
            draw = self._random.getrandbits
            self._millisecond = milliseconds
            self._prefix = (
                f"{milliseconds >> 16 & 0xFFFFFFFF:08x}-{milliseconds & 0xFFFF:04x}-7{draw(12):03x}-"
                f"{0x8000 | draw(14):04x}-"
            )
            # The low half of the counter's range, so a millisecond's requests never exhaust it.
            self._next = draw(47)
        start = self._next
        self._next = start + count
        prefix = self._prefix
        return [f"{prefix}{counter:012x}" for counter in range(start, start + count)]


class EventDecoder:
    """Decodes request bodies into Events; raises msgspec.DecodeError naming the path."""

    def __init__(self) -> None:
        self._one = msgspec.json.Decoder(Event)
        self._many = msgspec.json.Decoder(list[Event])
        self._properties_encoder = msgspec.json.Encoder()
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
        without_id = []
        with_properties = []
        for index, event in enumerate(events):
            year = event.created_at.year
            if not 1970 < year < 2105:
                self._check_range(event.created_at, index, batch)
            if event.event_type.isspace() or event.source.isspace():
                field = "event_type" if event.event_type.isspace() else "source"
                raise msgspec.ValidationError(f"Expected `str` that is not blank - at `{_event_path(index, batch)}.{field}`")
            if event.properties is not None:
                with_properties.append(event)
            if event.event_id is None:
                without_id.append(event)
        if with_properties:
            # One encoder call for all of them; JSON text never contains a raw newline.
            texts = self._properties_encoder.encode_lines([event.properties for event in with_properties])
            for event, text in zip(with_properties, texts.decode().split("\n")):
                event.properties = text  # type: ignore[assignment]  # stored as text from here on
        if without_id:
            for event, event_id in zip(without_id, self._ids.batch(len(without_id))):
                event.event_id = event_id  # type: ignore[assignment]  # generated ids are text

    @staticmethod
    def _check_range(created_at: datetime, index: int, batch: bool) -> None:
        if not EARLIEST_CREATED_AT <= created_at <= LATEST_CREATED_AT:
            raise msgspec.ValidationError(
                f"`created_at` {created_at.isoformat()} is outside the range ClickHouse stores "
                f"(1970-01-01T00:00:00Z to 2105-12-31T23:59:59Z) - at `{_event_path(index, batch)}.created_at`"
            )


def _event_path(index: int, batch: bool) -> str:
    return f"$[{index}]" if batch else "$"


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
