"""Generates ops/grafana/dashboards/clickpulse.json, the dashboard Grafana provisions, and
ops/grafana/clickpulse-import.json, the same dashboard for Grafana's import dialog.

    python3 ops/grafana/generate_dashboard.py          # rewrite both
    python3 ops/grafana/generate_dashboard.py --check  # exit 1 if a committed JSON is stale

Provisioning reads a dashboard as it is, so the provisioned one names the provisioned datasource.
The import variant declares `__inputs` (DS_PROMETHEUS): the import dialog asks for a Prometheus
datasource and puts its uid where the JSON says `${DS_PROMETHEUS}`, the datasource variable's
default. (Provisioning would leave that text as it is, so one file cannot serve both.)

The committed JSON is the artifact; tests/test_grafana_dashboard.py fails when it differs from
what this script generates, checks its structure, and the integration test runs every query in it
against a real Prometheus. Standard library only, so it runs anywhere the tests run.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

DASHBOARD_PATH = Path(__file__).resolve().parent / "dashboards" / "clickpulse.json"
IMPORT_PATH = Path(__file__).resolve().parent / "clickpulse-import.json"
IMPORT_INPUT = "DS_PROMETHEUS"
DASHBOARD_UID = "clickpulse"
# The uid provisioning/datasources/prometheus.yml gives the Prometheus datasource; the datasource
# variable defaults to it, and every panel uses the variable.
PROVISIONED_DATASOURCE_UID = "clickpulse-prometheus"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
GRID_WIDTH = 24
PANEL_HEIGHT = 8
STAT_HEIGHT = 4

# Ends the description of every panel that has data only with a spool (SPOOL_DIR set): without
# one these show "No data" by design, and the integration test expects exactly that of them.
SPOOL_ONLY = "No data without a spool (SPOOL_DIR unset)."

# Every metric selector carries this matcher, so the instance variable filters every panel.
INSTANCE = 'instance=~"$instance"'
RATE = "[$__rate_interval]"

JsonObject = dict[str, Any]


CLIENT_FAULT_MATCHER = 'reason=~"unauthorized|forbidden|rate_limited|client_disconnected|malformed|timeout"'


def selector(metric: str, *matchers: str) -> str:
    return metric + "{" + ", ".join((INSTANCE, *matchers)) + "}"


def rate(metric: str, *matchers: str) -> str:
    return f"rate({selector(metric, *matchers)}{RATE})"


def quantile(q: float, histogram: str, *matchers: str) -> str:
    return f"histogram_quantile({q}, sum by (le) ({rate(histogram + '_bucket', *matchers)}))"


def target(expr: str, legend: str, **extra: Any) -> JsonObject:
    return {"datasource": DATASOURCE, "editorMode": "code", "expr": expr, "legendFormat": legend, "range": True, **extra}


def quantile_targets(histogram: str, *matchers: str, quantiles: Iterable[float] = (0.5, 0.95, 0.99)) -> list[JsonObject]:
    return [target(quantile(q, histogram, *matchers), f"p{round(q * 100)}") for q in quantiles]


def thresholds(*steps: tuple[str, float]) -> JsonObject:
    """Green below the first step; each (color, value) from its value up."""
    return {
        "mode": "absolute",
        "steps": [{"color": "green", "value": None}, *({"color": color, "value": value} for color, value in steps)],
    }


def timeseries(
    title: str,
    description: str,
    targets: list[JsonObject],
    *,
    unit: str,
    width: int = 8,
    threshold_steps: tuple[tuple[str, float], ...] = (),
    stacked: bool = False,
    bars: bool = False,
    max_value: float | None = None,
    overrides: list[JsonObject] | None = None,
) -> JsonObject:
    defaults: JsonObject = {
        "unit": unit,
        "min": 0,
        "color": {"mode": "palette-classic"},
        "thresholds": thresholds(*threshold_steps),
        "custom": {
            "drawStyle": "bars" if bars else "line",
            "lineWidth": 1,
            "fillOpacity": 80 if bars else 10,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "normal" if stacked else "none", "group": "A"},
            # Thresholds are drawn as lines where they mean something (an alert's threshold).
            "thresholdsStyle": {"mode": "line+area" if threshold_steps else "off"},
        },
    }
    if max_value is not None:
        defaults["max"] = max_value
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"w": width, "h": PANEL_HEIGHT},
        "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True, "calcs": []},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": targets,
    }


def stat(
    title: str,
    description: str,
    targets: list[JsonObject],
    *,
    unit: str,
    width: int = 4,
    height: int = STAT_HEIGHT,
    threshold_steps: tuple[tuple[str, float], ...] = (),
    mappings: list[JsonObject] | None = None,
    text_mode: str = "auto",
) -> JsonObject:
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"w": width, "h": height},
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "color": {"mode": "thresholds"},
                "thresholds": thresholds(*threshold_steps),
                "mappings": mappings or [],
            },
            "overrides": [],
        },
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background" if threshold_steps or mappings else "none",
            "graphMode": "none",
            "justifyMode": "auto",
            "orientation": "auto",
            "textMode": text_mode,
        },
        "targets": targets,
    }


def heatmap(title: str, description: str, expr: str, *, unit: str, width: int = 8) -> JsonObject:
    return {
        "type": "heatmap",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"w": width, "h": PANEL_HEIGHT},
        "fieldConfig": {"defaults": {"custom": {"scaleDistribution": {"type": "linear"}}}, "overrides": []},
        "options": {
            "calculate": False,  # the buckets come from the histogram
            "yAxis": {"axisPlacement": "left", "unit": unit},
            "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64, "exponent": 0.5, "fill": "dark-orange"},
            "cellGap": 1,
            "rowsFrame": {"layout": "auto"},
            "tooltip": {"show": True, "yHistogram": False},
            "legend": {"show": True},
        },
        "targets": [target(expr, "{{le}}", format="heatmap")],
    }


def series_override(name_regex: str, **properties: Any) -> JsonObject:
    return {
        "matcher": {"id": "byRegexp", "options": name_regex},
        "properties": [{"id": key, "value": value} for key, value in properties.items()],
    }


def dashed_limit(name_regex: str, color: str = "red") -> JsonObject:
    """A series drawn as a dashed line over the others: a configured limit, not a measurement."""
    return series_override(
        name_regex,
        **{"custom.stacking": {"mode": "none", "group": "A"}, "custom.fillOpacity": 0,
           "custom.lineStyle": {"fill": "dash", "dash": [10, 10]}, "color": {"mode": "fixed", "fixedColor": color}},
    )


# -- the rows ---------------------------------------------------------------------------------

POST_EVENTS = ('method="POST"', 'path="/events"')
# Every route that takes events: POST /events and the Segment-compatible /v1 API.
POST_INTAKE = ('method="POST"', 'path=~"/events|/v1/.+"')


def overview_row() -> list[JsonObject]:
    return [
        stat(
            "ClickHouse", "Whether the last request to ClickHouse succeeded (the lowest of the selected instances).",
            [target(f"min({selector('clickhouse_up')})", "")], unit="none",
            mappings=[{"type": "value", "options": {
                "0": {"text": "DOWN", "color": "red", "index": 0},
                "1": {"text": "UP", "color": "green", "index": 1},
            }}],
        ),
        stat(
            "Accepted events/s", "Events answered 202 per second.",
            [target(f"sum({rate('events_received_total')})", "")], unit="cps",
        ),
        stat(
            "Rejected requests", "Share of intake requests (POST /events and /v1) refused (any reason). "
            "Alert: 5% for one reason.",
            [target(
                f"sum({rate('requests_rejected_total')}) / sum({rate('http_requests_total', *POST_INTAKE)})", "",
            )],
            unit="percentunit", threshold_steps=(("orange", 0.01), ("red", 0.05)),
        ),
        stat(
            "Buffer fill", "Events held in memory as a share of MAX_BUFFER_EVENTS. At 100% intake answers 503.",
            [target(f"max({selector('pipeline_memory_events')} / {selector('buffer_capacity_events')})", "")],
            unit="percentunit", threshold_steps=(("orange", 0.5), ("red", 0.8)),
        ),
        stat(
            "Freshness p95", "95th percentile of receipt → confirmed insert. Alert: above 30s for 5m.",
            [target(quantile(0.95, "end_to_end_latency_seconds"), "")],
            unit="s", threshold_steps=(("orange", 5), ("red", 30)),
        ),
        stat(
            "Dropped events", "Acknowledged events that will never reach ClickHouse, in the dashboard's time range. Should be 0.",
            [target(f"sum(increase({selector('events_dropped_total')}[$__range]))", "")],
            unit="short", threshold_steps=(("red", 1),),
        ),
    ]


def receiver_row() -> list[JsonObject]:
    return [
        timeseries(
            "Accepted events/s and rejected requests/s",
            "Events answered 202 per second, and requests refused per second by reason. A refused request's "
            "events are not counted: a body that is invalid JSON or too large cannot be counted.",
            [
                target(f"sum({rate('events_received_total')})", "accepted events"),
                target(f"sum by (reason) ({rate('requests_rejected_total')})", "rejected requests: {{reason}}"),
            ],
            unit="cps",
            overrides=[series_override("rejected requests: .*", unit="reqps")],
        ),
        timeseries(
            "HTTP requests/s by status",
            "Every HTTP request by route template and status code (/metrics scrapes included).",
            [target(f"sum by (path, status) ({rate('http_requests_total')})", "{{path}} {{status}}")],
            unit="reqps",
        ),
        timeseries(
            "POST /events latency",
            "Time from request start to response. Requests wait up to 1s for room in a full Batcher mailbox. "
            "Alert: p99 above 500ms for 10m.",
            quantile_targets("http_request_duration_seconds", *POST_EVENTS),
            unit="s", threshold_steps=(("red", 0.5),),
        ),
        timeseries(
            "Intake requests/s by route",
            "POST requests that carry events, by route template and status: /events and the Segment-compatible "
            "/v1 API (/v1/batch, /v1/track, /v1/page, ...; 200 there is success, 4xx the SDKs do not retry).",
            [target(f"sum by (path, status) ({rate('http_requests_total', *POST_INTAKE)})", "{{path}} {{status}}")],
            unit="reqps", width=12,
        ),
        timeseries(
            "Intake latency p99 by route",
            "99th percentile of request start → response, per intake route (/events and each /v1 route).",
            [target(
                f"histogram_quantile(0.99, sum by (path, le) ({rate('http_request_duration_seconds_bucket', *POST_INTAKE)}))",
                "{{path}}",
            )],
            unit="s", width=12,
        ),
        timeseries(
            "Request body size",
            "Bytes per POST /events body read (rejected ones too). MAX_BODY_BYTES is the limit.",
            quantile_targets("http_request_body_bytes", quantiles=(0.5, 0.95)),
            unit="bytes", width=12,
        ),
        timeseries(
            "Events per request",
            "Events in each accepted request: clients that send one event per request pay one HTTP round "
            "trip per event.",
            [
                *quantile_targets("events_per_request", quantiles=(0.5, 0.95)),
                target(
                    f"sum({rate('events_per_request_sum')}) / sum({rate('events_per_request_count')})", "mean",
                ),
            ],
            unit="short", width=12,
        ),
        timeseries(
            "Client faults/s by reason",
            "Requests refused for the client's own fault: unauthorized (no or unknown key, 401), forbidden "
            "(origin not allowed, 403), rate_limited (429), client_disconnected (hung up mid-body), malformed "
            "(unparsable HTTP, over-long lines or headers), timeout (slow head or body). A burst of unauthorized "
            "or malformed is someone probing; rate_limited is a key or address over its limit.",
            [target(
                f"sum by (reason) ({rate('requests_rejected_total', CLIENT_FAULT_MATCHER)})", "{{reason}}",
            )],
            unit="reqps", width=12, stacked=True,
        ),
        timeseries(
            "Accepted events/s by ingest key",
            "Events answered 202 per second by the name of the key that sent them (INGEST_KEYS_FILE; none: "
            "without a key).",
            [target(f"sum by (key) ({rate('ingest_key_events_total')})", "{{key}}")],
            unit="cps", width=12, stacked=True,
        ),
    ]


def batcher_row() -> list[JsonObject]:
    return [
        timeseries(
            "Held events vs capacity",
            "Events in the Batcher's mailbox (they pile up while the Writer is busy), in its buffer (the "
            "batch being assembled) and with the Writer (not yet confirmed), stacked, against MAX_BUFFER_EVENTS.",
            [
                target(f"sum({selector('batcher_mailbox_events')})", "Batcher mailbox"),
                target(f"sum({selector('batcher_buffered_events')})", "Batcher buffer"),
                target(f"sum({selector('writer_pending_events')})", "Writer"),
                target(f"sum({selector('buffer_capacity_events')})", "capacity"),
            ],
            unit="short", stacked=True,
            overrides=[dashed_limit("capacity")],
        ),
        timeseries(
            "Buffer fill",
            "Events held in memory (Batcher and Writer) as a share of MAX_BUFFER_EVENTS. At 100% POST /events "
            "answers 503. Alert: above 80% for 1m.",
            [target(f"{selector('pipeline_memory_events')} / {selector('buffer_capacity_events')}", "{{instance}}")],
            unit="percentunit", max_value=1, threshold_steps=(("orange", 0.5), ("red", 0.8)),
        ),
        timeseries(
            "Oldest held event age",
            "How long the oldest event in the Batcher (buffer, else mailbox) has waited; 0 when it holds none. "
            "A healthy Batcher keeps it under FLUSH_INTERVAL.",
            [target(f"max({selector('batcher_oldest_event_age_seconds')})", "oldest event")],
            unit="s", threshold_steps=(("orange", 5), ("red", 30)),
        ),
        timeseries(
            "Flushes/s by trigger",
            "Batches handed to the Writer: size (BATCH_SIZE reached), interval (FLUSH_INTERVAL passed), shutdown.",
            [target(f"sum by (trigger) ({rate('batch_flush_total')})", "{{trigger}}")],
            unit="ops",
        ),
        heatmap(
            "Batch rows distribution",
            "Rows per flushed batch. ClickHouse prefers few large inserts: thousands of rows, about one insert per second.",
            f"sum by (le) (increase({selector('batch_rows_bucket')}{RATE}))",
            unit="short",
        ),
        timeseries(
            "Batch size in bytes",
            "JSONEachRow bytes per batch sent to ClickHouse.",
            quantile_targets("batch_bytes", quantiles=(0.5, 0.95)),
            unit="bytes",
        ),
    ]


def writer_row() -> list[JsonObject]:
    return [
        timeseries(
            "Rows written/s",
            "Rows ClickHouse confirmed per second.",
            [target(f"sum({rate('clickhouse_rows_written_total')})", "rows")],
            unit="cps",
        ),
        timeseries(
            "Bytes written/s",
            "JSONEachRow bytes ClickHouse confirmed per second.",
            [target(f"sum({rate('clickhouse_bytes_written_total')})", "bytes")],
            unit="Bps",
        ),
        timeseries(
            "Inserts/s by result",
            "INSERT requests per second; failed ones are retried with backoff.",
            [target(f"sum by (result) ({rate('clickhouse_inserts_total')})", "{{result}}")],
            unit="ops",
            overrides=[series_override("error", color={"mode": "fixed", "fixedColor": "red"})],
        ),
        timeseries(
            "Insert errors/s by kind",
            "Failed ClickHouse requests (inserts, schema checks and health checks) per second: connection, "
            "timeout, server, rejected (data dropped), schema.",
            [target(f"sum by (kind) ({rate('clickhouse_insert_errors_total')})", "{{kind}}")],
            unit="ops", threshold_steps=(("red", 0.0001),),
        ),
        timeseries(
            "Insert duration",
            "Duration of one INSERT request, successful or not (CLICKHOUSE_TIMEOUT is the limit).",
            quantile_targets("clickhouse_insert_duration_seconds", quantiles=(0.5, 0.95)),
            unit="s", threshold_steps=(("orange", 1), ("red", 5)),
        ),
        timeseries(
            "Writer backlog",
            "Batches handed to the Writer and not yet confirmed (it takes at most 2, a third may wait for room), "
            "and the events in them.",
            [
                target(f"sum({selector('writer_inflight_batches')})", "batches in flight"),
                target(f"sum({selector('writer_pending_events')})", "pending events"),
            ],
            unit="short",
            overrides=[series_override("pending events", **{"custom.axisPlacement": "right"})],
        ),
    ]


def end_to_end_row() -> list[JsonObject]:
    return [
        timeseries(
            "Freshness: receipt → confirmed insert",
            "Seconds from the receipt of a batch's oldest event until ClickHouse confirmed the batch. "
            "Expect about FLUSH_INTERVAL plus the insert time. Alert: p95 above 30s for 5m.",
            quantile_targets("end_to_end_latency_seconds"),
            unit="s", width=16, threshold_steps=(("orange", 5), ("red", 30)),
        ),
        timeseries(
            "Dropped events",
            "Acknowledged events that will never reach ClickHouse, by reason. Should stay 0; any drop alerts.",
            [target(f"sum by (reason) (increase({selector('events_dropped_total')}{RATE}))", "{{reason}}")],
            unit="short", bars=True, threshold_steps=(("red", 1),),
        ),
    ]


def oldest_unconfirmed_age() -> str:
    """Seconds since the oldest unconfirmed spooled event was received; 0 when the spool holds
    none and when there is no spool (the timestamp is 0 then, and `time() - 0` is no age)."""
    timestamp = selector("spool_oldest_unconfirmed_timestamp_seconds")
    return f"(time() - {timestamp}) * ({timestamp} > bool 0)"


def reliability_row() -> list[JsonObject]:
    return [
        timeseries(
            "Spool size vs capacity",
            "Bytes of spool segment files on disk per instance, against SPOOL_MAX_BYTES (dashed). The spool "
            "grows while ClickHouse does not confirm events and shrinks segment by segment as it catches up; "
            "at SPOOL_MAX_BYTES POST /events answers 503. Both are 0 without a spool.",
            [
                target(selector("spool_bytes"), "{{instance}} on disk"),
                target(selector("spool_capacity_bytes"), "{{instance}} SPOOL_MAX_BYTES"),
            ],
            unit="bytes",
            overrides=[dashed_limit(".* SPOOL_MAX_BYTES")],
        ),
        timeseries(
            "Spool fill",
            "Spool bytes on disk as a share of SPOOL_MAX_BYTES. At 100% POST /events answers 503; at 90% "
            "/readyz reports not ready. Alert: above 80% for 5m. " + SPOOL_ONLY,
            [target(f"{selector('spool_bytes')} / ({selector('spool_capacity_bytes')} > 0)", "{{instance}}")],
            unit="percentunit", max_value=1, threshold_steps=(("orange", 0.5), ("red", 0.8)),
        ),
        timeseries(
            "Unconfirmed events: spool and memory",
            "Events in the spool that ClickHouse has not confirmed yet (0 without a spool), and events held in "
            "memory anywhere in the pipeline against MAX_BUFFER_EVENTS (dashed). With a spool, what does not "
            "fit in memory waits on disk.",
            [
                target(selector("spool_unconfirmed_events"), "{{instance}} unconfirmed in the spool"),
                target(selector("pipeline_memory_events"), "{{instance}} held in memory"),
                target(selector("buffer_capacity_events"), "{{instance}} MAX_BUFFER_EVENTS"),
            ],
            unit="short",
            overrides=[dashed_limit(".* MAX_BUFFER_EVENTS")],
        ),
        timeseries(
            "Oldest unconfirmed event age",
            "How long ago the oldest event in the spool that ClickHouse has not confirmed was received; 0 when "
            "there is none (and without a spool). Alert: above 10m for 2m.",
            [target(oldest_unconfirmed_age(), "{{instance}}")],
            unit="s", threshold_steps=(("orange", 60), ("red", 600)),
        ),
        timeseries(
            "Spool fsync duration",
            "Duration of one grouped fsync of the spool. Every request acknowledged from disk (ACK_MODE=disk) "
            "waits for one, so this is its floor. " + SPOOL_ONLY,
            quantile_targets("spool_fsync_duration_seconds"),
            unit="s", threshold_steps=(("orange", 0.025), ("red", 0.1)),
        ),
        timeseries(
            "Replayed events and corrupt records at start",
            "Unconfirmed events found in the spool when this process started and replayed, and torn or corrupt "
            "spool tails truncated then (usually after a crash). Both happen only at start, so each line is "
            "the count for the running process: a step means a restart.",
            [
                target(selector("spool_replayed_events_total"), "{{instance}} replayed events"),
                target(selector("spool_corrupt_records_total"), "{{instance}} corrupt records"),
            ],
            unit="short",
            overrides=[series_override(".* corrupt records", color={"mode": "fixed", "fixedColor": "orange"})],
        ),
        stat(
            "ClickHouse backend",
            "Where the Writer inserts: http (a ClickHouse server, CLICKHOUSE_DSN) or embedded (chDB in DATA_DIR).",
            [target(selector("clickhouse_backend_info"), "{{instance}}: {{backend}}")],
            unit="none", width=3, height=PANEL_HEIGHT, text_mode="name",
        ),
        timeseries(
            "Insert retries/s",
            "INSERT attempts repeated after a transient failure (connection, time-out, server error). Retries go "
            "on without limit, at most 5s apart; see \"Insert errors/s by kind\".",
            [target(f"sum({rate('clickhouse_insert_retries_total')})", "retries")],
            unit="ops", width=7, threshold_steps=(("orange", 0.0001),),
        ),
        timeseries(
            "Quarantined events/s by destination",
            "Events ClickHouse rejected as data, kept aside: table (<table>_quarantine), file (quarantine.ndjson "
            "in SPOOL_DIR) or log (only in the error log; also counted as dropped). Alert: any in 10m.",
            [target(f"sum by (destination) ({rate('events_quarantined_total')})", "{{destination}}")],
            unit="cps", width=7, threshold_steps=(("red", 0.0001),),
        ),
        timeseries(
            "Spool write errors and full rejections/s",
            "Failed spool writes or fsyncs, and requests refused because the spool reached SPOOL_MAX_BYTES; "
            "both are answered 503, nothing is acknowledged.",
            [
                target(f"sum({rate('spool_write_errors_total')})", "write or fsync errors"),
                target(f"sum({rate('spool_full_rejections_total')})", "spool full"),
            ],
            unit="ops", width=7, threshold_steps=(("red", 0.0001),),
        ),
    ]


def process_row() -> list[JsonObject]:
    return [
        timeseries(
            "Resident memory",
            "RAM the process holds. A full buffer is about 1 KiB per event (MAX_BUFFER_EVENTS).",
            [target(selector("process_resident_memory_bytes"), "{{instance}}")],
            unit="bytes", width=6,
        ),
        timeseries(
            "CPU",
            "CPU time per second. The event loop runs on one core: near 100% the service is CPU-bound.",
            [target(rate("process_cpu_seconds_total"), "{{instance}}")],
            unit="percentunit", width=6, threshold_steps=(("orange", 0.7), ("red", 0.9)),
        ),
        timeseries(
            "Open file descriptors",
            "Open file descriptors (client connections included) against the process's limit.",
            [
                target(selector("process_open_fds"), "{{instance}} open"),
                target(selector("process_max_fds"), "{{instance}} limit"),
            ],
            unit="short", width=6,
        ),
        stat(
            "Uptime", "Time since the process started; a reset means a restart.",
            [target(f"time() - {selector('process_start_time_seconds')}", "{{instance}}")],
            unit="s", width=3, height=PANEL_HEIGHT,
        ),
        stat(
            "Version", "clickpulse and Python versions per instance.",
            [target(selector("clickpulse_build_info"), "{{instance}}: {{version}}, Python {{python}}")],
            unit="none", width=3, height=PANEL_HEIGHT, text_mode="name",
        ),
    ]


ROWS = (
    ("Overview", overview_row),
    ("Receiver: HTTP intake", receiver_row),
    ("Batcher: mailbox, buffer, flushes", batcher_row),
    ("Writer: ClickHouse inserts", writer_row),
    ("End to end", end_to_end_row),
    ("Reliability: spool, retries, quarantine", reliability_row),
    ("Process", process_row),
)


def lay_out(rows: Iterable[tuple[str, list[JsonObject]]]) -> list[JsonObject]:
    """Numbers the panels and places them left to right, row after row, without overlaps."""
    panels: list[JsonObject] = []
    y = 0
    for title, row_panels in rows:
        panels.append({"type": "row", "title": title, "collapsed": False, "panels": [],
                       "gridPos": {"x": 0, "y": y, "w": GRID_WIDTH, "h": 1}})
        y += 1
        x, line_height = 0, 0
        for panel in row_panels:
            width, height = panel["gridPos"]["w"], panel["gridPos"]["h"]
            if x + width > GRID_WIDTH:
                x, y, line_height = 0, y + line_height, 0
            panel["gridPos"] = {"x": x, "y": y, "w": width, "h": height}
            panels.append(panel)
            x += width
            line_height = max(line_height, height)
        y += line_height
    for panel_id, panel in enumerate(panels, start=1):
        panel["id"] = panel_id
        for ref_index, panel_target in enumerate(panel.get("targets", [])):
            panel_target["refId"] = chr(ord("A") + ref_index)
    return panels


def templating() -> JsonObject:
    instance_query = "label_values(clickpulse_build_info, instance)"
    return {"list": [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "current": {"text": "Prometheus", "value": PROVISIONED_DATASOURCE_UID},
            "hide": 0,
            "refresh": 1,
            "regex": "",
            "options": [],
        },
        {
            "name": "instance",
            "label": "Instance",
            "type": "query",
            "datasource": DATASOURCE,
            "definition": instance_query,
            "query": {"query": instance_query, "refId": "instance"},
            "refresh": 2,  # on time range change: instances come and go
            "includeAll": True,
            "allValue": ".*",
            "multi": True,
            "current": {"text": ["All"], "value": ["$__all"]},
            "sort": 1,
            "hide": 0,
            "regex": "",
            "options": [],
        },
    ]}


def dashboard() -> JsonObject:
    return {
        "uid": DASHBOARD_UID,
        "title": "clickpulse",
        "description": "Every stage of clickpulse: HTTP intake, Batcher, Writer (ClickHouse), end-to-end freshness, "
                       "the spool, retries and quarantine, process.",
        "tags": ["clickpulse", "clickhouse"],
        "editable": False,
        "graphTooltip": 1,  # shared crosshair: one moment across every stage
        "timezone": "",
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "annotations": {"list": []},
        "links": [],
        "templating": templating(),
        "panels": lay_out((title, build()) for title, build in ROWS),
    }


def import_dashboard() -> JsonObject:
    """The dashboard for Grafana's import dialog: it asks for DS_PROMETHEUS, the datasource
    variable's default."""
    board = dashboard()
    for variable in board["templating"]["list"]:
        if variable["type"] == "datasource":
            variable["current"] = {"text": "${" + IMPORT_INPUT + "}", "value": "${" + IMPORT_INPUT + "}"}
    return {
        "__inputs": [{
            "name": IMPORT_INPUT, "label": "Prometheus", "description": "the Prometheus that scrapes clickpulse",
            "type": "datasource", "pluginId": "prometheus", "pluginName": "Prometheus",
        }],
        "__requires": [
            {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.0.0"},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
        ],
        **board,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def render_import() -> str:
    return json.dumps(import_dashboard(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    outputs = {DASHBOARD_PATH: render(), IMPORT_PATH: render_import()}
    if argv[1:] == ["--check"]:
        stale = [path for path, text in outputs.items() if not path.exists() or path.read_text() != text]
        for path in stale:
            print(f"{path} is stale: run python3 {Path(__file__).name}", file=sys.stderr)
        return 1 if stale else 0
    for path, text in outputs.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
