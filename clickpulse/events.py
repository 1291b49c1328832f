"""The event schema: decoding, validation and the NDJSON rows sent to ClickHouse.

msgspec decides everything it can in C, in one pass over the body: field types, lengths,
unknown fields, timestamps with a time zone. The few rules it cannot express (the DateTime
range, the shape of `properties`, a generated `event_id`) run in one loop over the decoded
events, and their errors name the event's index and the field the same way msgspec's do
(`$[3].created_at`).
"""

from __future__ import annotations

import operator
import random
import time
import uuid
from datetime import datetime, timezone
from typing import Annotated, Final

import msgspec
from msgspec import UNSET, Meta, Raw, Struct, UnsetType

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

class ServerColumn:
    """The type of a column only the server fills: no JSON value decodes into it
    (`refuse_server_column`), so a body naming one is refused at no cost per event."""


def refuse_server_column(kind: type, value: object) -> object:
    """msgspec's dec_hook: its ValueError becomes a ValidationError naming the member."""
    if kind is ServerColumn:
        raise ValueError("set by the server, never by a client")
    raise NotImplementedError


def server_column_schema(kind: type) -> dict[str, object]:
    """msgspec's schema_hook (the OpenAPI document then drops these members: not a client's)."""
    if kind is ServerColumn:
        return {"description": "set by the server"}
    raise NotImplementedError


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
    # The server's own columns (`RowStamp`), never a client's: the decoder refuses them in a body
    # (`ServerColumn`). Set on every event of a request to one pre-encoded `Raw` value, so that
    # the encoder copies them into each row instead of a second pass splicing them into the text.
    received_at: ServerColumn | UnsetType = UNSET
    context: ServerColumn | UnsetType = UNSET
    source_key: ServerColumn | UnsetType = UNSET


SERVER_FIELDS: Final = ("received_at", "context", "source_key")
_CREATED_AT: Final = operator.attrgetter("created_at")
_EVENT_TYPE: Final = operator.attrgetter("event_type")
_SOURCE: Final = operator.attrgetter("source")


class RowStamp(Struct, frozen=True, gc=False):
    """What the server adds to every row of one request, each an encoded JSON value. A Struct:
    made once per request, in C (a NamedTuple's constructor runs Python, four times slower)."""

    received_at: Raw
    context: Raw
    source_key: Raw | UnsetType = UNSET


_LOWER_SPAN: Final = 1 << 12
_LOWER_HEX: Final = tuple(f"{lower:03x}" for lower in range(_LOWER_SPAN))  # the counter's last 3 hex digits


class EventIds:
    """UUIDv7 texts (RFC 9562): a millisecond timestamp, 12 random bits, the variant, 14 random
    bits, then a 48-bit counter that starts at a random value each millisecond and counts up.
    Unique and time-ordered like the rows they identify, and many times cheaper than uuid4():
    within a millisecond, an id is one string concatenation of the counter's upper 9 hex digits
    (formatted once per 4096 ids) and its last 3 (looked up), done by `map` rather than a
    Python loop, about a fifth of the cost of formatting every counter."""

    _COUNTER_SPAN = 1 << 48

    def __init__(self) -> None:
        # Seeded from os.urandom once; a system call per request cost more than the ids.
        self._random = random.Random()
        self._millisecond = -1
        self._prefix = ""
        self._next = 0

    def one(self) -> str:
        prefix, counter = self._take(1)
        return f"{prefix}{counter:012x}"

    def batch(self, count: int) -> list[str]:
        prefix, start = self._take(count)
        end = start + count
        ids: list[str] = []
        while start < end:
            upper, lower = divmod(start, _LOWER_SPAN)
            take = min(end - start, _LOWER_SPAN - lower)
            ids += map(f"{prefix}{upper:09x}".__add__, _LOWER_HEX[lower:lower + take])
            start += take
        return ids

    def _take(self, count: int) -> tuple[str, int]:
        """The current millisecond's prefix and the first of `count` counter values."""
        milliseconds = time.time_ns() // 1_000_000
        if milliseconds != self._millisecond or self._next + count > self._COUNTER_SPAN:
            # One draw: 12 random bits, 14 random bits, and the counter's start in the low half of
            # its range, so that a millisecond's requests never exhaust it.
            bits = self._random.getrandbits(73)
            self._millisecond = milliseconds
            self._prefix = (
                f"{milliseconds >> 16 & 0xFFFFFFFF:08x}-{milliseconds & 0xFFFF:04x}-7{bits >> 61:03x}-"
                f"{0x8000 | bits >> 47 & 0x3FFF:04x}-"
            )
            self._next = bits & 0x7FFF_FFFF_FFFF
        start = self._next
        self._next = start + count
        return self._prefix, start


