"""The fast collectors must render exactly what aioprometheus's own would for the same updates."""

from __future__ import annotations

import random

import aioprometheus
import pytest
from aioprometheus import Registry
from aioprometheus.formats.text import TextFormatter

from clickpulse import collectors

BUCKETS = (0.001, 0.01, 0.1, 1.0, 10.0, float("inf"))
LABEL_SETS = [{}, {"method": "POST", "path": "/events"}, {"path": "/events", "method": "GET"}]


def render_both(update) -> tuple[str, str]:
    rendered = []
    for module in (aioprometheus, collectors):
        registry = Registry()
        metrics = (
            module.Counter("c_total", "a counter", registry=registry),
            module.Gauge("g", "a gauge", registry=registry),
            module.Histogram("h_seconds", "a histogram", registry=registry, buckets=BUCKETS),
        )
        update(*metrics, random.Random(7))
        rendered.append(TextFormatter().marshall(registry).decode())
    return rendered[0], rendered[1]


def test_counters_gauges_and_histograms_render_like_aioprometheus() -> None:
    def update(counter, gauge, histogram, draw: random.Random) -> None:
        for _ in range(2000):
            labels = dict(draw.choice(LABEL_SETS))
            counter.inc(labels)
            counter.add(labels, draw.randint(0, 5))
            gauge.set(labels, draw.uniform(-5, 5))
            gauge.inc(labels)
            # Bucket bounds themselves fall into their own bucket (le is inclusive).
            histogram.observe(labels, draw.choice([draw.uniform(0, 20), 0.01, 1.0, 0.0]))

    original, fast = render_both(update)
    assert fast == original
    assert 'h_seconds_bucket{le="0.01",method="POST",path="/events"}' in fast


def test_label_order_does_not_make_a_second_series() -> None:
    counter = collectors.Counter("c_total", "a counter", registry=Registry())
    counter.inc({"a": "1", "b": "2"})
    counter.inc({"b": "2", "a": "1"})
    assert counter.get_all() == [({"a": "1", "b": "2"}, 2)]


def test_label_names_are_still_checked_and_counters_cannot_decrease() -> None:
    counter = collectors.Counter("c_total", "a counter", registry=Registry())
    with pytest.raises(ValueError):
        counter.inc({"__reserved": "x"})
    with pytest.raises(ValueError):
        counter.add({}, -1)


def test_a_zeroed_histogram_renders_empty_buckets() -> None:
    registry = Registry()
    histogram = collectors.Histogram("h_seconds", "a histogram", registry=registry, buckets=BUCKETS)
    histogram.zero({})
    text = TextFormatter().marshall(registry).decode()
    assert 'h_seconds_bucket{le="+Inf"} 0' in text and "h_seconds_count 0" in text


def test_updates_through_a_kept_key_render_like_updates_through_labels() -> None:
    def render(by_key: bool) -> str:
        registry = Registry()
        counter = collectors.Counter("c_total", "a counter", registry=registry)
        histogram = collectors.Histogram("h_seconds", "a histogram", registry=registry, buckets=BUCKETS)
        draw = random.Random(3)
        for _ in range(500):
            labels = dict(draw.choice(LABEL_SETS))
            value = draw.uniform(0, 20)
            if by_key:
                counter.add_at(counter.key_of(labels), 2)
                histogram.observe_at(histogram.key_of(labels), value)
            else:
                counter.add(labels, 2)
                histogram.observe(labels, value)
        return TextFormatter().marshall(registry).decode()

    assert render(by_key=True) == render(by_key=False)
    assert "c_total" in render(by_key=True)
