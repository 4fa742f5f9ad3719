"""The result record and its three renderings: CSV, JSON lines and a table.

One record per input file, the same fields for `classify` and the daemon (the
daemon adds `ts`, `moved_to` and `instance`). Writers only format; appending,
flushing and syncing belong to whoever owns the file.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import io
import json
import os
import stat
import time
from dataclasses import dataclass, fields
from pathlib import Path

STATUS_OK = "ok"
STATUS_LOW = "low_confidence"
STATUS_ERROR = "error"  # the file could not be read (`error` says why)
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
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_MINIMAL).writerow(cells)
    return buf.getvalue()


def json_line(result: Result, columns: tuple[str, ...]) -> str:
    """One JSON object per line; json escapes newlines, so a record is always one line."""
    d = result.as_dict(columns)
    for key in ("confidence", "latency_ms"):
        if isinstance(d.get(key), float):
            d[key] = round(d[key], 4 if key == "confidence" else 2)
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


class NotRegularFileError(OSError):
    """The results path is a link, FIFO, device, socket or folder: refused before
    any byte is written (a FIFO with no reader would block the daemon forever)."""


_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFLNK: "a symbolic link", stat.S_IFDIR: "a folder"}


def _check_regular(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise NotRegularFileError(f"refused: results path {path} is {kind}, not a regular file")


class ResultsFile:
    """The append-only results file that people `tail -f`.

    Guarantees (README, "The results file"):

    - Only a regular file is ever written. The path is lstat-checked, then
      opened with O_NOFOLLOW | O_NONBLOCK and fstat-checked before any byte is
      written: a link, FIFO, device or socket raises NotRegularFileError (an
      OSError, so the daemon reports commit_failed and retries; it never blocks).
    - A new file is created exclusively (O_EXCL) and, for CSV, gets its header
      at once, so `tail -f` works from the start.
    - Each append is one write of whole lines under an exclusive flock (waited
      for at most LOCK_TIMEOUT seconds, then OSError), then fsync; a failed
      write is cut back off, so a reader never sees half a line.
    - Torn tails: a file whose last byte is not a newline ends in a partial line
      (a crash mid-write; after a power cut, often a run of NULs where the size
      reached the disk but the data did not). Before the next append exactly
      that final partial line is cut: the file is truncated to just after its
      last newline, found by scanning back at most REPAIR_SCAN bytes. Nothing
      before that newline is ever cut. With no newline in that window (a file
      that is one huge partial line) nothing is cut at all: a newline is
      written first so the new lines start whole, and the junk stays as one bad
      line. The file is never truncated to zero by repair.
    - The file is reopened when it was rotated or deleted under us, or on SIGHUP.
    """

    REPAIR_SCAN = 16 * 1024 * 1024  # how far back torn-tail repair looks for the last newline
    LOCK_TIMEOUT = 10.0  # seconds to wait for another process's flock

    def __init__(self, path: Path, fmt: str) -> None:
        self.path = path
        self.fmt = fmt
        self._fd: int | None = None

    def _ensure_open(self) -> int:
        if self._fd is not None:
            try:
                st, mine = os.lstat(self.path), os.fstat(self._fd)
                same = (st.st_ino, st.st_dev) == (mine.st_ino, mine.st_dev)
            except FileNotFoundError:
                same = False
            if same:
                return self._fd
            self.close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, created = self._open_regular()
        self._fd = fd
        if created and self.fmt == "csv":
            self._locked(fd, lambda: self._append_locked(fd, b""))
        return fd

    def _open_regular(self) -> tuple[int, bool]:
        """(fd, created): a regular file, never through a link, never blocking."""
        flags = os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            _check_regular(self.path, os.lstat(self.path))  # a device is refused unopened
        except FileNotFoundError:
            try:
                return os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                pass  # someone made it just now: open it like any existing file
        try:
            fd = os.open(self.path, flags)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a link made since the lstat
                raise NotRegularFileError(f"refused: results path {self.path} is a symbolic link, "
                                          "not a regular file") from None
            raise
        try:
            _check_regular(self.path, os.fstat(fd))  # swapped between lstat and open
        except OSError:
            os.close(fd)
            raise
        return fd, False

    def open(self) -> None:
        """Open (creating it, with the CSV header, if new) or reopen after
        rotation, now; raises OSError (NotRegularFileError included) if impossible."""
        fd = self._ensure_open()
        if self.fmt == "csv" and os.fstat(fd).st_size == 0:
            self._locked(fd, lambda: self._append_locked(fd, b""))

    def reopen(self) -> None:
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def append(self, lines: list[str]) -> None:
        """Append whole lines durably, or raise OSError having written nothing."""
        fd = self._ensure_open()
        payload = "".join(lines).encode("utf-8", "backslashreplace")
        self._locked(fd, lambda: self._append_locked(fd, payload))

    def _locked(self, fd: int, action) -> None:
        """Run `action` holding the file's flock; never wait longer than LOCK_TIMEOUT
        (anyone who can read the file can flock it)."""
        deadline = time.monotonic() + self.LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise OSError(errno.EWOULDBLOCK, f"results file {self.path} locked by another "
                                  f"process for over {self.LOCK_TIMEOUT:.0f} s") from None
                time.sleep(0.01)
        try:
            action()
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _append_locked(self, fd: int, payload: bytes) -> None:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            cut = _last_newline(fd, size, self.REPAIR_SCAN)
            if cut is None:
                payload = b"\n" + payload  # no whole line to fall back to: cut nothing
            else:
                size = cut
                os.ftruncate(fd, size)
        if size == 0 and self.fmt == "csv":
            payload = csv_header(DAEMON_COLUMNS).encode() + payload
        if not payload:
            return
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, size)
            raise


def _pread_all(fd: int, length: int, offset: int) -> bytes:
    parts = []
    while length > 0:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            break
        parts.append(chunk)
        length -= len(chunk)
        offset += len(chunk)
    return b"".join(parts)


def _last_newline(fd: int, size: int, limit: int, step: int = 1 << 20) -> int | None:
    """The offset just after the file's last newline, looking back at most
    `limit` bytes, one `step` at a time; None if there is none in that window."""
    end = size
    while end > 0 and size - end < limit:
        start = max(0, end - step, size - limit)
        at = _pread_all(fd, end - start, start).rfind(b"\n")
        if at >= 0:
            return start + at + 1
        end = start
    return None
