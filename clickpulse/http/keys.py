"""Ingest keys: INGEST_KEYS_FILE (TOML), how a request presents one, and reload on SIGHUP.

A key has a name (logged, stored with each row, a metric label) and a secret (never logged,
never in an answer or a metric). Secrets are looked up by their BLAKE2s-256 digest: the lookup
compares digests, never secrets, so how long it takes says nothing of how much of a guessed
secret is right (one character more or less changes every byte of the digest), and a constant-time
comparison after it would compare two equal digests. (BLAKE2s rather than SHA-256: as strong for
this, and 0.3 µs per request instead of 0.7 for a short secret.)

- `server` keys are presented only in a header: `Authorization: Bearer <secret>`, or HTTP Basic
  with the secret as the user name (what analytics SDKs send).
- `browser` keys are public: also accepted as `?key=<secret>` (sendBeacon cannot set headers),
  and only from the origins listed with them.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from clickpulse.config import ConfigError
from clickpulse.http.origins import OriginPatterns

log = logging.getLogger("clickpulse.http")

KeyKind = Literal["server", "browser"]
KEY_KINDS: tuple[KeyKind, ...] = ("server", "browser")
KEY_FIELDS = frozenset({"name", "secret", "kind", "origins", "events_per_second", "burst"})
# A name is a metric label value and a stored column value: short and plain.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MIN_SECRET_LENGTH = 16
RESERVED_NAME = "none"  # the metric label of events sent without a key


class KeyFileError(ConfigError):
    """INGEST_KEYS_FILE cannot be used; one line naming the file and the entry, never a secret."""


@dataclass(frozen=True, slots=True)
class IngestKey:
    name: str
    kind: KeyKind
    digest: bytes = b""  # BLAKE2s-256 of the secret; the secret itself is not kept
    origins: OriginPatterns = OriginPatterns(())
    events_per_second: float | None = None
    burst: int | None = None

    def __repr__(self) -> str:  # never the digest either
        return f"IngestKey(name={self.name!r}, kind={self.kind!r})"


def _digest(secret: str) -> bytes:
    # A presented secret may hold surrogates (aiohttp decodes a header's bytes that are not UTF-8
    # into them): encoded as they come, they match no key instead of raising.
    return hashlib.blake2s(secret.encode("utf-8", "surrogatepass")).digest()


class KeyRing:
    """The keys of one version of the file."""

    def __init__(self, keys: tuple[IngestKey, ...] = ()) -> None:
        self.keys = keys
        self._by_digest = {key.digest: key for key in keys}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(key.name for key in self.keys)

    def find(self, secret: str) -> IngestKey | None:
        return self._by_digest.get(_digest(secret))

    @property
    def browser_origins(self) -> Iterable[OriginPatterns]:
        return (key.origins for key in self.keys if key.kind == "browser")


def parse_keys(text: str, source: str) -> KeyRing:
    """Raises KeyFileError naming `source` and the entry (`keys[2]` and its name when known)."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise KeyFileError(f"invalid INGEST_KEYS_FILE {source}: not TOML: {error}") from None
    unknown_top = sorted(set(document) - {"keys"})
    if unknown_top:
        raise KeyFileError(f"invalid INGEST_KEYS_FILE {source}: unknown table {unknown_top[0]!r}; use [[keys]]")
    entries = document.get("keys", [])
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise KeyFileError(f"invalid INGEST_KEYS_FILE {source}: `keys` must be an array of tables ([[keys]])")
    keys: list[IngestKey] = []
    names: set[str] = set()
    digests: set[bytes] = set()
    for index, entry in enumerate(entries):
        where = f"invalid INGEST_KEYS_FILE {source}: keys[{index}]"
        name = entry.get("name")
        if isinstance(name, str):
            where += f" (name {name!r})"

        def fail(message: str) -> KeyFileError:
            return KeyFileError(f"{where}: {message}")

        unknown = sorted(set(entry) - KEY_FIELDS)
        if unknown:
            raise fail(f"unknown field {unknown[0]!r} (allowed: {', '.join(sorted(KEY_FIELDS))})")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise fail("`name` must be 1-64 letters, digits, `_`, `.` or `-`, starting with a letter or digit")
        secret = entry.get("secret")
        if not isinstance(secret, str) or len(secret) < MIN_SECRET_LENGTH or not secret.isprintable() or " " in secret:
            raise fail(f"`secret` must be a string of at least {MIN_SECRET_LENGTH} printable characters without spaces")
        kind = entry.get("kind")
        if kind not in KEY_KINDS:
            raise fail("`kind` must be \"server\" or \"browser\"")
        origins = entry.get("origins")
        if kind == "server" and origins is not None:
            raise fail("`origins` is for browser keys only")
        if kind == "browser":
            if not isinstance(origins, list) or not origins or not all(isinstance(o, str) for o in origins):
                raise fail("a browser key needs `origins`, a non-empty list of origins like \"https://shop.example\"")
            try:
                patterns = OriginPatterns.parse(origins)
            except ValueError as error:
                raise fail(f"`origins`: {error}") from None
        else:
            patterns = OriginPatterns(())
        rate = entry.get("events_per_second")
        burst = entry.get("burst")
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0):
            raise fail("`events_per_second` must be a positive number")
        if burst is not None and (isinstance(burst, bool) or not isinstance(burst, int) or burst <= 0):
            raise fail("`burst` must be a positive whole number")
        if burst is not None and rate is None:
            raise fail("`burst` needs `events_per_second`")
        if name == RESERVED_NAME:
            raise fail(f"the name {RESERVED_NAME!r} is reserved: it labels events sent without a key")
        if name in names:
            raise fail("duplicate name")
        digest = _digest(secret)
        if digest in digests:
            raise fail("duplicate secret (the same secret as an earlier entry)")
        names.add(name)
        digests.add(digest)
        keys.append(IngestKey(
            name=name, kind=kind, digest=digest, origins=patterns,
            events_per_second=float(rate) if rate is not None else None,
            burst=burst if burst is not None else (max(1, int(rate)) if rate is not None else None),
        ))
    return KeyRing(tuple(keys))


