"""The record format (clickpulse.spool.record): byte-exact encoding, scanning, damage detection."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable

import pytest

from clickpulse.messages import SpoolPosition
from clickpulse.spool import HEADER, MAGIC, encode_record, scan_extents, scan_segment
from clickpulse.spool.record import checksum, record_end
from tests.spool.helpers import rows


def test_a_record_is_the_documented_header_then_the_payload_byte_for_byte() -> None:
    payload = rows("a", 2)
    crc = zlib.crc32(payload, zlib.crc32(struct.pack("<IQ", 2, 1_700_000_000_123)))
    expected = b"CPR1" + struct.pack("<III", len(payload), 2, crc) + struct.pack("<Q", 1_700_000_000_123) + payload

    assert encode_record(payload, 2, 1_700_000_000_123) == expected
    assert MAGIC == b"CPR1"
    assert HEADER.size == 24
    assert checksum(2, 1_700_000_000_123, payload) == crc


def test_encoded_records_scan_back_with_positions_counts_and_receipt_times() -> None:
    first = encode_record(rows("a", 2), 2, 1_700_000_000_123)
    second = encode_record(rows("b"), 1, 1_700_000_000_456)

    records, intact = scan_segment(7, first + second)

    assert intact == len(first) + len(second)
    assert [(r.position, r.end, r.count, r.received_ms, r.payload) for r in records] == [
        (SpoolPosition(7, 0), len(first), 2, 1_700_000_000_123, rows("a", 2)),
        (SpoolPosition(7, len(first)), len(first) + len(second), 1, 1_700_000_000_456, rows("b")),
    ]
    assert record_end(records[1].position, len(rows("b"))) == SpoolPosition(7, records[1].end)


@pytest.mark.parametrize(
    "damage",
    [
        lambda record: record[:-1],  # torn payload
        lambda record: record[: HEADER.size - 3],  # torn header
        lambda record: record[:-2] + b"X" + record[-1:],  # payload changed: checksum fails
        lambda record: b"XXXX" + record[4:],  # bad magic
        lambda record: record[:8] + (5).to_bytes(4, "little") + record[12:],  # count changed: checksum fails
        lambda record: record[:16] + (9).to_bytes(8, "little") + record[24:],  # time changed: checksum fails
    ],
    ids=["torn-payload", "torn-header", "flipped-payload-byte", "bad-magic", "changed-count", "changed-time"],
)
def test_scan_stops_at_a_damaged_record_and_reports_where_intact_data_ends(damage: Callable[[bytes], bytes]) -> None:
    good = encode_record(rows("good"), 1, 1)
    bad = damage(encode_record(rows("bad"), 1, 2))
    after = encode_record(rows("after"), 1, 3)

    records, intact = scan_segment(1, good + bad + after)

    assert [record.payload for record in records] == [rows("good")]
    assert intact == len(good)


def test_extents_say_where_each_intact_record_lies_without_copying_payloads() -> None:
    records = [encode_record(rows(f"r{index}"), index + 1, 1000 + index) for index in range(3)]
    data = b"".join(records) + records[0][:10]  # a torn fourth record

    extents, intact = scan_extents(data)

    offsets = [sum(map(len, records[:index])) for index in range(4)]
    assert extents == [(offsets[index], offsets[index + 1], index + 1, 1000 + index) for index in range(3)]
    assert intact == offsets[3]
    assert scan_extents(data[offsets[1]:], base_offset=offsets[1]) == (extents[1:], intact)


def test_scan_of_a_slice_reports_positions_in_the_segment() -> None:
    first = encode_record(rows("a"), 1, 1)
    second = encode_record(rows("b"), 1, 2)

    records, intact = scan_segment(2, second, base_offset=len(first))

    assert [(record.position, record.end) for record in records] == [(SpoolPosition(2, len(first)), len(first) + len(second))]
    assert intact == len(first) + len(second)
