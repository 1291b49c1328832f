"""The spool's record format, byte for byte what every version so far wrote and reads.

A record is a header — magic `CPR1`, payload length, event count, CRC-32 of count+time+payload,
receipt time in unix milliseconds, all little-endian — then the payload (the request's
JSONEachRow lines). A segment file is records back to back; scanning stops at the first record
that is torn or fails its checksum, and reports where the intact data ends.
"""

from __future__ import annotations

import struct
import zlib
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


# (offset, end, event count, receipt unix ms) of one record in its segment. Plain tuples of ints:
# the garbage collector stops tracking them, so a spool of millions of records costs nothing at
# every full collection.
Extent = tuple[int, int, int, int]


def scan_extents(data: bytes, base_offset: int = 0) -> tuple[list[Extent], int]:
    """Where each intact record of `data` (which starts at `base_offset` in its segment) lies,
    and the offset where intact data ends: at the first torn record or failed checksum."""
    extents = []
    offset = 0
    size = len(data)
    header_size, unpack_from = HEADER.size, HEADER.unpack_from
    with memoryview(data) as view:
        while offset + header_size <= size:
            magic, length, count, crc, received_ms = unpack_from(data, offset)
            start = offset + header_size
            end = start + length
            if magic != MAGIC or end > size or checksum(count, received_ms, view[start:end]) != crc:
                break
            extents.append((base_offset + offset, base_offset + end, count, received_ms))
            offset = end
    return extents, base_offset + offset


@dataclass(slots=True)
class ScannedRecord:
    position: SpoolPosition
    end: int
    count: int
    received_ms: int
    payload: bytes


def scan_segment(number: int, data: bytes, *, base_offset: int = 0) -> tuple[list[ScannedRecord], int]:
    """The intact records of segment `number` in `data` (which starts at `base_offset` in the
    segment), and the offset where intact data ends."""
    extents, intact = scan_extents(data, base_offset)
    records = [
        ScannedRecord(SpoolPosition(number, offset), end, count, received_ms, data[offset - base_offset + HEADER.size : end - base_offset])
        for offset, end, count, received_ms in extents
    ]
    return records, intact
