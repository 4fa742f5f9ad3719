"""The results file people `tail -f`: opened without following links, locked,
appended to whole lines at a time and synced; reopened when logrotate moves it
and repaired when a power loss left half a line."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from pathlib import Path

from digitwatch.results import DAEMON_COLUMNS, csv_header


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
        """Close and open again now (SIGHUP after logrotate moved the file);
        raises OSError if it cannot be opened, and each append tries again."""
        self.close()
        self.open()

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
