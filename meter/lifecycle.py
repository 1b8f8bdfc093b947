"""The lifecycle of the meter's long-lived parts (ledger, sampler, meter service, NVML source), as one explicit state
instead of flags (``_closed``, ``_thread is None``)."""

from __future__ import annotations

import enum

__all__ = ["Lifecycle"]


class Lifecycle(enum.Enum):
    NEW = "new"  # built, not started (nothing runs, nothing is open)
    RUNNING = "running"  # started (threads run, handles are open)
    CLOSED = "closed"  # stopped or closed for good; it never starts again
