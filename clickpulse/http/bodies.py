"""Request bodies: the bytes on the wire and their Content-Encoding, both bounded.

aiohttp's own decompression is switched off (`auto_decompress=False` on the server): it has no
bound on the decoded size. Here the raw body is read up to MAX_BODY_BYTES, then decoded with the
output bounded to MAX_BODY_BYTES as well (zlib's `max_length` over 64 KiB steps of input, zstd's
bounded reader): a ~1 MB body that inflates to a gigabyte is refused once its first
MAX_BODY_BYTES + 1 decoded bytes exist, never more (tests/http/test_bodies.py measures the peak
with tracemalloc: about twice the limit for gzip, the pieces and their join; once for zstd). `InflightBodies` caps the bytes of all bodies being read at once
(MAX_INFLIGHT_BODY_BYTES).
"""

from __future__ import annotations

import io
import zlib
from typing import Literal

import zstandard
from aiohttp import web

Encoding = Literal["identity", "gzip", "deflate", "zstd"]
ENCODINGS: dict[str, Encoding] = {"identity": "identity", "gzip": "gzip", "x-gzip": "gzip", "deflate": "deflate",
                                  "zstd": "zstd"}
SUPPORTED = "gzip, deflate, zstd"


class BodyError(Exception):
    """The body cannot be used; `kind` says how to answer."""

    def __init__(self, kind: Literal["too_large", "invalid", "unsupported", "disconnected"], message: str) -> None:
        super().__init__(message)
        self.kind = kind


def encoding_of(request: web.Request) -> Encoding:
    header = request.headers.get("Content-Encoding")
    if not header:
        return "identity"
    name = header.strip().lower()
    encoding = ENCODINGS.get(name)
    if encoding is None:
        shown = name if len(name) <= 32 and name.isprintable() else name[:32].encode("unicode_escape").decode() + "…"
        raise BodyError("unsupported", f"unsupported Content-Encoding {shown!r}; send {SUPPORTED} or none")
    return encoding


async def read_raw(request: web.Request, max_bytes: int) -> bytes:
    """The body as sent, at most `max_bytes`; a longer one raises BodyError("too_large")."""
    content = request.content
    chunks: list[bytes] = []
    size = 0
    try:
        while True:
            chunk = await content.readany()
            if not chunk:
                break
            size += len(chunk)
            if size > max_bytes:
                raise BodyError("too_large", f"request body larger than {max_bytes} bytes (MAX_BODY_BYTES)")
            chunks.append(chunk)
    except (ConnectionError, web.RequestPayloadError) as error:
        transport = request.transport
        if isinstance(error, ConnectionError) or transport is None or transport.is_closing():
            raise BodyError("disconnected", "the client hung up before sending the whole body") from None
        cause = getattr(error.__cause__, "message", None) or str(error.__cause__ or error)
        raise BodyError("invalid", f"cannot read the request body: {' '.join(str(cause).split())}") from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def decode(raw: bytes, encoding: Encoding, max_bytes: int) -> bytes:
    """`raw` decoded, at most `max_bytes` of output; more raises BodyError("too_large")."""
    if encoding == "identity":
        return raw
    too_large = BodyError("too_large", f"request body larger than {max_bytes} bytes once decoded (MAX_BODY_BYTES)")
    try:
        if encoding == "zstd":
            with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw), read_across_frames=True) as reader:
                decoded = reader.read(max_bytes + 1)
        else:
            if encoding == "gzip":
                wbits = 16 + zlib.MAX_WBITS
            else:  # deflate: zlib-wrapped as the RFC says, or raw as some clients send it
                wbits = zlib.MAX_WBITS if raw[:1] and (raw[0] & 0x0F) == 8 and int.from_bytes(raw[:2]) % 31 == 0 \
                    else -zlib.MAX_WBITS
            inflated = _inflate(raw, wbits, max_bytes)
            if inflated is None:
                raise BodyError("invalid", f"cannot read the request body: truncated {encoding} data")
            decoded = inflated
    except (zlib.error, zstandard.ZstdError) as error:
        raise BodyError("invalid", f"cannot read the request body: not valid {encoding} data ({error})") from None
    if len(decoded) > max_bytes:
        raise too_large
    return decoded


_INFLATE_STEP = 64 * 1024


def _inflate(raw: bytes, wbits: int, max_bytes: int) -> bytes | None:
    """zlib/gzip data inflated to at most max_bytes + 1 bytes, fed 64 KiB at a time (so no copy
    of the rest of the input is made per call); None when the data ends before its end marker."""
    inflater = zlib.decompressobj(wbits)
    view = memoryview(raw)
    pieces: list[bytes] = []
    room = max_bytes + 1
    for start in range(0, len(raw), _INFLATE_STEP):
        data: bytes | memoryview = view[start:start + _INFLATE_STEP]
        while data and room > 0 and not inflater.eof:
            piece = inflater.decompress(data, room)
            pieces.append(piece)
            room -= len(piece)
            data = inflater.unconsumed_tail
        if room <= 0 or inflater.eof:
            break
    decoded = b"".join(pieces)
    if len(decoded) <= max_bytes and not inflater.eof:
        return None
    return decoded


class InflightBodies:
    """Bytes of request bodies being read right now, at most `capacity` (0: no cap)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held = 0

    def reserve(self, size: int) -> bool:
        if self.capacity and self.held + size > self.capacity:
            return False
        self.held += size
        return True

    def release(self, size: int) -> None:
        self.held -= size
