"""The review queue: the files the daemon routed to review/, each with what
the machine said of it (its line in the results file), addressed by an
opaque id. Read-only: nothing here changes the disk."""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from digitwatch.daemon.inbox import WORK_DIR
from digitwatch.results import display_name

# The machine's line is found by where it said the file went (moved_to); only
# the newest line for a path counts.
RESULTS_CHUNK = 1 << 20


@dataclass(frozen=True)
class Item:
    """One file waiting for a person."""

    id: str
    rel: bytes  # the path below the review folder (DAY/name), as bytes
    name: str  # the file's name as the results file writes it (\xNN for bytes that are not UTF-8)
    size: int
    mtime: float
    machine: dict = field(hash=False, compare=False)  # the machine's results line ({} if not found)

    @property
    def proposed(self) -> str:
        return str(self.machine.get("text") or "")

    def public(self, now: float) -> dict:
        """What the page shows: never a path."""
        m = self.machine
        digits = m.get("digits") or []
        return {
            "id": self.id, "name": self.name, "proposed": self.proposed, "reason": m.get("reason") or "",
            "confidence": _number(m.get("confidence")), "digits": [
                {"digit": int(d["digit"]), "confidence": float(d["confidence"])} for d in digits
                if isinstance(d, dict) and "digit" in d and "confidence" in d],
            "age_s": round(max(0.0, now - self.mtime), 1), "size": self.size,
        }


def _number(value: object) -> float | None:
    try:
        return None if value in (None, "") else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


class MachineLines:
    """The results file's newest line per moved_to path, read incrementally
    (a file rotated or truncated is read again from its start)."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.path = path
        self.fmt = fmt
        self.by_path: dict[str, dict] = {}
        self._ident: tuple[int, int] | None = None
        self._offset = 0
        self._header: list[str] | None = None
        self._partial = b""

    def refresh(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                return
            ident = (st.st_dev, st.st_ino)
            if ident != self._ident or st.st_size < self._offset:
                self._ident, self._offset, self._header, self._partial = ident, 0, None, b""
            fh.seek(self._offset)
            while chunk := fh.read(RESULTS_CHUNK):
                self._offset += len(chunk)
                self._take(self._partial + chunk)

    def _take(self, data: bytes) -> None:
        # Whole records only: CSV may quote a newline, so cut at the last
        # newline that ends a record (an even count of quotes before it).
        end = data.rfind(b"\n") + 1
        if self.fmt == "csv":
            while end and data[:end].count(b'"') % 2:
                end = data.rfind(b"\n", 0, end - 1) + 1
        self._partial = data[end:]
        text = data[:end].decode("utf-8", "replace")
        if self.fmt == "csv":
            rows = list(csv.reader(io.StringIO(text, newline="")))
            if self._header is None and rows:
                self._header, rows = rows[0], rows[1:]
            for row in rows:
                if self._header and len(row) == len(self._header):
                    self._add(dict(zip(self._header, row, strict=True)))
        else:
            for line in text.splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a torn line, repaired by the daemon: not ours to judge
                if isinstance(record, dict):
                    self._add(record)

    def _add(self, record: dict) -> None:
        moved = record.get("moved_to")
        if isinstance(moved, str) and moved:
            if isinstance(record.get("digits"), str):  # CSV carries no digits
                record.pop("digits")
            self.by_path[moved] = record


class Queue:
    """The review folder as a list of Items; ids are keyed with a secret of this server."""

    def __init__(self, review: Path, results: Path, fmt: str, secret: bytes) -> None:
        self.review = review.resolve()
        self.lines = MachineLines(results, fmt)
        self._secret = secret

    def item_id(self, rel: bytes, ino: int) -> str:
        return hmac.new(self._secret, rel + b"\0" + str(ino).encode(), hashlib.sha256).hexdigest()[:32]

    def items(self) -> list[Item]:
        """Every regular file one folder down (review/DAY/name), links never
        followed, hidden names and the state folder skipped; oldest first."""
        self.lines.refresh()
        out: list[Item] = []
        try:
            days = list(os.scandir(os.fsencode(self.review)))
        except OSError:
            return out
        for day in days:
            if day.name.startswith(b".") or day.name == os.fsencode(WORK_DIR) or not day.is_dir(follow_symlinks=False):
                continue
            try:
                entries = list(os.scandir(day.path))
            except OSError:
                continue
            for entry in entries:
                if entry.name.startswith(b"."):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue  # a link, FIFO or device planted here: never shown, never served
                rel = day.name + b"/" + entry.name
                path = os.fsdecode(os.path.join(os.fsencode(self.review), rel))
                machine = self.lines.by_path.get(display_name(path)) or self.lines.by_path.get(path) or {}
                name = str(machine.get("file") or display_name(os.fsdecode(entry.name)))
                out.append(Item(self.item_id(rel, st.st_ino), rel, name, st.st_size, st.st_mtime, machine))
        out.sort(key=lambda i: (i.mtime, i.rel))
        return out

    def find(self, item_id: str) -> Item | None:
        return next((i for i in self.items() if hmac.compare_digest(i.id, item_id)), None)

    def path_of(self, item: Item) -> bytes:
        return os.path.join(os.fsencode(self.review), item.rel)


def summary(items: list[Item], now: float | None = None) -> dict:
    """What is left and how old the oldest is."""
    now = time.time() if now is None else now
    return {"left": len(items), "oldest_age_s": round(max((now - i.mtime for i in items), default=0.0), 1)}