class EventDecoder:
    """Decodes request bodies into Events; raises msgspec.DecodeError naming the path."""

    def __init__(self) -> None:
        self._one = msgspec.json.Decoder(Event, dec_hook=refuse_server_column)
        self._many = msgspec.json.Decoder(list[Event], dec_hook=refuse_server_column)
        self._properties_encoder = msgspec.json.Encoder()
        self._ids = EventIds()

    def decode_json(self, body: bytes, stamp: RowStamp | None = None) -> tuple[list[Event], bool]:
        """A JSON object or array. Returns the events and whether the body was an array.
        `stamp`: the server's columns, set on every event (see `Event`)."""
        first = body[:1]
        if first.isspace():
            first = body.lstrip()[:1]
        if first == b"[":
            events = self._many.decode(body)
            self._complete(events, True, stamp)
            return events, True
        event = self._one.decode(body)
        self._complete_one(event, False, stamp)
        return [event], False

    def decode_ndjson(self, body: bytes, stamp: RowStamp | None = None) -> list[Event]:
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
        self._complete(events, True, stamp)
        return events

    def _complete(self, events: list[Event], batch: bool, stamp: RowStamp | None) -> None:
        """The per-event rules msgspec cannot express, the server's columns, then ids for events
        that came without. At a thousand events a request every Python operation per event
        counts: the checks run as C loops (`map`, `min`, `any`) over all events at once, and
        only a failing one looks for the event to name. One event, the commonest request, takes
        a path of its own, where setting up those loops would cost more than the checks."""
        if len(events) == 1:
            self._complete_one(events[0], batch, stamp)
            return
        created = list(map(_CREATED_AT, events))
        if created and (min(created) < EARLIEST_CREATED_AT or max(created) > LATEST_CREATED_AT):
            for index, created_at in enumerate(created):
                self._check_range(created_at, index, batch)
        if any(map(str.isspace, map(_EVENT_TYPE, events))) or any(map(str.isspace, map(_SOURCE, events))):
            for index, event in enumerate(events):
                self._check_not_blank(event, index, batch)
        with_properties = [event for event in events if event.properties is not None]
        without_id = [event for event in events if event.event_id is None]
        if stamp is not None:
            received_at, context, source_key = stamp.received_at, stamp.context, stamp.source_key
            for event in events:
                event.received_at = received_at  # type: ignore[assignment]  # the encoder takes the Raw
                event.context = context  # type: ignore[assignment]
            if source_key is not UNSET:
                for event in events:
                    event.source_key = source_key  # type: ignore[assignment]
        if with_properties:
            # One encoder call for all of them; JSON text never contains a raw newline.
            texts = self._properties_encoder.encode_lines([event.properties for event in with_properties])
            for event, text in zip(with_properties, texts.decode().split("\n")):
                event.properties = text  # type: ignore[assignment]  # stored as text from here on
        if without_id:
            for event, event_id in zip(without_id, self._ids.batch(len(without_id))):
                event.event_id = event_id  # type: ignore[assignment]  # generated ids are text

    def _complete_one(self, event: Event, batch: bool, stamp: RowStamp | None) -> None:
        if not 1970 < event.created_at.year < 2105:
            self._check_range(event.created_at, 0, batch)
        if event.event_type.isspace() or event.source.isspace():
            self._check_not_blank(event, 0, batch)
        if stamp is not None:
            event.received_at = stamp.received_at  # type: ignore[assignment]  # the encoder takes the Raw
            event.context = stamp.context  # type: ignore[assignment]
            if stamp.source_key is not UNSET:
                event.source_key = stamp.source_key  # type: ignore[assignment]
        if event.properties is not None:
            event.properties = self._properties_encoder.encode(event.properties).decode()  # type: ignore[assignment]
        if event.event_id is None:
            event.event_id = self._ids.one()  # type: ignore[assignment]

    @staticmethod
    def _check_not_blank(event: Event, index: int, batch: bool) -> None:
        if event.event_type.isspace() or event.source.isspace():
            field = "event_type" if event.event_type.isspace() else "source"
            raise msgspec.ValidationError(f"Expected `str` that is not blank - at `{_event_path(index, batch)}.{field}`")

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
    """Encodes decoded events (with their `RowStamp`) into JSONEachRow: one JSON object per line."""

    def __init__(self) -> None:
        self._encoder = msgspec.json.Encoder()

    def encode(self, events: list[Event]) -> bytes:
        return self._encoder.encode_lines(events)