def load_keys(path: Path) -> KeyRing:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else type(error).__name__
        raise KeyFileError(f"invalid INGEST_KEYS_FILE {path}: cannot read it: {reason}") from None
    return parse_keys(text, str(path))


Presented = tuple[str, Literal["header", "query"]] | None


def presented_secret(authorization: str | None, query_key: str | None) -> Presented:
    """The secret a request presents and where, or None. A malformed header counts as none."""
    if authorization:
        # Edge.admit reads the commonest spelling, "Bearer <secret>", itself before calling this.
        scheme, _, value = authorization.strip().partition(" ")
        scheme = scheme.lower()
        value = value.strip()
        if scheme == "bearer" and value:
            return value, "header"
        if scheme == "basic" and value:
            try:
                decoded = base64.b64decode(value, validate=True).decode()
            except (ValueError, UnicodeDecodeError):  # binascii.Error, or text that is not ASCII
                return None
            user, _, password = decoded.partition(":")
            secret = user or password  # the secret as user name (SDKs); some send it as the password
            return (secret, "header") if secret else None
        return None
    if query_key:
        return query_key, "query"
    return None


class KeyStore:
    """The current KeyRing; `reload()` swaps in a new one atomically or keeps the old one."""

    def __init__(self, path: Path | None, ring: KeyRing | None = None) -> None:
        self.path = path
        self.ring = ring if ring is not None else (load_keys(path) if path is not None else KeyRing())

    @property
    def configured(self) -> bool:
        return self.path is not None

    def reload(self) -> bool:
        """Reads the file again; on an error logs why and keeps the keys it had. True if swapped."""
        if self.path is None:
            return False
        try:
            ring = load_keys(self.path)
        except KeyFileError as error:
            log.warning("SIGHUP: keeping the %d keys in use: %s", len(self.ring.keys), error)
            return False
        self.ring = ring
        log.info("SIGHUP: %d ingest keys loaded from %s", len(ring.keys), self.path)
        return True


def first_server_secret(path: Path) -> str | None:
    """The secret of the first server key in the file, for `python -m clickpulse query` asking
    the running service's /query (which needs one when keys are configured)."""
    load_keys(path)  # the same errors as at start
    document = tomllib.loads(path.read_text(encoding="utf-8"))
    for entry in document.get("keys", []):
        if entry.get("kind") == "server":
            secret = entry.get("secret")
            return secret if isinstance(secret, str) else None
    return None
