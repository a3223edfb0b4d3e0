"""structlog set-up: one event per line, key=value (or JSON), with session and firing ids bound, and the
current span's ``trace_id`` and ``span_id`` when tracing is on (``petribus.tracing``)."""

from __future__ import annotations

import logging
import sys

import structlog

from petribus import tracing

_configured = False


def configure(level: str = "info", fmt: str = "console", stream=None) -> None:
    global _configured
    lvl = getattr(logging, level.upper(), logging.INFO)
    renderer = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.processors.LogfmtRenderer(key_order=["timestamp", "level", "event"], drop_missing=True)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_trace_ids,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
    _configured = True


def add_trace_ids(logger: object, method: str, event_dict: dict) -> dict:
    """A structlog processor: the current span's ids on the line (one look at a global while tracing is
    off)."""
    ids = tracing.current_ids()
    if ids is not None:
        event_dict.setdefault("trace_id", ids[0])
        event_dict.setdefault("span_id", ids[1])
    return event_dict


def get(name: str) -> structlog.typing.FilteringBoundLogger:
    if not _configured:
        configure()
    return structlog.get_logger(name)
