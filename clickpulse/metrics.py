"""Metric definitions, one group per actor, all registered in the one Registry the supervisor owns.

Label values come from fixed sets only (route templates, status codes, flush triggers, error
kinds); nothing a client sends becomes a label value.
"""

from __future__ import annotations

from aioprometheus import Counter, Gauge, Histogram, Registry
from aioprometheus.formats.text import TextFormatter

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))
BATCH_ROW_BUCKETS = (1, 10, 100, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, float("inf"))
INSERT_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, float("inf"))


class ReceiverMetrics:
    def __init__(self, registry: Registry) -> None:
        self.http_requests = Counter(
            "http_requests_total", "HTTP requests by method, route template and status code.", registry=registry
        )
        self.http_request_duration = Histogram(
            "http_request_duration_seconds",
            "Time from request start to response, by method and route template.",
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self.events_received = Counter(
            "events_received_total", "Events accepted into the pipeline (answered 202).", registry=registry
        )
        self.requests_rejected = Counter(
            "requests_rejected_total",
            "Requests refused before reaching the pipeline, by reason "
            "(invalid, too_large, unsupported_type, overloaded, shutting_down).",
            registry=registry,
        )


class BatcherMetrics:
    def __init__(self, registry: Registry) -> None:
        self.buffer_events = Gauge(
            "buffer_events", "Events held by the Batcher: its mailbox plus its buffer.", registry=registry
        )
        self.buffer_capacity_events = Gauge(
            "buffer_capacity_events", "MAX_BUFFER_EVENTS: above this the receiver answers 503.", registry=registry
        )
        self.batch_flushes = Counter(
            "batch_flush_total", "Batches handed to the Writer, by trigger (size, interval, shutdown).", registry=registry
        )
        self.batch_size = Gauge("batch_size", "Rows in the most recently flushed batch.", registry=registry)
        self.batch_rows = Histogram(
            "batch_rows", "Rows per flushed batch.", registry=registry, buckets=BATCH_ROW_BUCKETS
        )


class WriterMetrics:
    def __init__(self, registry: Registry) -> None:
        self.insert_errors = Counter(
            "clickhouse_insert_errors_total",
            "Failed ClickHouse requests by kind (connection, timeout, server, rejected, schema).",
            registry=registry,
        )
        self.rows_written = Counter(
            "clickhouse_rows_written_total", "Rows ClickHouse confirmed.", registry=registry
        )
        self.bytes_written = Counter(
            "clickhouse_bytes_written_total", "JSONEachRow body bytes ClickHouse confirmed.", registry=registry
        )
        self.inserts = Counter("clickhouse_inserts_total", "INSERT requests by result (ok, error).", registry=registry)
        self.insert_duration = Histogram(
            "clickhouse_insert_duration_seconds",
            "Duration of one INSERT request, successful or not.",
            registry=registry,
            buckets=INSERT_DURATION_BUCKETS,
        )
        self.pending_events = Gauge(
            "writer_pending_events", "Events handed to the Writer and not yet confirmed by ClickHouse.", registry=registry
        )
        self.events_dropped = Counter(
            "events_dropped_total",
            "Acknowledged events that will never reach ClickHouse, by reason (rejected, shutdown). Should stay 0.",
            registry=registry,
        )
        self.up = Gauge(
            "clickhouse_up", "1 when the last request to ClickHouse succeeded, else 0.", registry=registry
        )


class PipelineMetrics:
    """Every group, on one Registry."""

    def __init__(self, registry: Registry | None = None) -> None:
        self.registry = registry if registry is not None else Registry()
        self.receiver = ReceiverMetrics(self.registry)
        self.batcher = BatcherMetrics(self.registry)
        self.writer = WriterMetrics(self.registry)
        self._formatter = TextFormatter()

    def render(self) -> bytes:
        return self._formatter.marshall(self.registry)

    @property
    def content_type(self) -> str:
        return self._formatter.get_headers()["Content-Type"]
