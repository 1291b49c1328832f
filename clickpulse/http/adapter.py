"""What every protocol adapter (POST /events, the /v1 API) is wired to, built once by the app:
the intake port rows go to, when to answer, the edge and the enrichment. A new way in takes one
of these plus its own limits."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from clickpulse.http.edge import Edge
from clickpulse.http.enrich import Enricher
from clickpulse.http.responses import Rejections
from clickpulse.messages import AckMode
from clickpulse.metrics import ReceiverMetrics
from clickpulse.ports import IntakePort


@dataclass(slots=True)
class Draining:
    """Whether intake has stopped (answer 503 shutting_down): set once by the app at shutdown.
    An attribute rather than a callable, as every request reads it."""

    started: bool = False


@dataclass(frozen=True, slots=True)
class AdapterWiring:
    intake: IntakePort
    max_batch_events: int
    ack_mode: AckMode
    ack_timeout: float
    draining: Draining
    pipeline_down: asyncio.Future[None]  # an actor died: waiting requests are answered 503
    rejections: Rejections
    metrics: ReceiverMetrics
    edge: Edge
    enricher: Enricher
