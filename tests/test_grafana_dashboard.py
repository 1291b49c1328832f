"""The Grafana dashboard and its provisioning: generated from code, structurally sound, and built
only from metrics the Registry has. (tests/integration/test_observability.py runs every query.)"""

from __future__ import annotations

import itertools
import re

import pytest

from clickpulse.metrics import METRIC_LABELS, PipelineMetrics
from tests.promql import (
    GRAFANA_DIR,
    PROMETHEUS_DIR,
    alert_comparisons,
    alert_rules,
    dashboard,
    dashboard_generator,
    dashboard_queries,
    load_yaml,
    registered_name,
    selected_metrics,
)

BOARD = dashboard()
PANELS = [panel for panel in BOARD["panels"] if panel["type"] != "row"]
DATASOURCE_VARIABLE = {"type": "prometheus", "uid": "${datasource}"}


def registry_kinds() -> dict[str, str]:
    return {collector.name: collector.kind.name for collector in PipelineMetrics().registry.get_all()}


def provisioned_datasource() -> dict:
    (datasource,) = load_yaml(GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    return datasource


def panels_titled(title: str) -> list[dict]:
    found = [candidate for candidate in PANELS if candidate["title"] == title]
    assert found, title
    return found


def test_the_committed_json_is_what_the_generator_writes() -> None:
    assert dashboard_generator().render() == (GRAFANA_DIR / "dashboards" / "clickpulse.json").read_text(), (
        "ops/grafana/dashboards/clickpulse.json is stale: run python3 ops/grafana/generate_dashboard.py"
    )


def test_panel_ids_are_unique() -> None:
    ids = [each["id"] for each in BOARD["panels"]]
    assert len(ids) == len(set(ids))


def test_grid_positions_stay_on_the_grid_and_never_overlap() -> None:
    boxes = [(each["title"], each["gridPos"]) for each in BOARD["panels"]]
    for title, box in boxes:
        assert box["x"] >= 0 and box["w"] > 0 and box["h"] > 0 and box["x"] + box["w"] <= 24, title
    for (first, a), (second, b) in itertools.combinations(boxes, 2):
        apart = (a["x"] + a["w"] <= b["x"] or b["x"] + b["w"] <= a["x"]
                 or a["y"] + a["h"] <= b["y"] or b["y"] + b["h"] <= a["y"])
        assert apart, f"{first!r} overlaps {second!r}"


def test_every_panel_queries_the_datasource_variable() -> None:
    for each in PANELS:
        assert each["datasource"] == DATASOURCE_VARIABLE, each["title"]
        assert each["targets"], f"{each['title']} has no query"
        assert len({target["refId"] for target in each["targets"]}) == len(each["targets"]), each["title"]
        for target in each["targets"]:
            assert target["datasource"] == DATASOURCE_VARIABLE, each["title"]
            assert target["expr"].strip(), each["title"]


def test_no_datasource_uid_but_the_variable_and_the_provisioned_one() -> None:
    text = (GRAFANA_DIR / "dashboards" / "clickpulse.json").read_text()
    uids = set(re.findall(r'"uid": "([^"]*)"', text)) - {BOARD["uid"]}
    assert uids == {"${datasource}"}
    (variable,) = [each for each in BOARD["templating"]["list"] if each["name"] == "datasource"]
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
    assert variable["current"]["value"] == provisioned_datasource()["uid"]


def test_the_instance_variable_filters_every_selector() -> None:
    (variable,) = [each for each in BOARD["templating"]["list"] if each["name"] == "instance"]
    assert variable["includeAll"] and variable["multi"]
    assert re.fullmatch(r"label_values\(clickpulse_build_info, instance\)", variable["query"]["query"])
    for query in dashboard_queries(BOARD):
        selectors = re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*\{[^}]*\}", query.expr)
        assert selectors, query
        for selector in selectors:
            assert 'instance=~"$instance"' in selector, query


def test_every_metric_a_panel_uses_is_in_the_registry() -> None:
    kinds = registry_kinds()
    histograms = {name for name, kind in kinds.items() if kind == "histogram"}
    used = {
        registered_name(name, histograms)
        for query in dashboard_queries(BOARD)
        for name in selected_metrics(query.expr)
    }
    assert used - set(kinds) == set()
    known_labels = {"le", "instance"}.union(*METRIC_LABELS.values())
    for query in dashboard_queries(BOARD):
        for grouping in re.findall(r"by \(([^)]*)\)", query.expr):
            assert {label.strip() for label in grouping.split(",")} <= known_labels, query


def test_the_panels_the_issue_asks_for_are_there() -> None:
    titles = {each["title"] for each in PANELS}
    assert {
        "Accepted events/s and rejected requests/s", "HTTP requests/s by status", "POST /events latency",
        "Held events vs capacity", "Oldest held event age", "Flushes/s by trigger", "Batch rows distribution",
        "Insert duration", "Rows written/s", "Insert errors/s by kind", "Freshness: receipt → confirmed insert",
        "Resident memory", "CPU",
        # The spool, retries and quarantine, which came after the first dashboard.
        "Spool size vs capacity", "Spool fill", "Unconfirmed events: spool and memory", "Oldest unconfirmed event age",
        "Spool fsync duration", "Replayed events and corrupt records at start", "ClickHouse backend",
        "Insert retries/s", "Quarantined events/s by destination", "Spool write errors and full rejections/s",
        # The Segment-compatible /v1 API beside /events.
        "Intake requests/s by route", "Intake latency p99 by route",
    } <= titles
    intake = [each for each in PANELS if each["title"].startswith("Intake ")]
    assert all('path=~"/events|/v1/.+"' in target["expr"] for each in intake for target in each["targets"])
    rows = [each["title"] for each in BOARD["panels"] if each["type"] == "row"]
    assert rows == ["Overview", "Receiver: HTTP intake", "Batcher: mailbox, buffer, flushes",
                    "Writer: ClickHouse inserts", "End to end", "Reliability: spool, retries, quarantine", "Process"]


