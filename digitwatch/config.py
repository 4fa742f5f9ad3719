"""Settings for the daemon: one frozen record, built in one place.

Precedence, lowest first: defaults < TOML file < DIGITWATCH_* environment <
command-line flags. Every key is all three: `inbox` in TOML, DIGITWATCH_INBOX
in the environment, --inbox on the command line. Relative paths, wherever they
come from (the file included), are taken relative to the working directory:
the service's is its unit's WorkingDirectory, so `check-config` agrees with the
service when run from that folder (it prints the folder it used).
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import math
import os
import socket
import tomllib
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any, get_type_hints

from digitwatch.errors import ConfigError, reason
from digitwatch.reader.imaging import DEFAULT_MAX_PIXELS
from digitwatch.reader.reading import constraints_for

ENV_PREFIX = "DIGITWATCH_"
DEFAULT_PATTERNS = ("*.png",)  # the `patterns` setting's default; also what `classify` takes from a folder
DEFAULT_TIME_LIMIT = 10.0  # seconds one file may take in a worker
# Address space a worker may map beyond what it has when warm. A 40 Mpx RGB16
# page (the pixel limit) decodes to 240 MB and its gray copies to ~400 MB more.
DEFAULT_MEMORY_LIMIT = 2 * 1024**3


@dataclass(frozen=True)
class Settings:
    """Everything `digitwatch watch` needs; see config/digitwatch.toml for each key."""

    inbox: Path = Path("var/inbox")
    processed: Path = Path("var/processed")
    failed: Path = Path("var/failed")
    review: Path | None = None
    results: Path = Path("var/results.csv")
    format: str = "csv"
    model: Path | None = None
    patterns: tuple[str, ...] = DEFAULT_PATTERNS
    recursive: bool = False
    polling: bool = False
    poll_interval: float = 1.0
    settle_seconds: float = 2.0
    rescan_seconds: float = 60.0
    batch_size: int = 32
    batch_wait_ms: float = 20.0
    # None: the model card's recommended threshold (chosen with its calibration).
    review_threshold: float | None = None
    expect: str = "number"  # "digit": exactly one digit; "number": 1 or more
    length: str = ""  # digits a reading must have: "5" or "4-6"; "" any
    stop_timeout: float = 20.0
    workers: int = 0  # worker processes; 0: one per CPU this process may use
    worker_memory_mb: int = DEFAULT_MEMORY_LIMIT >> 20  # address space a worker may add to its warm size
    worker_timeout_s: float = DEFAULT_TIME_LIMIT  # one file in a worker; then it is killed
    max_pixels: int = DEFAULT_MAX_PIXELS
    instance: str = ""
    log_format: str = "auto"
    metrics_port: int = 0
    metrics_bind: str = "127.0.0.1"
    review_bind: str = "127.0.0.1"  # the review station (`digitwatch review`)
    review_port: int = 8765
    review_token_file: Path | None = None
    corrections: Path | None = None  # None: <results folder>/corrections

    def instance_name(self) -> str:
        return self.instance or socket.gethostname()

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = str(v) if isinstance(v, Path) else (list(v) if isinstance(v, tuple) else v)
        return out


_HINTS = get_type_hints(Settings)
KEYS = tuple(f.name for f in fields(Settings))

# One line per key: the CLI's --help and check-config show these; the shipped
# config/digitwatch.toml says the same at more length.
HELP: dict[str, str] = {
    "inbox": "Folder people drop scans into; must exist at start.",
    "processed": "Classified files go to <processed>/YYYY-MM-DD/.",
    "failed": "Unreadable files go to <failed>/YYYY-MM-DD/ with a .error.json.",
    "review": "Low-confidence files go here instead of processed; empty: off.",
    "results": "The CSV or JSON-lines results file, appended and fsynced.",
    "format": "Results format.",
    "model": ".tflite (LiteRT), .keras, or a pair card (.json); empty: the shipped models/digits-reject.json.",
    "patterns": "Comma-separated file name patterns taken from the inbox.",
    "recursive": "Also watch sub-folders of the inbox.",
    "polling": "Poll instead of inotify (NFS, SMB, some container mounts).",
    "poll_interval": "Seconds between polls in polling mode.",
    "settle_seconds": "A file is ready once its size and mtime held this long (polling, rescans).",
    "rescan_seconds": "Re-list the inbox this often, for anything an event missed.",
    "batch_size": "At most this many files per model call.",
    "batch_wait_ms": "A ready file waits at most this long for others to join its batch.",
    "review_threshold": ("Confidence below this gives status low_confidence, for every answer; empty: the model "
                         "card's thresholds (one for one-digit answers, one for longer)."),
    "expect": "number: read 1 or more digits; digit: exactly one (anything else is not ok).",
    "length": "Digits a reading must have, e.g. 5 or 4-6; empty: any.",
    "stop_timeout": "On SIGTERM, finish the batch in hand within this many seconds.",
    "workers": "Worker processes that read, decode and normalize files; 0: one per CPU.",
    "worker_memory_mb": "MB of address space a worker may map beyond its warm size; a file needing more fails.",
    "worker_timeout_s": "Seconds one file may take in a worker; then the worker is killed and the file fails.",
    "max_pixels": "Refuse images with more pixels (from the PNG header).",
    "instance": "Name in each result line's instance field; empty: the host name.",
    "log_format": "Log lines: console on a terminal, JSON lines otherwise (auto).",
    "metrics_port": "Prometheus port; 0 = off.",
    "metrics_bind": "Address the metrics port listens on.",
    "review_bind": "Address the review station (digitwatch review) listens on; beyond loopback it needs a token.",
    "review_port": "TCP port of the review station.",
    "review_token_file": "A file holding the token the review station requires (or DIGITWATCH_REVIEW_TOKEN).",
    "corrections": "Where review decisions keep what the model saw, with the answer; empty: beside the results.",
}
CHOICES: dict[str, tuple[str, ...]] = {
    "format": ("csv", "jsonl"),
    "log_format": ("auto", "json", "console"),
    "expect": ("number", "digit"),
}


def _describe(value: Any) -> str:
    """A value as the user wrote it, for messages: 'abc', 2.5, true."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, str) else str(value)


