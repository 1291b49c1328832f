"""Observability proven on the real thing: a real ClickHouse, the service, and a real Prometheus
server scraping it every second with the alert rules of ops/prometheus loaded. Every query of the
Grafana dashboard and every signal of every alert must return data; the insert-error panel must
show the window in which ClickHouse was unreachable, and the inserts-failing alert must fire in it.
The service runs once with a spool and once without; without one, only the panels the dashboard
marks spool-only and the ratio of the spool-only alert (guarded by its capacity) have no data.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from clickpulse.metrics import METRIC_LABELS, PipelineMetrics
from clickpulse.metrics import DROP_REASONS, ERROR_KINDS, FLUSH_TRIGGERS, INSERT_RESULTS, REJECT_REASONS
from tests.conftest import skip_or_fail
from tests.integration.conftest import eventually, make_event, running_service, scrape, wait_for_rows
from tests.promql import (
    PROMETHEUS_DIR,
    Comparison,
    alert_comparisons,
    alert_rules,
    dashboard,
    dashboard_generator,
    dashboard_queries,
    load_yaml,
    substitute,
)
from tests.servers import ClickHouseServer, PrometheusServer, TcpProxy, find_prometheus, start_prometheus

pytestmark = pytest.mark.integration

RATE_INTERVAL = "5s"  # what Grafana's $__rate_interval is for a 1 s scrape interval (4 × 1 s, plus one)
# Short `for:` durations in the test copy of the rules; the expressions are the production ones.
TEST_FOR = "2s"
# Labels Prometheus or the exposition format add to every series of a metric.
ADDED_LABELS = {"__name__", "job", "instance", "le"}
SPOOL_MAX_BYTES = 64 << 20
# The operand that confines an alert to instances with a spool; without one it is false (0).
SPOOL_GUARD = Comparison('spool_capacity_bytes{job="clickpulse"}', ">", 0.0)


def base_url(service) -> str:
    return f"http://127.0.0.1:{service.port}"


# -- the metrics move when they should ----------------------------------------------------------


async def test_every_fixed_label_value_has_a_zero_series_before_anything_happens(
    clickhouse_server: ClickHouseServer, clickhouse_database: str
) -> None:
    # rate() and the alerts need the series before the first increment, or they miss it.
    fixed_label_sets = {
        "requests_rejected_total": ("reason", REJECT_REASONS),
        "batch_flush_total": ("trigger", FLUSH_TRIGGERS),
        "clickhouse_insert_errors_total": ("kind", ERROR_KINDS),
        "clickhouse_inserts_total": ("result", INSERT_RESULTS),
        "events_dropped_total": ("reason", DROP_REASONS),
    }
    proxy = TcpProxy(clickhouse_server.http_port)  # never listening: not even a health check succeeds
    dsn = f"http://127.0.0.1:{proxy.port}/{clickhouse_database}"
    async with running_service(dsn) as service, aiohttp.ClientSession() as http:
        samples = await scrape(http, base_url(service))
    for name, (label, values) in fixed_label_sets.items():
        for value in values:
            if name == "clickhouse_insert_errors_total" and value == "connection":
                continue  # the Writer's first connection attempt may have failed already
            assert samples[f'{name}{{{label}="{value}"}}'] == 0, (name, value)
    for name in ("events_received_total", "clickhouse_rows_written_total", "end_to_end_latency_seconds_count",
                 "http_request_body_bytes_count", "events_per_request_count", "batch_rows_count", "batch_bytes_count"):
        assert samples[name] == 0, name


async def test_intake_batcher_and_writer_metrics_move_with_the_events(
    clickhouse_server: ClickHouseServer, clickhouse_database: str
) -> None:
    dsn = clickhouse_server.dsn(clickhouse_database)
    async with running_service(dsn, BATCH_SIZE="10000", FLUSH_INTERVAL="2s") as service, aiohttp.ClientSession() as http:
        url = base_url(service)
        await eventually(lambda: service.not_ready_reason() is None)
        bodies = [
            msgspec.json.encode([make_event(i) for i in range(5)]),
            msgspec.json.encode(make_event(5)),
            b"\n".join(msgspec.json.encode(make_event(6 + i)) for i in range(20)),
        ]
        for body, content_type in zip(bodies, ("application/json", "application/json", "application/x-ndjson")):
            async with http.post(url + "/events", data=body, headers={"Content-Type": content_type}) as response:
                assert response.status == 202
        invalid = b'{"event_type": "x"}'
        async with http.post(url + "/events", data=invalid, headers={"Content-Type": "application/json"}) as response:
            assert response.status == 400

        held = await scrape(http, url)
        assert held["events_per_request_count"] == 3
        assert held["events_per_request_sum"] == 26 == held["events_received_total"]
        assert held['events_per_request_bucket{le="1.0"}'] == 1
        assert held["http_request_body_bytes_count"] == 4  # the invalid one was read too
        assert held["http_request_body_bytes_sum"] == sum(map(len, bodies)) + len(invalid)
        assert held["batcher_mailbox_events"] + held["batcher_buffered_events"] == 26
        assert held["batcher_buffered_events"] == 26  # the Batcher took them into its buffer at once
        assert 0 < held["batcher_oldest_event_age_seconds"] < 2

        await asyncio.sleep(0.5)
        # Nothing happened in the Batcher meanwhile; the age is computed when scraped.
        older = await scrape(http, url)
        assert older["batcher_oldest_event_age_seconds"] >= held["batcher_oldest_event_age_seconds"] + 0.4

        assert await wait_for_rows(clickhouse_server, clickhouse_database, 26) == 26
        written = await eventually(lambda: _after_confirmation(http, url))
        assert written["batcher_oldest_event_age_seconds"] == 0  # holding nothing, nothing is waiting
        assert written["batcher_buffered_events"] == written["batcher_mailbox_events"] == 0
        assert written["batch_bytes_count"] == 1
        assert written["batch_bytes_sum"] == written["clickhouse_bytes_written_total"]
        assert written["end_to_end_latency_seconds_count"] == 1
        # The oldest event waited FLUSH_INTERVAL for the flush, then the insert.
        assert 2.0 <= written["end_to_end_latency_seconds_sum"] < 10
        assert written['end_to_end_latency_seconds_bucket{le="2.0"}'] == 0
        assert written["writer_inflight_batches"] == 0


async def _after_confirmation(http: aiohttp.ClientSession, url: str) -> dict[str, float] | None:
    samples = await scrape(http, url)
    return samples if samples["end_to_end_latency_seconds_count"] >= 1 else None


async def test_writer_inflight_batches_counts_a_batch_until_clickhouse_takes_it(
    clickhouse_server: ClickHouseServer, clickhouse_database: str
) -> None:
    proxy = TcpProxy(clickhouse_server.http_port)
    await proxy.restore()
    dsn = f"http://127.0.0.1:{proxy.port}/{clickhouse_database}"
    async with running_service(dsn, FLUSH_INTERVAL="50ms", CLICKHOUSE_TIMEOUT="2s") as service, aiohttp.ClientSession() as http:
        url = base_url(service)
        await eventually(lambda: service.not_ready_reason() is None)
        await proxy.cut()
        async with http.post(url + "/events", json=[make_event(i) for i in range(7)]) as response:
            assert response.status == 202

        async def failing_with_a_batch_in_flight() -> bool:
            samples = await scrape(http, url)
            return samples["writer_inflight_batches"] == 1 and samples['clickhouse_insert_errors_total{kind="connection"}'] > 0

        await eventually(failing_with_a_batch_in_flight, timeout=10)
        await proxy.restore()
        assert await wait_for_rows(clickhouse_server, clickhouse_database, 7, timeout=20) == 7
        samples = await eventually(lambda: _after_confirmation(http, url))
        assert samples["writer_inflight_batches"] == 0
        assert samples["clickhouse_up"] == 1
        assert samples['clickhouse_inserts_total{result="error"}'] >= 1
        # Measured from receipt, so the time ClickHouse was away is in it.
        assert samples["end_to_end_latency_seconds_sum"] > samples["clickhouse_insert_duration_seconds_sum"]
    await proxy.cut()


# -- a real Prometheus ----------------------------------------------------------------------------


@dataclass
class Traffic:
    """Valid events, invalid events and a wrong Content-Type, about 20 requests a second."""

    url: str
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)

    async def run(self, http: aiohttp.ClientSession) -> None:
        for index in itertools.count():
            events = [make_event(index * 100 + i) for i in range(1 + index % 20)]
            await self._post(http, msgspec.json.encode(events), "application/json")
            if index % 4 == 0:
                await self._post(http, msgspec.json.encode(make_event(index, created_at="yesterday")), "application/json")
            if index % 10 == 0:
                await self._post(http, b"<event/>", "application/xml")
            if index % 2 == 0:  # the Segment-compatible API, which the intake panels show too
                batch = [{"type": "track", "event": "e", "userId": f"u{index}"}] * (1 + index % 5)
                await self._post(http, msgspec.json.encode({"batch": batch}), "application/json",
                                 self.url.replace("/events", "/v1/batch"))
            await asyncio.sleep(0.05)

    async def _post(self, http: aiohttp.ClientSession, body: bytes, content_type: str, url: str = "") -> None:
        async with http.post(url or self.url, data=body, headers={"Content-Type": content_type}) as response:
            self.statuses[response.status] += 1


@dataclass
class PrometheusApi:
    http: aiohttp.ClientSession
    server: PrometheusServer

    async def get(self, path: str, **params: str) -> Any:
        async with self.http.get(self.server.url + path, params=params) as response:
            payload = await response.json()
        assert payload["status"] == "success", (path, params, payload)
        return payload["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.get("/api/v1/query", query=expr, time=f"{time.time():.3f}")
        assert data["resultType"] == "vector", (expr, data)
        return data["result"]

    async def query_range(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        data = await self.get("/api/v1/query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step="1")
        return data["result"]

    async def firing_alerts(self) -> set[tuple[str, str]]:
        alerts = (await self.get("/api/v1/alerts"))["alerts"]
        return {(alert["labels"]["alertname"], alert["labels"].get("reason", "")) for alert in alerts if alert["state"] == "firing"}


def rules_for_the_test(production: dict[str, Any]) -> dict[str, Any]:
    """The production rules with short `for:` durations: the same expressions, seconds not minutes."""
    rules = copy.deepcopy(production)
    for group in rules["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = TEST_FOR
    return rules


def prometheus_config(service_port: int) -> dict[str, Any]:
    """ops/prometheus/prometheus.yml, scraping this test's service every second."""
    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = ["alerts.yml"]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{service_port}"]}]
    return config


