"""The spool's record format, byte for byte what every version so far wrote and reads.

A record is a header — magic `CPR1`, payload length, event count, CRC-32 of count+time+payload,
receipt time in unix milliseconds, all little-endian — then the payload (the request's
JSONEachRow lines). A segment file is records back to back; scanning stops at the first record
that is torn or fails its checksum, and reports where the intact data ends.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from clickpulse.messages import SpoolPosition

MAGIC = b"CPR1"
HEADER = struct.Struct("<4sIIIQ")  # magic, payload length, event count, crc32, received unix ms
_COUNT_AND_TIME = struct.Struct("<IQ")


def checksum(count: int, received_ms: int, payload: bytes | memoryview) -> int:
    return zlib.crc32(payload, zlib.crc32(_COUNT_AND_TIME.pack(count, received_ms)))


def encode_record(payload: bytes, count: int, received_ms: int) -> bytes:
    return HEADER.pack(MAGIC, len(payload), count, checksum(count, received_ms, payload), received_ms) + payload


def record_end(position: SpoolPosition, payload_length: int) -> SpoolPosition:
    """Where the record at `position` with a payload of `payload_length` bytes ends."""
    return SpoolPosition(position.segment, position.offset + HEADER.size + payload_length)


@dataclass(slots=True)
class ScannedRecord:
    position: SpoolPosition
    end: int
    count: int
    received_ms: int
    payload: bytes | None  # None when the scan was told not to keep it (it is read back later)


def _keep_every_payload(position: SpoolPosition, count: int) -> bool:
    return True


def scan_segment(
    number: int,
    data: bytes,
    keep_payload: Callable[[SpoolPosition, int], bool] = _keep_every_payload,
    *,
    base_offset: int = 0,
) -> tuple[list[ScannedRecord], int]:
    """The intact records of segment `number`, and the offset where intact data ends.

    `data` starts at `base_offset` in the segment (a read-back of a few records). `keep_payload`
    is asked, in log order, whether each intact record keeps its payload; the payloads of the
    others are never copied out of `data`."""
    records = []
    offset = 0
    size = len(data)
    with memoryview(data) as view:
        while offset + HEADER.size <= size:
            magic, length, count, crc, received_ms = HEADER.unpack_from(data, offset)
            start = offset + HEADER.size
            end = start + length
            if magic != MAGIC or end > size or checksum(count, received_ms, view[start:end]) != crc:
                break
            position = SpoolPosition(number, base_offset + offset)
            payload = data[start:end] if keep_payload(position, count) else None
            records.append(ScannedRecord(position, base_offset + end, count, received_ms, payload))
            offset = end
    return records, base_offset + offset
