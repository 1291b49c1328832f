"""ops/prometheus: promtool accepts the config and the rules, every alert passes its unit tests,
and every alert is complete (severity, summary, a runbook that exists) and built from metrics the
Registry has. (tests/integration/test_observability.py evaluates them on a real Prometheus.)"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from clickpulse.metrics import PipelineMetrics
from tests.conftest import skip_or_fail
from tests.promql import PROMETHEUS_DIR, ROOT, alert_comparisons, alert_rules, load_yaml, registered_name, selected_metrics

RULES = alert_rules()
ALERT_NAMES = [rule["alert"] for rule in RULES]


@pytest.fixture(scope="module")
def promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        skip_or_fail("no promtool binary (apt-get install prometheus)")
    return binary


def run_promtool(promtool: str, *arguments: str) -> str:
    result = subprocess.run(
        [promtool, *arguments], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def test_promtool_check_config_accepts_prometheus_yml_and_its_rule_files(promtool: str) -> None:
    # The target `clickpulse:8080` resolves only inside compose; promtool does not resolve it.
    output = run_promtool(promtool, "check", "config", "prometheus.yml")
    assert "1 rule files found" in output


def test_promtool_check_rules_accepts_alerts_yml(promtool: str) -> None:
    output = run_promtool(promtool, "check", "rules", "alerts.yml")
    assert f"{len(RULES)} rules found" in output


def test_promtool_unit_tests_pass(promtool: str) -> None:
    output = run_promtool(promtool, "test", "rules", "alerts_test.yml")
    assert "SUCCESS" in output


def test_every_alert_has_a_unit_test_that_expects_it_to_fire() -> None:
    tests = load_yaml(PROMETHEUS_DIR / "alerts_test.yml")["tests"]
    expected_to_fire = {
        case["alertname"] for test in tests for case in test["alert_rule_test"] if case.get("exp_alerts")
    }
    expected_quiet = {
        case["alertname"] for test in tests for case in test["alert_rule_test"] if not case.get("exp_alerts")
    }
    assert set(ALERT_NAMES) <= expected_to_fire
    assert set(ALERT_NAMES) <= expected_quiet


def test_prometheus_yml_scrapes_the_job_the_alerts_select() -> None:
    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "clickpulse"
    assert job["static_configs"] == [{"targets": ["clickpulse:9091"]}]  # ADMIN_PORT in compose.yaml
    for rule in RULES:
        for selector in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*\{[^}]*\}", rule["expr"]):
            assert 'job="clickpulse"' in selector, rule["alert"]


@pytest.mark.parametrize("rule", RULES, ids=ALERT_NAMES)
def test_alert_is_complete_and_its_runbook_exists(rule: dict) -> None:
    assert rule["alert"].startswith("ClickPulse")
    assert rule["labels"]["severity"] in {"critical", "warning"}
    annotations = rule["annotations"]
    assert annotations["summary"] and annotations["description"]
    document, anchor = annotations["runbook_url"].split("#")
    assert document == "docs/runbooks.md"
    headings = re.findall(r"^#+ (.+)$", (ROOT / document).read_text(), re.M)
    anchors = {re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-") for heading in headings}
    assert anchor in anchors, f"docs/runbooks.md has no heading for #{anchor}"


@pytest.mark.parametrize("rule", RULES, ids=ALERT_NAMES)
def test_alert_compares_registered_metrics_with_literal_thresholds(rule: dict) -> None:
    kinds = {collector.name: collector.kind.name for collector in PipelineMetrics().registry.get_all()}
    histograms = {name for name, kind in kinds.items() if kind == "histogram"}
    comparisons = alert_comparisons(rule["expr"])  # the shape the integration test relies on
    assert comparisons
    used = {registered_name(name, histograms) for name in selected_metrics(rule["expr"])}
    assert used - set(kinds) <= {"up"}  # `up` is Prometheus's own
