"""Segment messages → rows of the events table: the mapping behind the /v1 API (http/segment.py).

Two paths give a batch's rows, the same rows (tests/http/test_segment.py holds them to it):

- the common path (`MessageMapper.common_rows`) decodes the body in one call as CommonMessages
  (track messages with a timestamp and an object of properties, what the SDKs send), whose
  narrower types msgspec checks in C as it decodes; then it maps one member at a time over the
  whole batch, each a C loop, at a fraction of a microsecond per message. It takes a batch whose
  messages are alike where the general path would treat them differently: a sentAt on all of
  them or on none, a context of their own on all of them (each with or each without `ip`, and
  `userAgent`) or on none. SEGMENT_MAX_MESSAGE_BYTES it holds them to from their members'
  lengths (`_surely_fit`), measuring each message (decoding the body as an Envelope, a
  `msgspec.Raw` a message) only when those cannot prove that none is over;
- the general path (`MessageMapper.general_batch_rows`) decodes the body as an Envelope, then
  maps any other batch message by message, in order (its messages decoded in one call too, as
  Messages, when they all decode), and alone decides every error: a batch the common path
  declines for a bad message is refused naming the same first bad message as if the common path
  did not exist.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from itertools import repeat
from operator import add, is_, itemgetter, sub
from typing import Annotated, Final, Literal, cast

import msgspec
from msgspec import Meta, Raw, Struct

from clickpulse.events import MAX_NAME_LENGTH, MAX_USER_ID_LENGTH

MessageType = Literal["track", "page", "screen", "identify", "group", "alias"]
MESSAGE_TYPES: Final[tuple[MessageType, ...]] = ("track", "page", "screen", "identify", "group", "alias")
# The namespace of the deterministic event_id of a messageId that is not a UUID: uuid5(this, id).
MESSAGE_ID_NAMESPACE: Final = uuid.UUID("6f1c2a8e-4b1d-5e0a-9c3f-0c11c4a9e512")
NO_KEY_SOURCE: Final = "segment"  # `source` of rows sent without keys configured

_NULL: Final = b"null"


class Message(Struct, gc=False):
    """One message, as the SDKs send it. Unknown members are ignored (msgspec's default)."""

    type: MessageType | None = None  # required inside a batch; the route decides otherwise
    event: str | None = None
    userId: str | int | None = None
    anonymousId: str | int | None = None
    messageId: str | int | None = None
    timestamp: datetime | None = None
    sentAt: datetime | None = None
    properties: Raw = Raw()
    traits: Raw = Raw()
    context: Raw = Raw()
    name: str | None = None
    category: str | None = None
    previousId: str | int | None = None
    groupId: str | int | None = None
    writeKey: str | None = None


class Envelope(Struct, gc=False):
    """A batch request's outer object."""

    batch: list[Raw]
    sentAt: datetime | None = None
    context: Raw = Raw()
    writeKey: str | None = None


class DecodedBatch(Struct, gc=False):
    """The same body again, its messages decoded at once (the rest is the Envelope's)."""

    batch: list[Message]


EventName = Annotated[str, Meta(min_length=1, max_length=MAX_NAME_LENGTH)]
TextId = Annotated[str, Meta(min_length=1, max_length=MAX_USER_ID_LENGTH)]
AwareDatetime = Annotated[datetime, Meta(tz=True)]
MAX_COMMON_MESSAGE_ID_LENGTH: Final = 256  # an SDK's is a UUID, or a prefix and 32 hex digits
MessageIdText = Annotated[str, Meta(max_length=MAX_COMMON_MESSAGE_ID_LENGTH)]


class CommonMessage(Struct, kw_only=True, gc=False):
    """A track message of the common shape: Message's members, each the same type or a narrower
    one, so that msgspec checks in C most of what `MessageMapper.row` checks in Python. A message
    it refuses is not bad, only not common: the general path takes it."""

    type: Literal["track"]
    event: EventName
    userId: TextId | None = None  # a number: the general path (its text is the id)
    anonymousId: TextId | None = None
    messageId: MessageIdText | None = None  # a number, or longer (no SDK's is): the general path
    timestamp: AwareDatetime  # none, or without a zone: the general path
    sentAt: AwareDatetime | None = None
    properties: Raw  # its own object, checked in `common_rows`
    traits: Raw = Raw()
    context: Raw = Raw()  # its own: all of them objects, or none has one (checked in `common_rows`)
    name: str | None = None
    category: str | None = None
    previousId: str | int | None = None
    groupId: str | int | None = None
    writeKey: str | None = None


class CommonBatch(Struct, gc=False):
    """A batch request's outer object, its messages CommonMessages (the rest as in Envelope)."""

    batch: list[CommonMessage]
    sentAt: datetime | None = None
    context: Raw = Raw()
    writeKey: str | None = None


@dataclass(frozen=True, slots=True)
class BatchLimits:
    max_message_bytes: int  # SEGMENT_MAX_MESSAGE_BYTES
    max_events: int  # MAX_BATCH_EVENTS


@dataclass(frozen=True, slots=True)
class CommonMembers:
    """The members of a batch's CommonMessages, a list each, in the messages' order: what the
    common path maps, and sums to bound the messages' sizes."""

    events: list[str]
    user_ids: list[str | None]
    anonymous_ids: list[str | None]
    message_ids: list[str | None]
    timestamps: list[datetime]
    sent_ats: list[datetime | None]
    properties: list[Raw]
    contexts: list[Raw]

    @classmethod
    def of(cls, messages: list[CommonMessage]) -> CommonMembers:
        return cls(
            [message.event for message in messages],
            [message.userId for message in messages],
            [message.anonymousId for message in messages],
            [message.messageId for message in messages],
            [message.timestamp for message in messages],
            [message.sentAt for message in messages],
            [message.properties for message in messages],
            [message.context for message in messages],
        )


class WriteKeyOnly(Struct, gc=False):
    writeKey: str | None = None


class _Present(Struct, gc=False):
    """Which of the members clickpulse would add an object already has (any value)."""

    name: Raw = Raw()
    category: Raw = Raw()
    previousId: Raw = Raw()
    groupId: Raw = Raw()
    ip: Raw = Raw()
    userAgent: Raw = Raw()


class Row(Struct, omit_defaults=True, gc=False):
    """One JSONEachRow line of the events table."""

    event_id: str
    event_type: str
    source: str
    created_at: datetime
    received_at: datetime
    properties: str
    context: str
    source_key: str = ""
    user_id: str | None = None
    anonymous_id: str | None = None
    original_timestamp: datetime | None = None


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What one request gives every row it brings."""

    received_at: datetime
    source: str
    source_key: str
    request_context: tuple[bytes, bytes]  # the `"ip":…` and `"userAgent":…` members, each b"" when none
    sent_at: datetime | None = None  # the batch's, for its messages without their own
    batch_context: str = "{}"  # the batch's context, enriched: the context of its messages without their own


class Invalid(Exception):
    """A message or body clickpulse refuses: 400, or `status`."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


EVENT_TYPES: Final[dict[str, str]] = {
    "page": "$page", "screen": "$screen", "identify": "$identify", "group": "$group", "alias": "$alias",
}
EARLIEST: Final = datetime(1970, 1, 2, tzinfo=timezone.utc)
LATEST: Final = datetime(2105, 12, 31, tzinfo=timezone.utc)


_UUID_TEXT: Final = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


_NAMESPACE_BYTES: Final = MESSAGE_ID_NAMESPACE.bytes  # what uuid5 hashes before the name
_VARIANT_DIGITS: Final = "89ab"  # RFC 4122's variant, 0b10xx, in the 17th hex digit


def event_id_of(message_id: str | int | None) -> str | None:
    """The messageId when it is a UUID (in its usual 8-4-4-4-12 form); else
    uuid5(MESSAGE_ID_NAMESPACE, messageId); None when absent."""
    if message_id is None:
        return None
    text = message_id if type(message_id) is str else str(message_id)
    if len(text) == 36 and _UUID_TEXT.fullmatch(text):
        return text.lower()
    return _uuid5_text(text)


def _uuid5_text(name: str) -> str:
    """str(uuid.uuid5(MESSAGE_ID_NAMESPACE, name)), without the UUID object: a fifth of the cost,
    which counts for analytics.js, whose messageIds (`ajs-next-…`) are never UUIDs."""
    digits = hashlib.sha1(_NAMESPACE_BYTES + name.encode(), usedforsecurity=False).hexdigest()
    return (
        f"{digits[:8]}-{digits[8:12]}-5{digits[13:16]}-"
        f"{_VARIANT_DIGITS[int(digits[16], 16) & 3]}{digits[17:20]}-{digits[20:32]}"
    )


# Every byte of a run of lowercased UUID texts joined by newlines, and the columns where the
# hyphens and the newlines must be (a UUID text is 36 characters, 37 with its newline).
_UUID_RUN_BYTES: Final = b"0123456789abcdef-\n"
_UUID_HYPHEN_COLUMNS: Final = (8, 13, 18, 23)


def event_ids_of(message_ids: Sequence[str | int | None]) -> list[str]:
    """`event_id_of` of each messageId ("" for an absent one). The common batch, all UUID texts,
    is checked in a few passes over the ids joined into one text, not an expression match each."""
    count = len(message_ids)
    try:
        joined = "\n".join(message_ids).encode()  # type: ignore[arg-type]  # TypeError: not all texts
    except TypeError:
        joined = b""
    lowered = joined.lower()
    if (
        len(lowered) == 37 * count - 1
        and not lowered.translate(None, _UUID_RUN_BYTES)
        and lowered.count(b"-") == 4 * count
        and lowered.count(b"\n") == count - 1
        and all(lowered[column::37] == b"-" * count for column in _UUID_HYPHEN_COLUMNS)
        and lowered[36::37] == b"\n" * (count - 1)
    ):
        # Hex digits only, but for 4 hyphens in each UUID and a newline between two, each where it
        # belongs. Lowercase already (what uuid4() gives): the very texts, not copies.
        return list(cast("Sequence[str]", message_ids)) if lowered == joined else lowered.decode().split("\n")
    return [event_id_of(message_id) or "" for message_id in message_ids]


def _object(raw: Raw, path: str, field: str) -> bytes | None:
    """The bytes of a JSON object member (None when absent or null); Invalid if not an object."""
    data = bytes(raw)
    if not data or data == _NULL:
        return None
    if data[:1] != b"{":
        raise Invalid(f"Expected `object`, got `{_json_kind(data)}` - at `{path}.{field}`")
    return data


def _text(data: bytes, path: str, field: str) -> str:
    """A member's JSON text as sent. msgspec checks the UTF-8 of what it decodes, not of the
    text it keeps as Raw: a bad byte there is the sender's error, not a 500."""
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise Invalid(f"Invalid UTF-8 encoded string - at `{path}.{field}`") from None


def _json_kind(data: bytes) -> str:
    first = data[:1]
    return {b"[": "array", b'"': "str", b"t": "bool", b"f": "bool"}.get(first, "number")


def _with_members(obj: bytes | None, members: list[bytes]) -> bytes:
    """`members` (`"k":v`) put at the front of the JSON object `obj` (or a new object)."""
    if not members:
        return obj if obj is not None else b"{}"
    head = b",".join(members)
    if obj is None:
        return b"{" + head + b"}"
    rest = obj[1:].lstrip()
    return b"{" + head + (b"" if rest[:1] == b"}" else b",") + rest


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def _text_id(value: str | int | None, path: str, field: str) -> str | None:
    if value is None:
        return None
    text = value if type(value) is str else str(value)
    if len(text) > MAX_USER_ID_LENGTH:
        raise Invalid(f"Expected `str` of length <= {MAX_USER_ID_LENGTH} - at `{path}.{field}`")
    return text


class MessageMapper:
    """Messages → Rows (see the README's mapping table)."""

    def __init__(self) -> None:
        self._one = msgspec.json.Decoder(Message)
        self._batch = msgspec.json.Decoder(DecodedBatch)
        self._common = msgspec.json.Decoder(CommonBatch)
        self._envelope = msgspec.json.Decoder(Envelope)
        self._present = msgspec.json.Decoder(_Present)
        self._presents = msgspec.json.Decoder(list[_Present])
        self._encode = msgspec.json.encode

    def decode(self, data: bytes, path: str) -> Message:
        try:
            return self._one.decode(data)
        except msgspec.DecodeError as error:
            raise Invalid(at_path(str(error), path)) from None

    def present(self, obj: bytes) -> _Present:
        return self._present.decode(obj)

    def enriched(self, context: bytes | None, request_context: tuple[bytes, bytes]) -> bytes:
        """`context` with the request's `ip` and `userAgent` members where it has none."""
        ip_member, agent_member = request_context
        if not ip_member and not agent_member:
            return context if context is not None else b"{}"
        have = self.present(context) if context is not None else None
        members = []
        if ip_member and (have is None or not have.ip):
            members.append(ip_member)
        if agent_member and (have is None or not have.userAgent):
            members.append(agent_member)
        return _with_members(context, members)

    def row(self, message: Message, kind: MessageType, path: str, facts: RequestFacts) -> Row:
        """The row of one message; Invalid, naming `path` and the member, when it is bad."""
        encode = self._encode
        if kind == "track":
            event = message.event
            if event is None:
                raise Invalid(f"Object missing required field `event` - at `{path}`")
            if not event.strip() or len(event) > MAX_NAME_LENGTH:
                raise Invalid(f"Expected `str` of length 1-{MAX_NAME_LENGTH}, not blank - at `{path}.event`")
            event_type = event
        else:
            event_type = EVENT_TYPES[kind]
        user_id = _text_id(message.userId, path, "userId")
        anonymous_id = _text_id(message.anonymousId, path, "anonymousId")
        if not user_id and not anonymous_id:
            raise Invalid(f"Either `userId` or `anonymousId` is required - at `{path}`")
        if kind in ("identify", "group"):
            properties = _object(message.traits, path, "traits")
        else:
            properties = _object(message.properties, path, "properties")
        extra: list[tuple[str, object]] = []
        if kind == "track":
            pass
        elif kind in ("page", "screen"):
            extra = [("name", message.name), ("category", message.category)]
        elif kind == "alias":
            previous = _text_id(message.previousId, path, "previousId")
            if not previous:
                raise Invalid(f"Object missing required field `previousId` - at `{path}`")
            extra = [("previousId", previous)]
        elif kind == "group":
            group = _text_id(message.groupId, path, "groupId")
            if not group:
                raise Invalid(f"Object missing required field `groupId` - at `{path}`")
            extra = [("groupId", group)]
        if extra:
            extra = [(name, value) for name, value in extra if value is not None]
        if extra:
            # The properties' own member of the same name wins; never a duplicate key.
            present = self.present(properties) if properties is not None else None
            members = [
                b'"' + name.encode() + b'":' + encode(value)
                for name, value in extra
                if present is None or not getattr(present, name)
            ]
            properties = _with_members(properties, members)
        own_context = _object(message.context, path, "context")
        if own_context is None:
            context = facts.batch_context  # enriched once per request
        else:
            context = _text(self.enriched(own_context, facts.request_context), path, "context")
        received_at = facts.received_at
        timestamp = message.timestamp
        if timestamp is not None and timestamp.tzinfo is None:
            timestamp = timestamp.replace(tzinfo=timezone.utc)
        sent = message.sentAt
        if sent is None:
            sent = facts.sent_at
        elif sent.tzinfo is None:
            sent = sent.replace(tzinfo=timezone.utc)
        if timestamp is None:
            created_at = received_at
        elif sent is not None:
            try:
                created_at = timestamp + (received_at - sent)  # Segment's clock-skew correction
            except OverflowError:
                raise Invalid(f"`timestamp` corrected by `sentAt` is not a representable time - at `{path}.timestamp`") from None
        else:
            created_at = timestamp
        if not EARLIEST <= created_at <= LATEST:
            raise Invalid(
                f"`timestamp` {created_at.isoformat()} (after the clock-skew correction) is outside the range "
                f"ClickHouse stores (1970-01-02 to 2105-12-31) - at `{path}.timestamp`"
            )
        if timestamp is not None and not EARLIEST <= timestamp <= LATEST:
            raise Invalid(f"`timestamp` is outside the range ClickHouse stores - at `{path}.timestamp`")
        event_id = event_id_of(message.messageId)
        return Row(
            event_id=event_id if event_id is not None else "",
            event_type=event_type,
            source=facts.source,
            created_at=created_at,
            received_at=received_at,
            properties=_text(properties, path, "traits" if kind in ("identify", "group") else "properties")
            if properties is not None else "{}",
            context=context,
            source_key=facts.source_key,
            user_id=user_id or None,
            anonymous_id=anonymous_id or None,
            original_timestamp=timestamp,
        )

    def batch_rows(self, body: bytes, limits: BatchLimits, request: RequestFacts) -> list[Row]:
        """The rows of a batch body: the common path's when it takes the batch, else the
        general path's (`general_batch_rows`), which decides every error."""
        common = self.decode_common(body)
        if common is not None and len(common.batch) <= limits.max_events:
            members = CommonMembers.of(common.batch)
            if _surely_fit(len(body), members, limits.max_message_bytes) or self._all_fit(body, limits.max_message_bytes):
                rows = self.common_rows(members, self.batch_facts(request, common.sentAt, common.context))
                if rows is not None:
                    return rows
        return self.general_batch_rows(body, limits, request)

    def general_batch_rows(self, body: bytes, limits: BatchLimits, request: RequestFacts) -> list[Row]:
        """The rows of a batch body, message by message; Invalid for the first thing wrong."""
        try:
            envelope = self._envelope.decode(body)
        except msgspec.DecodeError as error:
            raise Invalid(str(error)) from None
        raw_messages = envelope.batch
        if len(raw_messages) > limits.max_events:
            raise Invalid(
                f"{len(raw_messages)} messages in one request; the limit is {limits.max_events} (MAX_BATCH_EVENTS)", 413
            )
        facts = self.batch_facts(request, envelope.sentAt, envelope.context)
        fit = not raw_messages or max(map(len, raw_messages)) <= limits.max_message_bytes
        return self.general_rows(raw_messages, self.decode_batch(body) if fit else None, limits.max_message_bytes, facts)

    def batch_facts(self, request: RequestFacts, sent_at: datetime | None, context: Raw) -> RequestFacts:
        """`request` with the batch's sentAt and its context, enriched once for all its messages."""
        return replace(
            request,
            sent_at=_aware(sent_at) if sent_at is not None else None,
            batch_context=_text(self.enriched(_object(context, "$", "context"), request.request_context), "$", "context"),
        )

    def _all_fit(self, body: bytes, max_message_bytes: int) -> bool:
        """Whether every message of the body is at most max_message_bytes, each measured."""
        try:
            raw_messages = self._envelope.decode(body).batch
        except msgspec.DecodeError:
            return False  # the general path says why
        return not raw_messages or max(map(len, raw_messages)) <= max_message_bytes

    def general_rows(
        self, raw_messages: list[Raw], messages: list[Message] | None, max_message_bytes: int, facts: RequestFacts
    ) -> list[Row]:
        """Message by message, in order, so that the first bad one is the one named. `messages`:
        all of them decoded already, when they could be (else each is decoded here)."""
        rows = []
        for index, raw in enumerate(raw_messages):
            path = f"$.batch[{index}]"
            if len(raw) > max_message_bytes:
                raise Invalid(
                    f"message larger than {max_message_bytes} bytes (SEGMENT_MAX_MESSAGE_BYTES) - at `{path}`", 413
                )
            message = messages[index] if messages is not None else self.decode(raw, path)
            if message.type is None:
                raise Invalid(f"Object missing required field `type` - at `{path}`")
            rows.append(self.row(message, message.type, path, facts))
        return rows

    def decode_batch(self, body: bytes) -> list[Message] | None:
        """Every message of a batch body, decoded in one call; None when one fails to (the
        general path decodes them one by one, to name the first bad one)."""
        try:
            return self._batch.decode(body).batch
        except msgspec.DecodeError:
            return None

    def decode_common(self, body: bytes) -> CommonBatch | None:
        """The batch body decoded in one call when all its messages are CommonMessages; else None."""
        try:
            return self._common.decode(body)
        except msgspec.DecodeError:
            return None

    def common_rows(self, members: CommonMembers, facts: RequestFacts) -> list[Row] | None:
        """The rows `row` gives a batch's CommonMessages when they are alike in their sentAt and
        their context (see the module's doc), each member mapped over the whole batch at once in
        a C loop; None for any other batch, and for one that fails a check, whose errors the
        general path then names."""
        if not members.events:
            return []
        if any(map(str.isspace, members.events)):
            return None
        # True where both are None: neither id (or both the very same text: the general path too).
        if any(map(is_, members.user_ids, members.anonymous_ids)):
            return None
        received_at = facts.received_at
        created_at = _corrected(members.timestamps, members.sent_ats, received_at, facts.sent_at)
        if created_at is None:
            return None
        properties = _object_texts(members.properties)
        if properties is None:
            return None
        contexts: Iterable[str] | None
        if any(members.contexts):
            contexts = self._enriched_contexts(members.contexts, facts.request_context)
            if contexts is None:
                return None
        else:
            contexts = repeat(facts.batch_context)
        return list(map(
            Row, event_ids_of(members.message_ids), members.events, repeat(facts.source), created_at, repeat(received_at),
            properties, contexts, repeat(facts.source_key), members.user_ids, members.anonymous_ids, members.timestamps,
        ))

    def _enriched_contexts(self, own_contexts: list[Raw], request_context: tuple[bytes, bytes]) -> list[str] | None:
        """What `enriched` makes of each message's own context, when every one is an object and
        the request's members go into all of them alike (SDKs send contexts of one shape: a
        server SDK's without `ip` and `userAgent`, analytics.js's with its `userAgent`)."""
        texts = _object_texts(own_contexts)
        if texts is None:
            return None
        ip_member, agent_member = request_context
        if not ip_member and not agent_member:
            return texts
        # Which members each already has, decoded for all of them in one call.
        present = self._presents.decode(b"[" + b",".join(own_contexts) + b"]")
        members = []
        for member, have in ((ip_member, [context.ip for context in present]),
                             (agent_member, [context.userAgent for context in present])):
            if not member or all(have):
                continue
            if any(have):
                return None  # in some of them, not in others: the general path
            members.append(member)
        if not members:
            return texts
        # `_with_members` on each: after the `{` of each text the members, then a comma, unless
        # the object is empty or has white space there (the general path does those).
        second_characters = "".join(map(_SECOND_CHARACTER, texts))
        if any(character in second_characters for character in "} \t\n\r"):
            return None
        head = "{" + b",".join(members).decode() + ","
        return list(map(add, repeat(head), map(_AFTER_FIRST_CHARACTER, texts)))


_FIRST_CHARACTER: Final = itemgetter(0)
_SECOND_CHARACTER: Final = itemgetter(1)  # of an object's text, which is at least `{}`
_AFTER_FIRST_CHARACTER: Final = itemgetter(slice(1, None))


def _object_texts(raws: list[Raw]) -> list[str] | None:
    """The text of each, when each is a JSON object in valid UTF-8; else None (the general path
    names the culprit, or takes an absent or null one for `{}`)."""
    try:
        # Raw bytes are JSON, which holds no NUL byte anywhere: a separator none of them contains
        # (and were one to, the texts would outnumber the raws, and the check below fail).
        texts = str(b"\0".join(raws), "utf-8").split("\0")
        return texts if "".join(map(_FIRST_CHARACTER, texts)) == "{" * len(raws) else None
    except UnicodeDecodeError:  # msgspec does not check the text inside a Raw
        return None
    except IndexError:  # an absent one, whose text is empty
        return None


# What a CommonMessage's JSON holds at the least (its members may come in any order, with white
# space, escapes and ignored members between and in them: only ever more): the braces, its four
# required members and the commas between them, a datetime being at least 20 characters...
_LEAST_MESSAGE: Final = len('{"type":"track","event":"","timestamp":"1970-01-01T00:00:00Z","properties":}')
# ...and for each of these members it has, a comma, its key, and the quotes of a text.
_LEAST_USER_ID: Final = len(',"userId":""')
_LEAST_ANONYMOUS_ID: Final = len(',"anonymousId":""')
_LEAST_MESSAGE_ID: Final = len(',"messageId":""')
_LEAST_CONTEXT: Final = len(',"context":')
_LEAST_SENT_AT: Final = len(',"sentAt":"1970-01-01T00:00:00Z"')


def _surely_fit(body_length: int, members: CommonMembers, max_message_bytes: int) -> bool:
    """Whether no message of the body can be longer than max_message_bytes, from the members
    alone: measuring each message would cost another decoding of the whole body and an object
    a message. No message is longer than the body less what all the others hold at the least
    (what their members take, a text at least a byte a character), and none holds at the least
    more than the longest of each member put together. False also when one only could be
    longer: then each is measured."""
    least = len(members.events) * _LEAST_MESSAGE + sum(map(len, members.properties)) + sum(map(len, members.events))
    longest = _LEAST_MESSAGE + max(map(len, members.properties), default=0) + MAX_NAME_LENGTH
    for texts, least_member, longest_text in (
        (members.user_ids, _LEAST_USER_ID, MAX_USER_ID_LENGTH),
        (members.anonymous_ids, _LEAST_ANONYMOUS_ID, MAX_USER_ID_LENGTH),
        (members.message_ids, _LEAST_MESSAGE_ID, MAX_COMMON_MESSAGE_ID_LENGTH),
    ):
        present = list(filter(None, texts))  # an empty messageId counts as absent: still at the least
        least += len(present) * least_member + sum(map(len, present))
        longest += least_member + longest_text
    contexts = list(filter(None, members.contexts))
    if contexts:
        least += len(contexts) * _LEAST_CONTEXT + sum(map(len, contexts))
        longest += _LEAST_CONTEXT + max(map(len, contexts))
    with_sent_at = len(members.sent_ats) - members.sent_ats.count(None)
    if with_sent_at:
        least += with_sent_at * _LEAST_SENT_AT
        longest += _LEAST_SENT_AT
    return body_length - least + longest <= max_message_bytes


def _corrected(
    timestamps: list[datetime], sent_ats: list[datetime | None], received_at: datetime, batch_sent_at: datetime | None
) -> list[datetime] | None:
    """Each created_at, as `row` corrects it (timestamp + (received_at - sentAt), the message's
    sentAt, else the batch's), when every message has its own sentAt or none has, and when all of
    it lands in the range ClickHouse stores."""
    count = len(timestamps)
    try:
        earliest, latest = min(timestamps), max(timestamps)
        if earliest < EARLIEST or latest > LATEST:
            return None
        if sent_ats.count(None) == count:
            if batch_sent_at is None:
                return timestamps
            skew = received_at - batch_sent_at
            # One correction for all: the earliest and the latest stay the earliest and the latest.
            if earliest + skew < EARLIEST or latest + skew > LATEST:
                return None
            return list(map(add, timestamps, repeat(skew)))
        if sent_ats.count(None):
            return None  # some with a sentAt, some without: the general path
        created_at: list[datetime] = list(map(add, timestamps, map(sub, repeat(received_at), sent_ats)))
        if min(created_at) < EARLIEST or max(created_at) > LATEST:
            return None
    except OverflowError:
        return None
    return created_at

def at_path(message: str, prefix: str) -> str:
    marker = " - at `$"
    if marker in message:
        return message.replace(marker, f" - at `{prefix}", 1)
    return f"{message} - at `{prefix}`"
