"""structlog setup: JSON lines when stdout is not a terminal (journald, files),
coloured console lines when it is. Events are snake_case names with fields."""

from __future__ import annotations

import logging
import sys

import structlog


def processors(json_output: bool) -> list:
    """The processor chain; a pure function so tests can check both shapes."""
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json_output:
        return [*shared, structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(ensure_ascii=False)]
    return [*shared, structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())]


def configure(log_format: str = "auto", level: int = logging.INFO) -> None:
    """auto: console on a TTY, JSON otherwise."""
    json_output = log_format == "json" or (log_format == "auto" and not sys.stdout.isatty())
    structlog.configure(
        processors=processors(json_output),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=False,
    )
