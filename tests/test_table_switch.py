"""CLICKHOUSE_CREATE_TABLE: parsing, and how the Writer reports a table it may not create."""

from __future__ import annotations

import pytest

from clickpulse.config import ConfigError, load_config
from clickpulse.writer.errors import TableMissing, classify_error

DSN = {"CLICKHOUSE_DSN": "http://localhost:8123/db"}


def test_tables_are_created_by_default() -> None:
    assert load_config([], DSN).clickhouse_create_table is True


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("TRUE", True), ("1", True), ("yes", True), ("on", True),
     ("false", False), ("False", False), ("0", False), ("no", False), (" off ", False)],
)
def test_create_table_accepts_the_usual_booleans(text: str, expected: bool) -> None:
    assert load_config([], {**DSN, "CLICKHOUSE_CREATE_TABLE": text}).clickhouse_create_table is expected


def test_the_flag_wins_over_the_variable() -> None:
    config = load_config(["--clickhouse-create-table", "false"], {**DSN, "CLICKHOUSE_CREATE_TABLE": "true"})

    assert config.clickhouse_create_table is False


@pytest.mark.parametrize("text", ["maybe", "2", "t r u e"])
def test_anything_else_is_a_config_error_naming_the_variable(text: str) -> None:
    with pytest.raises(ConfigError, match="CLICKHOUSE_CREATE_TABLE"):
        load_config([], {**DSN, "CLICKHOUSE_CREATE_TABLE": text})


def test_a_missing_table_that_may_not_be_created_is_a_retryable_schema_failure() -> None:
    failure = classify_error(TableMissing("table db.events does not exist and CLICKHOUSE_CREATE_TABLE=false: create it first"))

    assert (failure.kind, failure.retryable) == ("schema", True)
    assert "CLICKHOUSE_CREATE_TABLE=false" in failure.detail
