"""Metric definitions, one group per actor, all registered in the one Registry the supervisor owns.

Label values come from fixed sets only (route templates, status codes, flush triggers, error
kinds); nothing a client sends becomes a label value. The sets are defined here, next to the
metrics they label, as Literal types, and every labelled counter is zeroed here for every value
of its set, as are unlabelled counters and histograms: a series that only appears at its first
increment hides that increment from `rate()` and leaves alert expressions without data until
something goes wrong.

Values that describe "now" (an age, how much is held, CPU time) are read at scrape time through
one mechanism, `PipelineMetrics.on_scrape`: the stage that owns the state registers a function
that sets its gauges, and every render runs them first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Final, Literal, get_args

from aioprometheus import Registry
from aioprometheus.formats.text import TextFormatter

from clickpulse.collectors import Counter, Gauge, Histogram
from clickpulse.process_metrics import ProcessMetrics

# The label value sets.
RejectReason = Literal[
    "invalid", "too_large", "unsupported_type", "overloaded", "shutting_down",
    "unauthorized", "forbidden", "rate_limited", "client_disconnected", "malformed", "timeout",
]
# Reasons that are the client's fault and say nothing about clickpulse: logged at most once per
# interval, with a count, never with a traceback.
CLIENT_FAULTS: Final[frozenset[RejectReason]] = frozenset(
    {"unauthorized", "forbidden", "rate_limited", "client_disconnected", "malformed", "timeout"}
)
FlushCause = Literal["size", "interval", "shutdown"]  # what made the Batcher flush
ErrorKind = Literal["connection", "timeout", "server", "rejected", "limit", "auth", "schema"]
InsertResult = Literal["ok", "error"]
DropReason = Literal["rejected", "shutdown"]
QuarantineDestination = Literal["table", "file", "log"]
REJECT_REASONS: Final[tuple[RejectReason, ...]] = get_args(RejectReason)
FLUSH_TRIGGERS: Final[tuple[FlushCause, ...]] = get_args(FlushCause)
ERROR_KINDS: Final[tuple[ErrorKind, ...]] = get_args(ErrorKind)
INSERT_RESULTS: Final[tuple[InsertResult, ...]] = get_args(InsertResult)
DROP_REASONS: Final[tuple[DropReason, ...]] = get_args(DropReason)
QUARANTINE_DESTINATIONS: Final[tuple[QuarantineDestination, ...]] = get_args(QuarantineDestination)

INF = float("inf")
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, INF)
BATCH_ROW_BUCKETS = (1, 10, 100, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, INF)
INSERT_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, INF)
REQUEST_BODY_BUCKETS = (256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, INF)
EVENTS_PER_REQUEST_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, INF)
BATCH_BYTES_BUCKETS = (1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864, INF)
# Dense around FLUSH_INTERVAL's default (1 s), where a healthy pipeline lives, then coarse up to
# the hour an outage may take.
END_TO_END_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                      900.0, 3600.0, INF)

# The label names of every labelled metric (all others have none). The metrics table of docs/observability.md and
# the integration tests hold the code to this.
METRIC_LABELS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "http_requests_total": ("method", "path", "status"),
    "http_request_duration_seconds": ("method", "path"),
    "requests_rejected_total": ("reason",),
    "ingest_key_events_total": ("key",),
    "batch_flush_total": ("trigger",),
    "clickhouse_insert_errors_total": ("kind",),
    "clickhouse_inserts_total": ("result",),
    "events_dropped_total": ("reason",),
    "events_quarantined_total": ("destination",),
    "clickhouse_backend_info": ("backend",),
    "clickpulse_build_info": ("version", "python"),
})


def unlabelled_counter(name: str, doc: str, registry: Registry) -> Counter:
    counter = Counter(name, doc, registry=registry)
    counter.set({}, 0)
    return counter


def zero_each(counter: Counter, label: str, values: Sequence[str]) -> Counter:
    for value in values:
        counter.add({label: value}, 0)
    return counter


def unlabelled_histogram(name: str, doc: str, registry: Registry, buckets: Sequence[float]) -> Histogram:
    histogram = Histogram(name, doc, registry=registry, buckets=buckets)
    histogram.zero({})
    return histogram


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
        self.events_received = unlabelled_counter(
            "events_received_total", "Events accepted into the pipeline (answered 202).", registry
        )
        self.requests_rejected = zero_each(Counter(
            "requests_rejected_total",
            "Requests refused before reaching the pipeline, by reason "
            "(invalid, too_large, unsupported_type, overloaded, shutting_down, unauthorized, forbidden, "
            "rate_limited, client_disconnected, malformed, timeout).",
            registry=registry,
        ), "reason", REJECT_REASONS)
        # Zeroed by the edge for every key name in INGEST_KEYS_FILE (and again at each reload).
        self.events_by_key = Counter(
            "ingest_key_events_total",
            "Events accepted by ingest key name (from INGEST_KEYS_FILE; `none`: sent without a key).",
            registry=registry,
        )
        self.request_body_bytes = unlabelled_histogram(
            "http_request_body_bytes",
            "Body size of each POST /events request read, accepted or not (a body refused by its "
            "Content-Length alone is never read).",
            registry,
            REQUEST_BODY_BUCKETS,
        )
        self.events_per_request = unlabelled_histogram(
            "events_per_request", "Events in each accepted POST /events request.", registry, EVENTS_PER_REQUEST_BUCKETS
        )


class BatcherMetrics:
    def __init__(self, registry: Registry) -> None:
        self.buffer_events = Gauge(
            "buffer_events", "Events held by the Batcher: its mailbox plus its buffer.", registry=registry
        )
        self.buffer_capacity_events = Gauge(
            "buffer_capacity_events", "MAX_BUFFER_EVENTS: above this the receiver answers 503.", registry=registry
        )
        self.buffer_capacity_bytes = Gauge(
            "buffer_capacity_bytes", "MAX_BUFFER_BYTES: above this the receiver answers 503.", registry=registry
        )
        self.mailbox_events = Gauge(
            "batcher_mailbox_events",
            "Events in the Batcher's mailbox, not yet taken into its buffer (they pile up while the Writer is busy).",
            registry=registry,
        )
        self.buffered_events = Gauge(
            "batcher_buffered_events", "Events in the Batcher's buffer, waiting to be flushed as a batch.", registry=registry
        )
        self.oldest_event_age = Gauge(
            "batcher_oldest_event_age_seconds",
            "How long the oldest event the Batcher holds (buffer, else mailbox) has waited; 0 when it holds none.",
            registry=registry,
        )
        self.batch_flushes = zero_each(Counter(
            "batch_flush_total", "Batches handed to the Writer, by trigger (size, interval, shutdown).", registry=registry
        ), "trigger", FLUSH_TRIGGERS)
        self.batch_size = Gauge("batch_size", "Rows in the most recently flushed batch.", registry=registry)
        self.batch_rows = unlabelled_histogram("batch_rows", "Rows per flushed batch.", registry, BATCH_ROW_BUCKETS)
        for gauge in (self.buffer_events, self.mailbox_events, self.buffered_events, self.oldest_event_age):
            gauge.set({}, 0)

    def publish(self, mailbox_events: int, buffered_events: int, oldest_event_age: float) -> None:
        self.mailbox_events.set({}, mailbox_events)
        self.buffered_events.set({}, buffered_events)
        self.buffer_events.set({}, mailbox_events + buffered_events)
        self.oldest_event_age.set({}, oldest_event_age)


class WriterMetrics:
    def __init__(self, registry: Registry) -> None:
        self.insert_errors = zero_each(Counter(
            "clickhouse_insert_errors_total",
            "Failed ClickHouse requests by kind (connection, timeout, server, rejected, limit, auth, schema).",
            registry=registry,
        ), "kind", ERROR_KINDS)
        self.rows_written = unlabelled_counter("clickhouse_rows_written_total", "Rows ClickHouse confirmed.", registry)
        self.bytes_written = unlabelled_counter(
            "clickhouse_bytes_written_total", "JSONEachRow body bytes ClickHouse confirmed.", registry
        )
        self.inserts = zero_each(
            Counter("clickhouse_inserts_total", "INSERT requests by result (ok, error).", registry=registry),
            "result", INSERT_RESULTS,
        )
        self.insert_duration = unlabelled_histogram(
            "clickhouse_insert_duration_seconds",
            "Duration of one INSERT request, successful or not.",
            registry,
            INSERT_DURATION_BUCKETS,
        )
        self.batch_bytes = unlabelled_histogram(
            "batch_bytes", "JSONEachRow body bytes per batch, measured once when the Writer encodes it.",
            registry, BATCH_BYTES_BUCKETS,
        )
        self.pending_events = Gauge(
            "writer_pending_events", "Events handed to the Writer and not yet confirmed by ClickHouse.", registry=registry
        )
        self.inflight_batches = Gauge(
            "writer_inflight_batches",
            "Batches handed to the Writer (queued or being written and retried) and not yet confirmed or dropped.",
            registry=registry,
        )
        self.end_to_end_latency = unlabelled_histogram(
            "end_to_end_latency_seconds",
            "Freshness: seconds from the receipt of a batch's oldest event until ClickHouse confirmed the "
            "batch; one observation per batch, so it is the worst event's wait. Events replayed from the "
            "spool at start count from the replay.",
            registry,
            END_TO_END_BUCKETS,
        )
        self.events_dropped = zero_each(Counter(
            "events_dropped_total",
            "Acknowledged events that will never reach ClickHouse, by reason (rejected, shutdown). Should stay 0.",
            registry=registry,
        ), "reason", DROP_REASONS)
        self.up = Gauge(
            "clickhouse_up", "1 when the last request to ClickHouse succeeded, else 0.", registry=registry
        )
        self.inflight_batches.set({}, 0)
        self.retries = unlabelled_counter(
            "clickhouse_insert_retries_total",
            "INSERT attempts repeated after a transient failure (connection, time-out, server error).",
            registry,
        )
        self.quarantined = zero_each(Counter(
            "events_quarantined_total",
            "Events ClickHouse rejected as data, kept aside by destination (table: <table>_quarantine, "
            "file: quarantine.ndjson in SPOOL_DIR, log: only in the error log when neither could be written).",
            registry=registry,
        ), "destination", QUARANTINE_DESTINATIONS)
        self.memory_events = Gauge(
            "pipeline_memory_events",
            "Events held in memory anywhere in the pipeline (mailboxes, buffer, batches being written); "
            "limited by MAX_BUFFER_EVENTS.",
            registry=registry,
        )
        self.memory_events.set({}, 0)
        self.memory_bytes = Gauge(
            "pipeline_memory_bytes",
            "Bytes of encoded events held in memory anywhere in the pipeline; limited by MAX_BUFFER_BYTES.",
            registry=registry,
        )
        self.memory_bytes.set({}, 0)
        self.up.set({}, 0)
        self.pending_events.set({}, 0)
        self.backend_info = Gauge(
            "clickhouse_backend_info",
            "1 for the backend the Writer uses: http (a ClickHouse server) or embedded (chDB in DATA_DIR).",
            registry=registry,
        )


class SpoolMetrics:
    """The write-ahead log (SPOOL_DIR); all stay 0 when there is none."""

    def __init__(self, registry: Registry) -> None:
        self.bytes = Gauge("spool_bytes", "Bytes of spool segment files on disk.", registry=registry)
        self.capacity_bytes = Gauge(
            "spool_capacity_bytes",
            "SPOOL_MAX_BYTES: the most bytes the spool may use on disk (beyond, 503); 0 when there is no spool.",
            registry=registry,
        )
        self.segments = Gauge("spool_segments", "Spool segment files on disk.", registry=registry)
        self.unconfirmed_events = Gauge(
            "spool_unconfirmed_events", "Events in the spool that ClickHouse has not confirmed yet.", registry=registry
        )
        self.oldest_unconfirmed_timestamp = Gauge(
            "spool_oldest_unconfirmed_timestamp_seconds",
            "Unix time the oldest unconfirmed event in the spool was received; 0 when there is none. "
            "Its age: time() - this.",
            registry=registry,
        )
        self.replayed_events = unlabelled_counter(
            "spool_replayed_events_total", "Unconfirmed events found in the spool at start and replayed.", registry
        )
        self.corrupt_records = unlabelled_counter(
            "spool_corrupt_records_total", "Torn or corrupt spool tails found and truncated at start.", registry
        )
        self.write_errors = unlabelled_counter(
            "spool_write_errors_total", "Failed spool writes or fsyncs (the requests were answered 503).", registry
        )
        self.rejected_full = unlabelled_counter(
            "spool_full_rejections_total", "Requests answered 503 because the spool reached SPOOL_MAX_BYTES.", registry
        )
        self.fsync_duration = unlabelled_histogram(
            "spool_fsync_duration_seconds",
            "Duration of one grouped fsync; every disk-acknowledged request waits for one.",
            registry,
            LATENCY_BUCKETS,
        )
        for gauge in (self.bytes, self.capacity_bytes, self.segments, self.unconfirmed_events,
                      self.oldest_unconfirmed_timestamp):
            gauge.set({}, 0)


class PipelineMetrics:
    """Every group, on one Registry."""

    def __init__(self, registry: Registry | None = None) -> None:
        self.registry = registry if registry is not None else Registry()
        self.receiver = ReceiverMetrics(self.registry)
        self.batcher = BatcherMetrics(self.registry)
        self.writer = WriterMetrics(self.registry)
        self.spool = SpoolMetrics(self.registry)
        self.process = ProcessMetrics(self.registry)
        self._formatter = TextFormatter()
        self._on_scrape: list[Callable[[], None]] = [self.process.refresh]

    def on_scrape(self, refresh: Callable[[], None]) -> None:
        """Runs `refresh` before every render, for gauges read from their owner's state."""
        self._on_scrape.append(refresh)

    def render(self) -> bytes:
        for refresh in self._on_scrape:
            refresh()
        return self._formatter.marshall(self.registry)

    @property
    def content_type(self) -> str:
        return self._formatter.get_headers()["Content-Type"]
