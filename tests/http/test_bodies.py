"""Decoding under MAX_BODY_BYTES: a body of about a megabyte that inflates to a gigabyte is
refused without ever holding more than the limit of decoded bytes (measured with tracemalloc)."""

from __future__ import annotations

import time
import tracemalloc
import zlib

import pytest
import zstandard

from clickpulse.http.bodies import BodyError, decode

GIB = 1 << 30
MIB = 1 << 20


def gigabyte_bomb(encoding: str) -> bytes:
    """1 GiB of zeros, compressed a mebibyte at a time (never held whole)."""
    zeros = bytes(MIB)
    parts: list[bytes] = []
    if encoding == "zstd":
        compressor = zstandard.ZstdCompressor(level=1).compressobj()
        for _ in range(GIB // MIB):
            parts.append(compressor.compress(zeros))
        parts.append(compressor.flush())
    else:
        deflater = zlib.compressobj(9, wbits=16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
        for _ in range(GIB // MIB):
            parts.append(deflater.compress(zeros))
        parts.append(deflater.flush())
    return b"".join(parts)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "zstd"])
def test_a_gigabyte_bomb_is_refused_holding_at_most_the_limit(encoding: str) -> None:
    bomb = gigabyte_bomb(encoding)
    assert len(bomb) <= 1100 * 1024  # about a megabyte on the wire (deflate's ratio is ~1000:1)

    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(BodyError) as caught:
            decode(bomb, encoding, MIB)  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert caught.value.kind == "too_large"
    # The decoded bytes (at most the limit + 1) and, for a moment, their join: about twice the limit.
    assert peak < 2.5 * MIB, f"{peak / MIB:.2f} MiB held while decoding"
    assert time.perf_counter() - started < 1.0  # it stops at the limit, it does not inflate it all
