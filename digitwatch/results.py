"""The result record and its three renderings: CSV, JSON lines and a table.

One record per input file, the same fields for `classify` and the daemon (the
daemon adds `ts`, `moved_to` and `instance`). Writers only format; appending,
flushing and syncing belong to whoever owns the file.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, fields

STATUS_OK = "ok"
STATUS_LOW = "low_confidence"
STATUS_ERROR = "error"


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

    def as_dict(self, columns: tuple[str, ...]) -> dict[str, object]:
        d = asdict(self)
        return {c: d[c] for c in columns}


CLASSIFY_COLUMNS = tuple(f.name for f in fields(Result) if f.name not in ("ts", "moved_to", "instance"))
DAEMON_COLUMNS = ("ts", *CLASSIFY_COLUMNS, "moved_to", "instance")

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
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_MINIMAL).writerow(cells)
    return buf.getvalue()


def json_line(result: Result, columns: tuple[str, ...]) -> str:
    """One JSON object per line; json escapes newlines, so a record is always one line."""
    d = result.as_dict(columns)
    for key in ("confidence", "latency_ms"):
        if isinstance(d[key], float):
            d[key] = round(d[key], 4 if key == "confidence" else 2)
    return json.dumps(d, ensure_ascii=False) + "\n"


def table(results: list[Result]) -> str:
    """Aligned columns for people; names and errors are shown with escapes."""
    rows = [("file", "digit", "conf", "status", "ms", "error")]
    for r in results:
        rows.append(
            (
                r.file.encode("unicode_escape").decode("ascii") if not r.file.isprintable() else r.file,
                "" if r.digit is None else str(r.digit),
                "" if r.confidence is None else f"{r.confidence:.3f}",
                r.status,
                f"{r.latency_ms:.1f}",
                r.error,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:5])) + "  " + row[5] for row in rows]
    return "\n".join(line.rstrip() for line in lines) + "\n"
