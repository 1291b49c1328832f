"""The documentation's tables are the product's reference: they must say what the code does. The
configuration table lives in docs/configuration.md, the metrics table in docs/observability.md;
the README's first code block holds the start and test commands."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec

from clickpulse.config import SETTINGS, Config
from clickpulse.metrics import METRIC_LABELS, PipelineMetrics

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def table_rows(page: str, heading: str) -> list[list[str]]:
    section = (ROOT / "docs" / page).read_text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows[1:]  # without the header


def test_metrics_table_lists_exactly_the_registered_metrics_with_their_types() -> None:
    documented = {row[0].strip("`"): row[1] for row in table_rows("observability.md", "Metrics")}
    registered = {collector.name: collector.kind.name for collector in PipelineMetrics().registry.get_all()}
    assert documented == registered


def test_metrics_table_lists_the_declared_label_names_of_every_metric() -> None:
    documented = {
        row[0].strip("`"): tuple(label.strip().strip("`") for label in row[2].split(",") if label.strip())
        for row in table_rows("observability.md", "Metrics")
    }
    declared = {name: METRIC_LABELS.get(name, ()) for name in documented}
    assert documented == declared, "docs/observability.md labels column and clickpulse.metrics.METRIC_LABELS disagree"


def test_configuration_table_lists_every_setting_with_its_real_default() -> None:
    # A default cell is its value in backticks, perhaps followed by a remark; "unset" means None.
    documented = {row[0].strip("`"): row[1].split("`")[1] if "`" in row[1] else row[1] for row in table_rows("configuration.md", "Settings")}
    assert set(documented) == {setting.variable for setting in SETTINGS}
    defaults = msgspec.structs.asdict(Config())
    for setting in SETTINGS:
        shown = documented[setting.variable]
        default = defaults[setting.field]
        parsed = None if shown.startswith("unset") else setting.parse(shown)
        assert parsed == default, f"{setting.variable}: docs/configuration.md says {shown!r}, code defaults to {default!r}"


def test_the_first_screen_has_the_start_and_test_commands_that_ci_runs() -> None:
    first_block = re.search(r"```sh\n(.*?)```", README, re.S).group(1)
    commands = [line for line in first_block.splitlines() if line and not line.startswith("#")]
    assert commands[0].endswith("python3 -m clickpulse")
    # Works where the system Python refuses `pip install` (Debian, Ubuntu) and on macOS: the first
    # command makes the virtual environment itself, the second uses the same one.
    assert commands[0].startswith("python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[embedded]'")
    assert commands[1].startswith(". .venv/bin/activate && pip install -e '.[test]'")
    test_command = commands[1].split("&&")[-1].strip()
    ci_script = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci_script.splitlines()


def test_the_readme_names_every_setting_and_links_its_reference() -> None:
    from clickpulse.config import SETTINGS

    section = README.split("## Configuration\n", 1)[1].split("\n## ", 1)[0]
    assert [name for name in (setting.variable for setting in SETTINGS) if f"`{name}`" not in section] == []
    assert "(docs/configuration.md)" in section