def has_finite_value(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


@pytest.mark.parametrize("spool", [True, False], ids=["spool", "no-spool"])
async def test_every_dashboard_query_and_alert_returns_data_on_a_real_prometheus(
    clickhouse_server: ClickHouseServer, clickhouse_database: str, tmp_path: Path, spool: bool
) -> None:
    binary = find_prometheus()
    if binary is None:
        skip_or_fail("no prometheus binary (apt-get install prometheus, or set PROMETHEUS_BIN)")
    proxy = TcpProxy(clickhouse_server.http_port)
    await proxy.restore()
    dsn = f"http://127.0.0.1:{proxy.port}/{clickhouse_database}"
    settings = {"FLUSH_INTERVAL": "200ms", "CLICKHOUSE_TIMEOUT": "2s"}
    if spool:  # ACK_MODE is then `disk`: every accepted request waits for an fsync
        settings.update(SPOOL_DIR=str(tmp_path / "spool"), SPOOL_MAX_BYTES=str(SPOOL_MAX_BYTES))
    async with running_service(dsn, **settings) as service, aiohttp.ClientSession() as http:
        instance = f"127.0.0.1:{service.port}"
        rules = rules_for_the_test(load_yaml(PROMETHEUS_DIR / "alerts.yml"))
        server = await asyncio.to_thread(
            start_prometheus, tmp_path / "prometheus", binary, prometheus_config(service.port), {"alerts.yml": rules}
        )
        prometheus = PrometheusApi(http, server)
        traffic = Traffic(base_url(service) + "/events")
        traffic_task = asyncio.create_task(traffic.run(http))
        try:
            await _check_on_prometheus(prometheus, proxy, instance, clickhouse_server, clickhouse_database, spool)
        except AssertionError as error:
            raise AssertionError(f"{error}\n--- prometheus log ---\n{server.log_tail()}") from None
        finally:
            traffic_task.cancel()
            await asyncio.gather(traffic_task, return_exceptions=True)
            await asyncio.to_thread(server.stop)
        assert traffic.statuses[202] and traffic.statuses[400] and traffic.statuses[415]
        assert set(traffic.statuses) == {200, 202, 400, 415}, traffic.statuses
    await proxy.cut()


async def _check_on_prometheus(
    prometheus: PrometheusApi, proxy: TcpProxy, instance: str, clickhouse: ClickHouseServer, database: str,
    spool: bool,
) -> None:
    started = time.time()
    board = dashboard()
    (error_panel,) = [each for each in board["panels"] if each["title"] == "Insert errors/s by kind"]
    (error_target,) = error_panel["targets"]
    healthy_errors = substitute(error_target["expr"], {"instance": instance, "__rate_interval": RATE_INTERVAL})

    async def written_and_error_free() -> bool:
        written = await prometheus.query(f'clickhouse_rows_written_total{{instance="{instance}"}} > 0')
        errors = await prometheus.query(healthy_errors)  # has data once its rate window is filled
        return bool(written) and bool(errors) and all(float(sample["value"][1]) == 0 for sample in errors)

    await eventually(written_and_error_free, timeout=20, interval=0.25)
    await asyncio.sleep(1)
    (up,) = await prometheus.query(f'up{{job="clickpulse", instance="{instance}"}}')
    assert up["value"][1] == "1"

    # ClickHouse goes away while events keep arriving, until the alert fires.
    cut_at = time.time()
    await proxy.cut()
    fired = await eventually(_inserts_failing_fires(prometheus), timeout=30, interval=0.25)
    await proxy.restore()
    restored_at = time.time()

    async def recovered() -> bool:
        firing = {name for name, _ in await prometheus.firing_alerts()}
        (clickhouse_up,) = await prometheus.query(f'clickhouse_up{{instance="{instance}"}}')
        return "ClickPulseInsertsFailing" not in firing and clickhouse_up["value"][1] == "1"

    await eventually(recovered, timeout=30, interval=0.25)
    assert await wait_for_rows(clickhouse, database, 1) > 0
    # Long enough for every rate window to hold only data from after the outage.
    await asyncio.sleep(max(0.0, restored_at + 9 - time.time()))
    now = time.time()

    # Other traffic makes its own alert fire too: a quarter of the requests are invalid.
    assert ("ClickPulseRejectedRatioHigh", "invalid") in fired

    (capacity,) = await prometheus.query(f'spool_capacity_bytes{{instance="{instance}"}}')
    assert float(capacity["value"][1]) == (SPOOL_MAX_BYTES if spool else 0)

    variables = {"instance": instance, "__rate_interval": RATE_INTERVAL, "__range": f"{math.ceil(now - started)}s"}
    await _every_variable_query_finds_this_instance(prometheus, board, instance)
    spool_only = {each["title"] for each in board["panels"]
                  if each.get("description", "").endswith(dashboard_generator().SPOOL_ONLY)}
    assert spool_only  # the marker is found
    for query in dashboard_queries(board):
        expr = substitute(query.expr, variables)
        result = await prometheus.query(expr)
        if spool or query.panel not in spool_only:
            assert has_finite_value(result), f"panel {query.panel!r}: no data for {expr}: {result}"
        else:  # the marker is deserved: "No data" is what this panel shows without a spool
            assert not has_finite_value(result), f"panel {query.panel!r} is marked spool-only: {expr}: {result}"

    for rule in alert_rules():
        comparisons = alert_comparisons(rule["expr"])
        for comparison in comparisons:
            result = await prometheus.query(comparison.signal)
            if not spool and SPOOL_GUARD in comparisons and comparison != SPOOL_GUARD:
                continue  # e.g. spool_bytes / spool_capacity_bytes is 0 / 0; the guard below keeps it quiet
            assert has_finite_value(result), f"{rule['alert']}: no data for {comparison.signal}: {result}"
            assert {sample["metric"]["instance"] for sample in result} == {instance}
            if not spool and comparison == SPOOL_GUARD:
                assert [float(sample["value"][1]) for sample in result] == [0], rule["alert"]

    await _the_insert_error_panel_shows_the_outage(prometheus, error_target["expr"], variables, started, cut_at,
                                                   restored_at, now)
    if spool:
        await _the_spool_panels_show_the_outage(prometheus, board, variables, cut_at, restored_at)
    await _only_the_expected_alerts_fired(prometheus, started, now)
    await _every_series_has_its_declared_labels(prometheus, instance)


def _inserts_failing_fires(prometheus: PrometheusApi):
    async def check() -> set[tuple[str, str]] | None:
        firing = await prometheus.firing_alerts()
        return firing if ("ClickPulseInsertsFailing", "") in firing else None

    return check


async def _every_variable_query_finds_this_instance(prometheus: PrometheusApi, board: dict, instance: str) -> None:
    for variable in board["templating"]["list"]:
        if variable["type"] != "query":
            continue
        metric, label = variable["query"]["query"].removeprefix("label_values(").removesuffix(")").split(", ")
        result = await prometheus.query(metric)
        assert instance in {sample["metric"][label] for sample in result}, variable["name"]


async def _the_insert_error_panel_shows_the_outage(
    prometheus: PrometheusApi, expr: str, variables: dict[str, str], started: float, cut_at: float,
    restored_at: float, now: float,
) -> None:
    result = await prometheus.query_range(substitute(expr, variables), started, now)
    errors_per_second: dict[float, float] = collections.defaultdict(float)
    for series in result:
        for timestamp, value in series["values"]:
            errors_per_second[timestamp] += float(value)
    assert {series["metric"]["kind"] for series in result} >= {"connection", "timeout", "server"}
    erroring = sorted(timestamp for timestamp, value in errors_per_second.items() if value > 0)
    assert erroring, "the panel shows no insert error at all"
    window = float(RATE_INTERVAL.removesuffix("s"))
    # Errors only from the cut until the rate window has moved past the restore (scrapes lag 1 s).
    assert cut_at <= erroring[0] <= restored_at
    assert erroring[-1] <= restored_at + window + 2
    assert any(value == 0 for timestamp, value in errors_per_second.items() if timestamp < cut_at)
    assert any(value == 0 for timestamp, value in errors_per_second.items() if timestamp > restored_at + window + 2)


async def _the_spool_panels_show_the_outage(
    prometheus: PrometheusApi, board: dict, variables: dict[str, str], cut_at: float, restored_at: float
) -> None:
    """While ClickHouse is away, acknowledged events wait unconfirmed in the spool, and the age of
    the oldest grows like the outage: seconds, not the 56 years of `time() - 0`."""
    (age_panel,) = [each for each in board["panels"] if each["title"] == "Oldest unconfirmed event age"]
    (age_target,) = age_panel["targets"]
    (unconfirmed_panel,) = [each for each in board["panels"] if each["title"] == "Unconfirmed events: spool and memory"]
    unconfirmed_target = unconfirmed_panel["targets"][0]
    assert "spool_unconfirmed_events" in unconfirmed_target["expr"]
    for target, limit in ((age_target, restored_at - cut_at + 10), (unconfirmed_target, math.inf)):
        (series,) = await prometheus.query_range(substitute(target["expr"], variables), cut_at, restored_at + 2)
        peak = max(float(value) for _, value in series["values"])
        assert 0 < peak < limit, (target["expr"], series["values"])


async def _only_the_expected_alerts_fired(prometheus: PrometheusApi, started: float, now: float) -> None:
    result = await prometheus.query_range('ALERTS{alertstate="firing"}', started, now)
    fired = {series["metric"]["alertname"] for series in result}
    assert "ClickPulseInsertsFailing" in fired
    # A healthy service under this load: the process is up, nothing dropped or quarantined, the
    # buffer and the spool far from full, nothing unconfirmed for long.
    quiet = {"ClickPulseDown", "ClickPulseEventsDropped", "ClickPulseBufferNearlyFull", "ClickPulseSpoolNearlyFull",
             "ClickPulseUnconfirmedTooOld", "ClickPulseEventsQuarantined"}
    assert not fired & quiet, fired


async def _every_series_has_its_declared_labels(prometheus: PrometheusApi, instance: str) -> None:
    """Every registered metric reached Prometheus, each with exactly the label names METRIC_LABELS declares."""
    kinds = {collector.name: collector.kind.name for collector in PipelineMetrics().registry.get_all()}
    series_names = {
        name: name + "_count" if kind == "histogram" else name for name, kind in kinds.items()
    }
    for name, series_name in series_names.items():
        result = await prometheus.query(f'{series_name}{{instance="{instance}"}}')
        assert result, f"{name} never reached Prometheus"
        seen = {frozenset(sample["metric"]) - ADDED_LABELS for sample in result}
        assert seen == {frozenset(METRIC_LABELS.get(name, ()))}, f"{name}: label names {seen}"
