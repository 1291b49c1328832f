"""Server-side enrichment of every row, whatever endpoint received it: when clickpulse received
it (`received_at`) and a `context` object with the client's address (ENRICH_IP) and User-Agent.

Computed once per request; the /v1 API merges it into each message's own context, POST /events
splices it into every JSONEachRow line (`with_enrichment`), like the ingest key's name.
"""

from __future__ import annotations

import ipaddress
from datetime import datetime, timezone

import msgspec
from aiohttp import hdrs, web

from clickpulse.config import EnrichIp

_encode = msgspec.json.encode


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


class Enricher:
    def __init__(self, mode: EnrichIp = "true") -> None:
        self._mode = mode

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
            b'"userAgent":' + _encode(agent) if agent else b"",
        )

    def context(self, request: web.Request, client: str) -> bytes:
        """The JSON object of the request's context: `{"ip":…,"userAgent":…}` (or `{}`)."""
        members = [member for member in self.context_members(request, client) if member]
        return b"{" + b",".join(members) + b"}"


def now() -> datetime:
    return datetime.now(timezone.utc)


def timestamp_text(moment: datetime) -> str:
    """ISO 8601 with milliseconds and `Z`, as msgspec writes datetimes (ClickHouse parses it)."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
