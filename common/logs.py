"""structlog set-up for the ``joulegate`` processes: JSON lines (or a console view), with context variables.

The request path binds ``request_id``, ``tenant``, ``backend`` and ``correlation_id`` with
``structlog.contextvars.bind_contextvars``; every line logged while serving that request carries them.

Conventions every log line here follows: the event is a snake_case name (``backend_down``, not prose), and what it
reports is in fields, never in a formatted string or a Python repr (``as_fields`` turns a stats dataclass into a
mapping), so that a log pipeline can filter and aggregate on them.

The request path's one line per finished request is ``proxy.request_log``'s.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import sys
from collections.abc import Mapping
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(_LEVELS[level], logging.WARNING), stream=sys.stderr, format="%(message)s")


def as_fields(value: Any) -> Any:
    """A dataclass (stats) as a plain mapping of its fields, recursively, for a log line's fields; enums as their
    values. Anything else is returned as it is."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: as_fields(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): as_fields(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [as_fields(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    return value


class _CurrentStderr:
    """Whatever ``sys.stderr`` is at the time of writing (it is swapped under test runners)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def logs_to_stderr() -> None:
    """Keep stdout for a command's own output (scripts parse it): a structlog that prints to stdout (its default
    logger factory) is pointed at stderr; any other logging set-up is left alone."""
    factory = structlog.get_config()["logger_factory"]
    if isinstance(factory, structlog.PrintLoggerFactory) and getattr(factory, "_file", None) in (None, sys.stdout):
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(_CurrentStderr()))  # type: ignore[arg-type]