def _whole(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value.strip())
    raise ValueError(f"expected a whole number, got {_describe(value)}")


def _number(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise ValueError(f"expected a number, got {_describe(value)}") from None
    else:
        raise ValueError(f"expected a number, got {_describe(value)}")
    # float() takes "nan" and "inf"; neither is a duration or a threshold.
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {_describe(value)}")
    return number


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {_describe(value)}")


def _text(value: Any) -> str:
    if isinstance(value, Enum):  # a typer choice
        value = value.value
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"expected a string, got {_describe(value)}")
    return os.fspath(value)


def _coerce(key: str, value: Any, origin: str) -> Any:
    """Turn a TOML value, an environment string or a flag into the field's type.
    Messages say what was expected in words, never Python's own."""
    hint = _HINTS[key]
    text = str(hint)
    try:
        if value is None:
            return None
        if "Path" in text:
            path = _text(value)
            if path == "" and "None" in text:
                return None
            return Path(os.path.expanduser(path))
        if hint is bool:
            return _boolean(value)
        if hint is int:
            return _whole(value)
        if hint is float:
            return _number(value)
        if hint == float | None:
            return None if isinstance(value, str) and value.strip() == "" else _number(value)
        if "tuple" in text:
            items = value if isinstance(value, list) else _text(value).split(",")
            return tuple(_text(i).strip() for i in items if _text(i).strip())
        return _text(value)
    except ValueError as exc:
        raise ConfigError(f"{origin}: {key}: {exc}") from None


