"""The two seams of the pipeline, as small Protocols.

- `IntakePort`: what the HTTP layer hands accepted rows to. It returns once the rows are in the
  pipeline (with `durable`, once they are fsynced) or raises `Refused`. Two implementations: the
  memory intake (intake.py) and the spool (spool/).
- `Ledger`: what the Writer reports each insert's outcome to, before and after. The spool keeps
  its write-ahead log's marks with it; the memory intake releases the batch's memory reservation.

`BufferingPath` is both, with the lifecycle the supervisor drives: one object per service, the
memory path or the spool, chosen once when the pipeline is built.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from clickpulse.messages import Batch


class IntakePort(Protocol):
    @property
    def takes_durable(self) -> bool:
        """Whether `durable=True` (ack mode disk) can be honoured: only with a spool."""
        ...

    async def accept(
        self,
        rows: bytes,
        count: int,
        received_at: float,
        *,
        durable: bool,
        confirmation: asyncio.Future[int] | None,
    ) -> None:
        """Takes one request's JSONEachRow rows, or raises `Refused`."""
        ...


class Ledger(Protocol):
    async def before_insert(self, batch: Batch) -> None:
        """Called before `batch` is first sent. An OSError is logged and the insert goes ahead."""
        ...

    async def after_insert(self, batch: Batch) -> None:
        """Called once ClickHouse has every row of `batch`, or its quarantine has the rejected ones."""
        ...


class BufferingPath(IntakePort, Ledger, Protocol):
    @property
    def keeps_unwritten(self) -> bool:
        """True when what ClickHouse has not confirmed at exit survives for the next start."""
        ...

    @property
    def unconfirmed_events(self) -> int:
        """Events accepted and not yet confirmed by ClickHouse (kept for the next start, with a spool)."""
        ...

    async def open(self) -> None:
        """Prepares the path before intake starts (the spool recovers its directory here)."""
        ...

    def stop_forwarding(self) -> None:
        """Intake has stopped: from now on nothing more is handed to the Batcher."""
        ...

    async def close(self) -> None:
        """Releases files; after the Writer has finished."""
        ...

    def not_ready_reason(self) -> str | None:
        """Why the path cannot take events now (full, unwritable), else None."""
        ...
