"""structlog setup: JSON lines when stdout is not a terminal (journald, files),
coloured console lines when it is. Events are snake_case names with fields."""

from __future__ import annotations

import logging
import sys
import threading
from typing import TextIO

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


class LineWriter:
    """A structlog logger that writes each event as one line and leaves flushing
    to the stream (line-buffered on a terminal) and to `flush()`. The daemon
    logs one event per file: print(flush=True) made that one write(2) per file,
    on the thread every file waits for; the loop now flushes before it sleeps."""

    def __init__(self, file: TextIO) -> None:
        self._file = file
        self._lock = threading.Lock()

    def msg(self, message: str) -> None:
        with self._lock:
            self._file.write(message + "\n")

    def flush(self) -> None:
        with self._lock:
            self._file.flush()

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


_writer = LineWriter(sys.stdout)


def configure(log_format: str = "auto", level: int = logging.INFO) -> None:
    """auto: console on a TTY, JSON otherwise."""
    global _writer
    json_output = log_format == "json" or (log_format == "auto" and not sys.stdout.isatty())
    _writer = LineWriter(sys.stdout)
    structlog.configure(
        processors=processors(json_output),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=lambda *_: _writer,
        cache_logger_on_first_use=False,
    )


def flush() -> None:
    """Push buffered events out: the daemon calls this before it waits."""
    _writer.flush()
