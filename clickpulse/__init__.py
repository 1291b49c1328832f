"""clickpulse: an HTTP event collector that batches events into ClickHouse."""

__version__ = "0.1.0"
