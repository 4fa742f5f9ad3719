"""structlog setup: JSON lines when stdout is not a terminal (journald, files),
coloured console lines when it is. Events are snake_case names with fields.

When stdout is the journal, each line starts with its syslog priority (`<4>`),
the sd-daemon(3) convention journald strips and files under PRIORITY=, so
`journalctl -p warning` finds file_failed and commit_failed.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import structlog

# syslog(3) priorities by structlog level name.
PRIORITIES = {
    "critical": 2, "exception": 3, "error": 3, "warning": 4, "warn": 4,
    "notice": 5, "info": 6, "debug": 7,
}
DEFAULT_PRIORITY = 6


class PriorityPrefix:
    """Wraps the renderer: `<N>` before the rendered line, N from the event's
    level. Last in the chain, so nothing can drop the level before it."""

    def __init__(self, renderer: Callable[..., str]) -> None:
        self.renderer = renderer

    def __call__(self, logger: Any, method: str, event_dict: dict) -> str:
        level = str(event_dict.get("level", method)).lower()
        line = self.renderer(logger, method, event_dict)
        return f"<{PRIORITIES.get(level, DEFAULT_PRIORITY)}>{line}"


def processors(json_output: bool, *, journal: bool = False, colors: bool = False) -> list:
    """The processor chain; a pure function so tests can check every shape."""
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json_output:
        chain = [*shared, structlog.processors.format_exc_info]
        renderer: Any = structlog.processors.JSONRenderer(ensure_ascii=False)
    else:
        chain = list(shared)
        renderer = structlog.dev.ConsoleRenderer(colors=colors and not journal)
    return [*chain, PriorityPrefix(renderer) if journal else renderer]


def is_journal(environ: Mapping[str, str], stream: TextIO) -> bool:
    """Whether `stream` is the journal. systemd sets JOURNAL_STREAM=<dev>:<inode>
    when it connects stdout or stderr to the journal; it counts only if that is
    this stream (a child whose output was redirected inherits the variable)."""
    value = environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


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


def configure(log_format: str = "auto", level: int = logging.INFO, stream: TextIO | None = None) -> None:
    """auto: console on a TTY, JSON otherwise; priority prefixes under journald.
    Events go to stdout unless `stream` says otherwise (`classify` writes its
    records to stdout, so its few events go to stderr)."""
    global _writer
    stream = stream or sys.stdout
    tty = stream.isatty()
    json_output = log_format == "json" or (log_format == "auto" and not tty)
    _writer = LineWriter(stream)
    structlog.configure(
        processors=processors(json_output, journal=is_journal(os.environ, stream), colors=tty),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=lambda *_: _writer,
        cache_logger_on_first_use=False,
    )


def flush() -> None:
    """Push buffered events out: the daemon calls this before it waits."""
    _writer.flush()
