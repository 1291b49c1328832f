"""Server-side enrichment of every row, whatever endpoint received it: when clickpulse received
it (`received_at`) and a `context` object with the client's address (ENRICH_IP) and User-Agent.

Computed once per request; the /v1 API merges it into each message's own context, POST /events
sets it on every event as pre-encoded JSON values (`events.RowStamp`, the text cached per second
and per client), like the ingest key's name.
"""

from __future__ import annotations

import ipaddress
import re
import time
from datetime import datetime, timezone

import msgspec
from msgspec import Raw
from aiohttp import hdrs, web

from clickpulse.config import EnrichIp

_encode = msgspec.json.encode
# aiohttp decodes a header's bytes that are not UTF-8 into lone surrogates, which JSON text
# cannot hold (msgspec refuses to encode them).
_SURROGATE = re.compile("[\ud800-\udfff]")


def header_text_value(text: str) -> bytes:
    """A header's text as an encoded JSON string; each byte of it that was not UTF-8 is U+FFFD."""
    try:
        return _encode(text)
    except UnicodeEncodeError:
        return _encode(_SURROGATE.sub("\ufffd", text))


def anonymize(address: str) -> str:
    """The last octet of an IPv4 address, the last 80 bits of an IPv6 one, zeroed."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return ""
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ipaddress.IPv4Address(int(ip) & 0xFFFFFF00))
    if ip.ipv4_mapped is not None:
        return anonymize(str(ip.ipv4_mapped))
    return str(ipaddress.IPv6Address(int(ip) & ~((1 << 80) - 1)))


CONTEXT_CACHE_ENTRIES = 4096


class Enricher:
    def __init__(self, mode: EnrichIp = "true") -> None:
        self._mode = mode
        # (client, User-Agent) → the `context` value of /events rows, encoded: the hot path pays a
        # dict lookup, not two encodes. Bounded: emptied when full.
        self._contexts: dict[tuple[str, str | None], Raw] = {}
        self._second = -1
        self._second_text = ""
        self._millisecond = -1
        self._received_at = Raw(b'""')

    def context_value(self, request: web.Request, client: str) -> Raw:
        """`"{…}"`: the request's context object as an encoded JSON string (the column is text)."""
        agent = request.headers.get(hdrs.USER_AGENT)
        cache = self._contexts
        value = cache.get((client, agent))
        if value is None:
            if len(cache) >= CONTEXT_CACHE_ENTRIES:
                cache.clear()
            value = Raw(_encode(self.context(request, client).decode()))
            cache[(client, agent)] = value
        return value

    def received_at_value(self) -> Raw:
        """`"…Z"`: now, to the millisecond, encoded (built once per millisecond; the text up to
        the second once per second)."""
        millisecond = time.time_ns() // 1_000_000
        if millisecond == self._millisecond:
            return self._received_at
        second, milliseconds = divmod(millisecond, 1000)
        if second != self._second:
            self._second = second
            self._second_text = '"' + time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
        self._millisecond = millisecond
        self._received_at = Raw(f'{self._second_text}{milliseconds:03d}Z"'.encode())
        return self._received_at

    def ip(self, client: str) -> str | None:
        """The address to record, or None (ENRICH_IP=false, or no address known)."""
        if self._mode == "false" or not client:
            return None
        if self._mode == "anonymize":
            return anonymize(client) or None
        return client

    def context_members(self, request: web.Request, client: str) -> tuple[bytes, bytes]:
        """The JSON members `"ip":"…"` and `"userAgent":"…"`, each b"" when there is none."""
        ip = self.ip(client)
        agent = request.headers.get(hdrs.USER_AGENT)
        return (
            b'"ip":' + _encode(ip) if ip is not None else b"",
            b'"userAgent":' + header_text_value(agent) if agent else b"",
        )

    def context(self, request: web.Request, client: str) -> bytes:
        """The JSON object of the request's context: `{"ip":…,"userAgent":…}` (or `{}`)."""
        members = [member for member in self.context_members(request, client) if member]
        return b"{" + b",".join(members) + b"}"


def now() -> datetime:
    return datetime.now(timezone.utc)
