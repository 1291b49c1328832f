"""The query command's table: drawn from ClickHouse's JSONCompact answer, the same for every
backend, with a header and a row count even when no row matched, coloured only when asked."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest

from clickpulse.config import Config
from clickpulse.query import QueryFailed, render_table, run_query


def answer(meta: list[tuple[str, str]], data: list[list[object]]) -> str:
    return msgspec.json.encode({
        "meta": [{"name": name, "type": kind} for name, kind in meta], "data": data, "rows": len(data),
    }).decode()


def test_a_result_is_a_table_with_numbers_on_the_right_and_a_row_count() -> None:
    text = render_table(answer([("event_type", "LowCardinality(String)"), ("count()", "UInt64")], [["signup", 1], ["click", 12345678]]))
    assert text == (
        "┌─event_type─┬──count()─┐\n"
        "│ signup     │        1 │\n"
        "│ click      │ 12345678 │\n"
        "└────────────┴──────────┘\n"
        "2 rows\n"
    )


def test_an_empty_result_prints_the_header_and_0_rows() -> None:
    text = render_table(answer([("event_type", "String"), ("count()", "UInt64")], []))
    assert text == "┌─event_type─┬─count()─┐\n└────────────┴─────────┘\n0 rows\n"


def test_one_row_is_singular_and_nulls_and_controls_are_visible() -> None:
    text = render_table(answer([("user_id", "Nullable(String)"), ("text", "String")], [[None, "a\tb\nc\x01"]]))
    assert "│ NULL    │ a\\tb\\nc\\x01 │" in text and text.endswith("\n1 row\n")


def test_wide_characters_keep_the_columns_aligned() -> None:
    lines = render_table(answer([("s", "String")], [["中文"], ["ab"]])).splitlines()
    assert lines[1] == "│ 中文 │" and lines[2] == "│ ab   │"


def test_colour_is_only_the_bold_header_and_only_when_asked() -> None:
    result = answer([("n", "UInt8")], [[1]])
    assert "\033[" not in render_table(result)
    assert "\033[1mn\033[0m" in render_table(result, colour=True)


def test_a_statement_without_a_result_set_prints_ok_and_other_formats_pass_through() -> None:
    assert render_table("") == "Ok.\n"
    assert render_table('{"x":1}\n') == '{"x":1}\n'


def test_query_on_a_missing_data_dir_fails_with_status_2_naming_it_and_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "elsewhere"
    with pytest.raises(QueryFailed) as failure:
        asyncio.run(run_query(Config(data_dir=missing), "SELECT 1"))
    assert failure.value.exit_status == 2
    assert str(failure.value).startswith(f"DATA_DIR='{missing}'")
    assert not missing.exists()
