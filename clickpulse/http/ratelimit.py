"""Rate limits counted in events: a token bucket per key (its `events_per_second` and `burst`)
and, with RATE_LIMIT_EVENTS_PER_SECOND, one per client address for requests without a key.

The per-address buckets live in an LRU of at most `max_addresses` entries: a flood of
addresses evicts the least recently seen, so memory stays bounded (an evicted address starts
again with a full bucket, which is the cheap failure). `client_address` decides who the client
is: the socket's peer, or, when that peer is one of TRUSTED_PROXIES, the right-most address of
X-Forwarded-For that is not itself a trusted proxy.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

MAX_ADDRESSES = 65_536

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: str) -> tuple[Network, ...]:
    """`10.0.0.0/8, 127.0.0.1, ::1` → networks; raises ValueError naming the bad entry."""
    networks = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"{part!r} is not an address or CIDR like 10.0.0.0/8") from None
    return tuple(networks)


def _is_trusted(address: str, trusted: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def client_address(peer: str | None, forwarded_for: str | None, trusted: Sequence[Network]) -> str:
    peer = peer or ""
    if not trusted or not forwarded_for or not _is_trusted(peer, trusted):
        return peer
    for hop in reversed([part.strip() for part in forwarded_for.split(",")]):
        if not hop:
            continue
        if not _is_trusted(hop, trusted):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer  # garbage from a client behind the proxy: the proxy is the client
    return peer


@dataclass(slots=True)
class Bucket:
    tokens: float
    updated: float


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    limit: int
    remaining: int
    reset: int  # seconds until the bucket is full again
    retry_after: int  # seconds until this request would fit (0 when allowed)

    def headers(self) -> dict[str, str]:
        headers = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset),
        }
        if not self.allowed:
            headers["Retry-After"] = str(self.retry_after)
        return headers


class TokenBuckets:
    """Buckets by name, refilled at `rate` events/s up to `burst`; at most `max_entries` kept."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float], max_entries: int = MAX_ADDRESSES) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._max_entries = max_entries
        self._buckets: OrderedDict[str, Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, who: str, events: int) -> Verdict:
        now = self._clock()
        buckets = self._buckets
        bucket = buckets.get(who)
        if bucket is None:
            bucket = Bucket(float(self.burst), now)
            buckets[who] = bucket
            if len(buckets) > self._max_entries:
                buckets.popitem(last=False)
        else:
            buckets.move_to_end(who)
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
        allowed = events <= bucket.tokens
        if allowed:
            bucket.tokens -= events
            retry_after = 0
        else:
            # More events than the burst never fit: say when the bucket is full, at least.
            missing = min(events, self.burst) - bucket.tokens
            retry_after = max(1, math.ceil(missing / self.rate))
        return Verdict(
            allowed=allowed,
            limit=self.burst,
            remaining=int(bucket.tokens),
            reset=math.ceil((self.burst - bucket.tokens) / self.rate),
            retry_after=retry_after,
        )
