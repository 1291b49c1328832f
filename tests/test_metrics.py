"""Unit tests for clickpulse.metrics and clickpulse.process_metrics: naming, declared labels,
series that exist from the start, and the values computed at scrape time."""

from __future__ import annotations

import os
import platform
import re
import time
from pathlib import Path

from aioprometheus import Registry

from clickpulse import __version__
from clickpulse.metrics import METRIC_LABELS, BatcherMetrics, PipelineMetrics
from clickpulse.process_metrics import ProcessMetrics
from tests.integration.conftest import metric_samples


def rendered(metrics: PipelineMetrics) -> dict[str, float]:
    return metric_samples(metrics.render().decode())


# -- names and labels -------------------------------------------------------------------------


def test_every_name_follows_prometheus_conventions() -> None:
    for collector in PipelineMetrics().registry.get_all():
        name, kind = collector.name, collector.kind.name
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), name
        assert name.endswith("_total") == (kind == "counter"), f"{name} is a {kind}"
        assert not name.endswith(("_milliseconds", "_ms", "_kb", "_mb")), f"{name}: use base units"
        assert collector.doc.strip(), f"{name} has no help text"


def test_every_declared_label_set_belongs_to_a_registered_metric() -> None:
    registered = {collector.name for collector in PipelineMetrics().registry.get_all()}
    assert set(METRIC_LABELS) <= registered


def test_unlabelled_counters_and_histograms_have_a_zero_series_before_anything_happens() -> None:
    # A series that appears at its first increment hides that increment from rate(); alert
    # expressions over it would have no data until then.
    metrics = PipelineMetrics()
    samples = rendered(metrics)
    for collector in metrics.registry.get_all():
        if collector.name in METRIC_LABELS or collector.kind.name == "gauge":
            continue
        key = collector.name + ("_count" if collector.kind.name == "histogram" else "")
        assert key in samples, f"{collector.name} has no series yet"
        if collector.name != "process_cpu_seconds_total":
            assert samples[key] == 0, key


# -- computed at scrape time --------------------------------------------------------------------


def test_gauges_registered_on_scrape_are_set_at_every_render() -> None:
    metrics = PipelineMetrics()
    ages = iter([0.0, 1.5, 3.0])
    metrics.on_scrape(lambda: metrics.batcher.publish(0, 0, next(ages)))

    assert [rendered(metrics)["batcher_oldest_event_age_seconds"] for _ in range(3)] == [0.0, 1.5, 3.0]


def test_the_oldest_event_age_is_zero_without_a_batcher() -> None:
    metrics = BatcherMetrics(Registry())

    assert metrics.oldest_event_age.get({}) == 0


def test_every_spool_gauge_is_zero_without_a_spool() -> None:
    # The Service sets spool_capacity_bytes to SPOOL_MAX_BYTES when it builds a Spool (the
    # integration test reads it back through Prometheus); 0 is how dashboards and alerts tell
    # an instance without one.
    samples = rendered(PipelineMetrics())

    for name in ("spool_bytes", "spool_capacity_bytes", "spool_segments", "spool_unconfirmed_events",
                 "spool_oldest_unconfirmed_timestamp_seconds"):
        assert samples[name] == 0, name


# -- process metrics ---------------------------------------------------------------------------


def test_build_info_names_this_version_and_python() -> None:
    samples = rendered(PipelineMetrics())

    assert samples[f'clickpulse_build_info{{python="{platform.python_version()}",version="{__version__}"}}'] == 1


def test_cpu_seconds_grow_while_the_process_computes() -> None:
    metrics = PipelineMetrics()
    before = rendered(metrics)["process_cpu_seconds_total"]
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:
        pass

    assert rendered(metrics)["process_cpu_seconds_total"] >= before + 0.2


def test_open_fds_follow_files_opened_and_closed(tmp_path: Path) -> None:
    if not Path("/proc/self/fd").exists():
        return
    metrics = PipelineMetrics()
    before = rendered(metrics)["process_open_fds"]
    files = [open(tmp_path / f"file-{index}", "w") for index in range(5)]  # noqa: SIM115
    try:
        assert rendered(metrics)["process_open_fds"] == before + 5
    finally:
        for file in files:
            file.close()
    assert rendered(metrics)["process_open_fds"] == before
    assert rendered(metrics)["process_max_fds"] > before


def test_resident_memory_grows_with_memory_in_use() -> None:
    if not Path("/proc/self/statm").exists():
        return
    metrics = PipelineMetrics()
    before = rendered(metrics)["process_resident_memory_bytes"]
    block = bytearray(b"\x01") * (64 * 1024 * 1024)  # written, so its pages are resident

    assert rendered(metrics)["process_resident_memory_bytes"] >= before + 48 * 1024 * 1024
    del block


def test_start_time_is_in_the_past_and_stays_put() -> None:
    metrics = PipelineMetrics()
    first = rendered(metrics)["process_start_time_seconds"]

    assert time.time() - 24 * 3600 < first <= time.time()
    assert rendered(metrics)["process_start_time_seconds"] == first


def test_start_time_and_memory_come_from_proc(tmp_path: Path) -> None:
    clock_ticks = os.sysconf("SC_CLK_TCK")
    (tmp_path / "stat").write_text("cpu  1 2 3\nbtime 1700000000\nprocesses 42\n")
    process = tmp_path / "4242"
    (process / "fd").mkdir(parents=True)
    for fd in range(3):
        (process / "fd" / str(fd)).touch()
    # A command name with a space and parentheses, as proc(5) allows; field 22 is 50 s after boot.
    fields_after_name = ["S"] + ["0"] * 18 + [str(50 * clock_ticks)] + ["0"] * 30
    (process / "stat").write_text("4242 (a (weird) name) " + " ".join(fields_after_name) + "\n")
    (process / "statm").write_text("1000 250 100 1 0 200 0\n")

    metrics = ProcessMetrics(Registry(), proc_root=tmp_path, pid="4242")

    assert metrics.start_time.get({}) == 1700000050
    assert metrics.resident_memory.get({}) == 250 * os.sysconf("SC_PAGE_SIZE")
    assert metrics.open_fds.get({}) == 3


def test_without_proc_the_memory_and_fd_gauges_stay_absent(tmp_path: Path) -> None:
    registry = Registry()
    started = time.time()

    metrics = ProcessMetrics(registry, proc_root=tmp_path / "missing")

    assert started <= metrics.start_time.get({}) <= time.time()
    assert metrics.resident_memory.get_all() == []
    assert metrics.open_fds.get_all() == []
    assert metrics.cpu_seconds.get({}) > 0
