"""The result record and its three renderings: CSV, JSON lines and a table.

One record per input file, the same fields for `classify` and the daemon (the
daemon adds `ts`, `moved_to` and `instance`). Writers only format; appending,
flushing and syncing belong to whoever owns the file.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, fields

STATUS_OK = "ok"
STATUS_LOW = "low_confidence"
STATUS_ERROR = "error"  # the file could not be read (`error` says why)
STATUS_REVIEWED = "reviewed"  # a person decided (`digitwatch review`): `text` is theirs
# low_confidence also covers what is not a digit string at all, or does not fit
# --expect/--length, or leaves writing unread: `reason` says which ("low confidence", "not a digit",
# "expected 5 digits, read 3", "more writing on the page than was read").


@dataclass(frozen=True)
class Result:
    """What became of one input file."""

    file: str
    digit: int | None
    confidence: float | None
    status: str
    error: str
    sha256: str
    width: int | None
    height: int | None
    model: str
    latency_ms: float
    ts: str = ""
    moved_to: str = ""
    instance: str = ""
    text: str = ""  # every digit read, left to right ("" when none)
    reason: str = ""  # why the status is low_confidence ("" otherwise)
    digits: tuple[tuple[int, float], ...] = ()  # (digit, probability) per digit read

    def as_dict(self, columns: tuple[str, ...] | None = None) -> dict[str, object]:
        """The fields named (all by default). Every field is a scalar or an
        immutable tuple, so no dataclasses.asdict: its recursive deep copy
        cost ~40 us per record."""
        return {c: getattr(self, c) for c in columns or RESULT_FIELDS}


RESULT_FIELDS = tuple(f.name for f in fields(Result))
# Columns only ever grow at the end, so existing CSV consumers keep working.
_READING = ("text", "reason")
_BASE = tuple(f for f in RESULT_FIELDS if f not in ("ts", "moved_to", "instance", *_READING, "digits"))
CLASSIFY_COLUMNS = (*_BASE, *_READING)
DAEMON_COLUMNS = ("ts", *_BASE, "moved_to", "instance", *_READING)
# JSON lines also carry the per-digit confidences (a list: CSV stays scalar).
CLASSIFY_JSON = (*CLASSIFY_COLUMNS, "digits")
DAEMON_JSON = (*DAEMON_COLUMNS, "digits")

# Spreadsheets run cells that start with these as formulas (CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def defuse(text: str) -> str:
    """Prefix a quote so a spreadsheet shows the text instead of evaluating it."""
    return "'" + text if text.startswith(_FORMULA_START) else text


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if value < 10 else f"{value:.1f}"
    return defuse(str(value))


def csv_header(columns: tuple[str, ...]) -> str:
    return _csv_line(list(columns))


def csv_line(result: Result, columns: tuple[str, ...]) -> str:
    """One CSV record; fields with commas, quotes or newlines are quoted (RFC 4180)."""
    return _csv_line([_cell(v) for v in result.as_dict(columns).values()])


def _csv_line(cells: list[str]) -> str:
    # The writer quotes a cell holding any character of its line terminator:
    # with "\n" alone a bare CR went out unquoted, and readers (Python's csv,
    # spreadsheets) split the record there. Written with CRLF, then ended "\n".
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n", quoting=csv.QUOTE_MINIMAL).writerow(cells)
    return buf.getvalue()[:-2] + "\n"


def json_line(result: Result, columns: tuple[str, ...]) -> str:
    """One JSON object per line; json escapes newlines, so a record is always one line."""
    d = result.as_dict(columns)
    for key in ("confidence", "latency_ms"):
        value = d.get(key)
        if isinstance(value, float):
            d[key] = round(value, 4 if key == "confidence" else 2)
    if "digits" in d:
        d["digits"] = [{"digit": int(g), "confidence": round(float(c), 4)} for g, c in result.digits]
    return json.dumps(d, ensure_ascii=False) + "\n"


def table(results: list[Result]) -> str:
    """Aligned columns for people; names and errors are shown with escapes."""
    rows = [("file", "digit", "conf", "status", "text", "ms", "error")]
    for r in results:
        rows.append(
            (
                r.file.encode("unicode_escape").decode("ascii") if not r.file.isprintable() else r.file,
                "" if r.digit is None else str(r.digit),
                "" if r.confidence is None else f"{r.confidence:.3f}",
                r.status,
                r.text,
                f"{r.latency_ms:.1f}",
                r.error or r.reason,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:6])) + "  " + row[6] for row in rows]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def display_name(name: str) -> str:
    """File names need not be UTF-8; show undecodable bytes as \\xNN so every
    results line is valid UTF-8 (and valid JSON)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def render(result: Result, fmt: str, columns: tuple[str, ...] | None = None) -> str:
    """The daemon's line for a result: DAEMON_COLUMNS, plus `digits` in JSON."""
    if fmt == "csv":
        return csv_line(result, columns or DAEMON_COLUMNS)
    return json_line(result, columns or DAEMON_JSON)
