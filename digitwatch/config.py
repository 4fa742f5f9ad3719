"""Settings for the daemon: one frozen record, built in one place.

Precedence, lowest first: defaults < TOML file < DIGITWATCH_* environment <
command-line flags. Every key is all three: `inbox` in TOML, DIGITWATCH_INBOX
in the environment, --inbox on the command line. Relative paths are taken
relative to the working directory.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import socket
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, get_type_hints

import tomllib

from digitwatch.classify import DEFAULT_LOW_CONFIDENCE
from digitwatch.errors import ConfigError
from digitwatch.imaging import DEFAULT_MAX_PIXELS
from digitwatch.reading import constraints_for

ENV_PREFIX = "DIGITWATCH_"


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
    patterns: tuple[str, ...] = ("*.png",)
    recursive: bool = False
    polling: bool = False
    poll_interval: float = 1.0
    settle_seconds: float = 2.0
    rescan_seconds: float = 60.0
    batch_size: int = 32
    batch_wait_ms: float = 20.0
    review_threshold: float = DEFAULT_LOW_CONFIDENCE
    expect: str = "number"  # "digit": exactly one digit; "number": 1 or more
    length: str = ""  # digits a reading must have: "5" or "4-6"; "" any
    stop_timeout: float = 20.0
    workers: int = 2
    max_pixels: int = DEFAULT_MAX_PIXELS
    instance: str = ""
    log_format: str = "auto"
    metrics_port: int = 0
    metrics_bind: str = "127.0.0.1"

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


def _coerce(key: str, value: Any, origin: str) -> Any:
    """Turn a TOML value or an environment string into the field's type."""
    hint = _HINTS[key]
    text = str(hint)
    try:
        if value is None:
            return None
        if "Path" in text:
            if value == "" and "None" in text:
                return None
            return Path(os.path.expanduser(str(value)))
        if hint is bool:
            if isinstance(value, bool):
                return value
            lowered = str(value).strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {value!r}")
        if hint is int:
            if isinstance(value, bool):
                raise ValueError("not an integer")
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError("not a number")
            return float(value)
        if "tuple" in text:
            items = value if isinstance(value, list) else str(value).split(",")
            return tuple(str(i).strip() for i in items if str(i).strip())
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{origin}: {key} = {value!r} is invalid ({exc})") from exc


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: configuration file not found") from exc
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read configuration ({exc})") from exc
    table = data.get("digitwatch", data)
    unknown = sorted(set(table) - set(KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}")
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
    absolute = {
        f.name: Path(os.path.abspath(getattr(settings, f.name)))
        for f in fields(Settings)
        if isinstance(getattr(settings, f.name), Path)
    }
    settings = dataclasses.replace(settings, **absolute)
    validate(settings)
    return settings


def _inside(child: Path, parent: Path) -> bool:
    child, parent = child.resolve(), parent.resolve()
    return child == parent or parent in child.parents


def validate(s: Settings) -> None:
    """Refuse settings that cannot work or that would loop (outputs inside the inbox)."""
    if s.format not in ("csv", "jsonl"):
        raise ConfigError(f"format = {s.format!r}: use csv or jsonl")
    if s.log_format not in ("auto", "json", "console"):
        raise ConfigError(f"log_format = {s.log_format!r}: use auto, json or console")
    if not 0 <= s.metrics_port <= 65535:
        raise ConfigError("metrics_port must be 0 (off) or a TCP port")
    for key in ("batch_size", "workers", "max_pixels"):
        if getattr(s, key) < 1:
            raise ConfigError(f"{key} must be at least 1")
    for key in ("poll_interval", "rescan_seconds", "stop_timeout"):
        if getattr(s, key) <= 0:
            raise ConfigError(f"{key} must be positive")
    for key in ("settle_seconds", "batch_wait_ms"):
        if getattr(s, key) < 0:
            raise ConfigError(f"{key} must not be negative")
    if not 0.0 <= s.review_threshold <= 1.0:
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


def check_paths(s: Settings) -> None:
    """Start-up checks that touch the disk: the inbox must exist and be a folder."""
    if not s.inbox.exists():
        raise ConfigError(f"inbox {s.inbox} does not exist")
    if not s.inbox.is_dir():
        raise ConfigError(f"inbox {s.inbox} is not a folder")
    if s.model is not None and not s.model.is_file():
        raise ConfigError(f"model {s.model} not found")