def _did_you_mean(key: str) -> str:
    close = difflib.get_close_matches(key, KEYS, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def read_toml(path: Path) -> dict[str, Any]:
    """The [digitwatch] table (or a file of bare keys), typed and checked."""
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a configuration file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    if "digitwatch" in data:
        table = data["digitwatch"]
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: digitwatch must be a table ([digitwatch])")
        # A key above the table is not read: say so rather than ignore it.
        outside = sorted(set(data) - {"digitwatch"})
        if outside:
            raise ConfigError(f"{path}: {', '.join(outside)} must go under [digitwatch], not above it")
    else:
        table = data
    for key in sorted(table):
        if key not in KEYS:
            raise ConfigError(f"{path}: unknown key {key}{_did_you_mean(key)}")
    return {k: _coerce(k, v, str(path)) for k, v in table.items()}


def from_env(environ: dict[str, str]) -> dict[str, Any]:
    out = {}
    for key in KEYS:
        name = ENV_PREFIX + key.upper()
        if name in environ:
            out[key] = _coerce(key, environ[name], name)
    return out


def load_settings(
    config: Path | None, environ: dict[str, str], flags: dict[str, Any]
) -> Settings:
    """Merge the four layers and validate the result."""
    merged: dict[str, Any] = {}
    if config is not None:
        merged.update(read_toml(config))
    merged.update(from_env(environ))
    merged.update({k: _coerce(k, v, f"--{k.replace('_', '-')}") for k, v in flags.items() if v is not None})
    settings = dataclasses.replace(Settings(), **merged)
    # Absolute paths: moved_to in results and logs must not depend on a cwd.
    absolute: dict[str, Any] = {
        f.name: _absolute(f.name, getattr(settings, f.name))
        for f in fields(Settings)
        if isinstance(getattr(settings, f.name), Path)
    }
    settings = dataclasses.replace(settings, **absolute)
    validate(settings)
    return settings


def _absolute(key: str, path: Path) -> Path:
    try:
        return Path(os.path.abspath(path))
    except OSError as exc:
        # `sudo -u digitwatch` from a folder that user cannot enter (root's home).
        raise ConfigError(f"{key} {path} is relative, but the working directory cannot be read "
                          f"({reason(exc)}): run from the folder it is relative to") from None


def _inside(child: Path, parent: Path) -> bool:
    child, parent = child.resolve(), parent.resolve()
    return child == parent or parent in child.parents


def validate(s: Settings) -> None:
    """Refuse settings that cannot work or that would loop (outputs inside the inbox)."""
    for key, choices in CHOICES.items():
        if getattr(s, key) not in choices:
            raise ConfigError(f"{key} = {getattr(s, key)!r}: use {', '.join(choices[:-1])} or {choices[-1]}")
    if not 0 <= s.metrics_port <= 65535:
        raise ConfigError("metrics_port must be 0 (off) or a TCP port")
    if not 1 <= s.review_port <= 65535:
        raise ConfigError("review_port must be a TCP port (1-65535)")
    for key in ("batch_size", "max_pixels", "worker_memory_mb"):
        if getattr(s, key) < 1:
            raise ConfigError(f"{key} must be at least 1")
    if s.workers < 0:
        raise ConfigError("workers must be 0 (one per CPU) or more")
    for key in ("poll_interval", "rescan_seconds", "stop_timeout", "worker_timeout_s"):
        if getattr(s, key) <= 0:
            raise ConfigError(f"{key} must be positive")
    for key in ("settle_seconds", "batch_wait_ms"):
        if getattr(s, key) < 0:
            raise ConfigError(f"{key} must not be negative")
    if s.review_threshold is not None and not 0.0 <= s.review_threshold <= 1.0:
        raise ConfigError("review_threshold must be between 0 and 1")
    try:
        constraints_for(s.expect, s.length)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if not s.patterns:
        raise ConfigError("patterns is empty: nothing would ever be taken")
    for pattern in s.patterns:
        if "/" in pattern:
            raise ConfigError(f"pattern {pattern!r}: patterns match file names, not paths")
        fnmatch.translate(pattern)
    outputs = {"processed": s.processed, "failed": s.failed, "results": s.results}
    if s.review is not None:
        outputs["review"] = s.review
    for key, path in outputs.items():
        if _inside(s.inbox, path):
            raise ConfigError(f"inbox {s.inbox} lies inside {key} {path}")
        # A non-recursive watcher never looks into sub-folders, so outputs there
        # are safe; a recursive one would classify its own output forever.
        if s.recursive and _inside(path, s.inbox):
            raise ConfigError(f"{key} {path} lies inside the recursive inbox {s.inbox}")
    if s.results.parent.resolve() == s.inbox.resolve():
        raise ConfigError(f"results {s.results} must not be written into the inbox")