def test_the_spool_only_panels_are_marked_and_select_only_spool_metrics() -> None:
    # Without a spool these show "No data"; the integration test runs without one too and holds
    # every other panel to returning data, and these to returning none.
    note = dashboard_generator().SPOOL_ONLY
    spool_only = [each for each in PANELS if each["description"].endswith(note)]
    assert {each["title"] for each in spool_only} == {"Spool fill", "Spool fsync duration"}
    for each in spool_only:
        for target in each["targets"]:
            assert all(name.startswith("spool_") for name in selected_metrics(target["expr"])), each["title"]


def test_the_oldest_unconfirmed_age_is_zero_rather_than_the_epoch_when_nothing_waits() -> None:
    # The timestamp is 0 without a spool and with an empty one; time() - 0 would draw 56 years.
    (panel,) = panels_titled("Oldest unconfirmed event age")
    (target,) = panel["targets"]
    timestamp = 'spool_oldest_unconfirmed_timestamp_seconds{instance=~"$instance"}'
    assert target["expr"] == f"(time() - {timestamp}) * ({timestamp} > bool 0)"


def test_every_panel_has_a_unit_and_thresholds() -> None:
    for each in PANELS:
        defaults = each["fieldConfig"]["defaults"]
        if each["type"] != "heatmap":
            assert defaults["unit"], each["title"]
            assert defaults["thresholds"]["steps"][0] == {"color": "green", "value": None}, each["title"]
        else:
            assert each["options"]["yAxis"]["unit"], each["title"]


@pytest.mark.parametrize(
    ("title", "alert"),
    [
        ("POST /events latency", "ClickPulseLatencyTooHigh"),
        ("Freshness: receipt → confirmed insert", "ClickPulseFreshnessTooHigh"),
        ("Buffer fill", "ClickPulseBufferNearlyFull"),
        ("Spool fill", "ClickPulseSpoolNearlyFull"),
        ("Oldest unconfirmed event age", "ClickPulseUnconfirmedTooOld"),
    ],
)
def test_a_panel_draws_its_alert_threshold_in_red(title: str, alert: str) -> None:
    (rule,) = [rule for rule in alert_rules() if rule["alert"] == alert]
    comparison, *_guards = alert_comparisons(rule["expr"])  # the first operand is what the alert measures
    for each in panels_titled(title):  # the overview's stat and the stage's time series
        steps = each["fieldConfig"]["defaults"]["thresholds"]["steps"]
        assert {"color": "red", "value": comparison.threshold} in steps, each["type"]


def test_grafana_rate_interval_follows_the_prometheus_scrape_interval() -> None:
    scrape_interval = load_yaml(PROMETHEUS_DIR / "prometheus.yml")["global"]["scrape_interval"]
    assert provisioned_datasource()["jsonData"]["timeInterval"] == scrape_interval


def test_provisioning_points_at_the_directories_compose_mounts() -> None:
    (provider,) = load_yaml(GRAFANA_DIR / "provisioning" / "dashboards" / "clickpulse.yml")["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    datasource = provisioned_datasource()
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"


def test_the_import_variant_asks_for_the_prometheus_datasource_and_is_otherwise_the_same() -> None:
    generator = dashboard_generator()
    assert generator.render_import() == (GRAFANA_DIR / "clickpulse-import.json").read_text(), (
        "ops/grafana/clickpulse-import.json is stale: run python3 ops/grafana/generate_dashboard.py"
    )
    imported = generator.import_dashboard()
    [declared] = imported.pop("__inputs")
    assert declared["name"] == "DS_PROMETHEUS" and declared["type"] == "datasource" and declared["pluginId"] == "prometheus"
    assert {required["id"] for required in imported.pop("__requires")} == {"grafana", "prometheus"}
    (variable,) = [each for each in imported["templating"]["list"] if each["name"] == "datasource"]
    assert variable.pop("current") == {"text": "${DS_PROMETHEUS}", "value": "${DS_PROMETHEUS}"}
    (provisioned,) = [each for each in BOARD["templating"]["list"] if each["name"] == "datasource"]
    assert variable == {key: value for key, value in provisioned.items() if key != "current"}
    assert {**imported, "templating": None} == {**BOARD, "templating": None}
    assert "DS_PROMETHEUS" not in (GRAFANA_DIR / "dashboards" / "clickpulse.json").read_text()  # provisioning substitutes nothing
def test_the_client_fault_panel_selects_exactly_the_client_fault_reasons() -> None:
    from clickpulse.metrics import CLIENT_FAULTS
    from tests.promql import dashboard_generator

    listed = re.fullmatch(r'reason=~"(.*)"', dashboard_generator().CLIENT_FAULT_MATCHER)
    assert listed is not None and set(listed.group(1).split("|")) == CLIENT_FAULTS
