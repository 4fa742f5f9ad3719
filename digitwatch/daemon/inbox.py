"""What the inbox offers: the name rules, listing for backlog and rescans, and
the watchdog glue that reports files that became ready.

A file is ready when it was closed after writing or renamed into the inbox
(inotify). In polling mode, and for files found by listing rather than by an
event, it is ready once its size and mtime have been stable for
`settle_seconds`: a scan can see a file that is still being written.

With `recursive`, a folder created or moved into the inbox is listed as soon as
its event arrives: inotify watches a new folder only after its creation event
is read, so files renamed into it before that (`mkdir sub && mv a.png sub/`)
send no event of their own. Listing never follows a link: each folder is opened
from its parent with O_NOFOLLOW, and hidden folders (our `.digitwatch`
included) are never entered.
"""

from __future__ import annotations

import fnmatch
import os
import queue
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

WORK_DIR = ".digitwatch"  # claims live here, inside the inbox: same filesystem, atomic renames
TEMP_SUFFIXES = (".part", ".partial", ".tmp", ".temp", ".crdownload", ".download", ".swp", "~")
OS_LITTER = frozenset({"thumbs.db", "desktop.ini", ".ds_store", ".directory"})


def ignored_reason(name: str, patterns: tuple[str, ...]) -> str | None:
    """Why a file name is not taken, or None if it is. Case-insensitive."""
    lowered = name.lower()
    if lowered in OS_LITTER or lowered.startswith("._"):
        return "os_litter"
    if name.startswith("."):
        return "dotfile"
    if lowered.endswith(TEMP_SUFFIXES):
        return "temporary"
    if not any(fnmatch.fnmatchcase(lowered, p.lower()) for p in patterns):
        return "pattern"
    return None


def relative_name(path: Path, inbox: Path) -> str | None:
    """The name as dropped, relative to the inbox; None for the work folder or outside."""
    try:
        rel = path.relative_to(inbox)
    except ValueError:
        return None
    parts = rel.parts
    if not parts or any(p.startswith(".") for p in parts[:-1]):
        return None  # hidden folders, our own work folder included
    return rel.as_posix()


def list_inbox(inbox: Path, recursive: bool) -> Iterator[Path]:
    """Every entry that is not a folder (links and FIFOs too: they are refused later)."""
    return list_folder(inbox, inbox, recursive)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def list_folder(inbox: Path, folder: Path, recursive: bool) -> Iterator[Path]:
    """Every entry that is not a folder in `folder` (the inbox or a folder in
    it), and with `recursive` in its sub-folders. Hidden folders are skipped and
    links are never followed: each folder, `folder`'s own path included, is
    opened from its parent with O_NOFOLLOW, so one swapped for a symlink is
    skipped rather than entered. Unreadable or vanished folders are skipped (the
    next rescan tries again). Only the folders on the current path are held
    open, so a wide tree costs no more descriptors than a narrow one."""
    try:
        parts = folder.relative_to(inbox).parts
    except ValueError:
        return
    if any(p.startswith(".") for p in parts):
        return
    try:
        fd = os.open(inbox, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    for part in parts:
        try:
            sub = os.open(part, _DIR_FLAGS, dir_fd=fd)
        except OSError:
            sub = -1
        os.close(fd)
        if sub < 0:
            return
        fd = sub
    yield from _walk(fd, folder, recursive)


def _walk(fd: int, path: Path, recursive: bool) -> Iterator[Path]:
    """Depth first from the open folder `fd` (closed when done, or when the
    caller stops early); frames hold each open folder and its unvisited sub-folders."""
    frames: list[tuple[int, Path, list[str]]] = []
    current: tuple[int, Path] | None = (fd, path)
    try:
        while True:
            if current is not None:
                fd, path = current
                current = None
                subdirs: list[str] = []
                frames.append((fd, path, subdirs))
                try:
                    with os.scandir(fd) as it:
                        entries = list(it)
                except OSError:
                    entries = []
                for entry in entries:
                    try:
                        is_dir = entry.is_dir(follow_symlinks=False)
                    except OSError:
                        continue
                    if not is_dir:
                        yield path / entry.name
                    elif recursive and not entry.name.startswith("."):
                        subdirs.append(entry.name)
            if not frames:
                return
            top_fd, top_path, pending = frames[-1]
            if not pending:
                os.close(top_fd)
                frames.pop()
                continue
            name = pending.pop()
            try:
                current = (os.open(name, _DIR_FLAGS, dir_fd=top_fd), top_path / name)
            except OSError:
                continue  # vanished, unreadable, or swapped for a link
    finally:
        for open_fd, _, _ in frames:
            os.close(open_fd)
        if current is not None:
            os.close(current[0])


@dataclass
class _Seen:
    size: int
    mtime_ns: int


class Settler:
    """Decides when a listed file has stopped changing. Time comes from `clock`."""

    def __init__(self, settle_seconds: float, clock: Callable[[], float] = time.time) -> None:
        self._settle = settle_seconds
        self._clock = clock
        self._seen: dict[Path, _Seen] = {}

    def ready(self, path: Path) -> bool | None:
        """True when settled, False when still changing, None when gone."""
        try:
            st = os.lstat(path)
        except OSError:
            self._seen.pop(path, None)
            return None
        if not stat.S_ISREG(st.st_mode):
            return True  # links, FIFOs, devices never "finish"; refuse them at once
        previous = self._seen.get(path)
        self._seen[path] = _Seen(st.st_size, st.st_mtime_ns)
        quiet_for = self._clock() - st.st_mtime_ns / 1e9
        unchanged = previous is None or (previous.size, previous.mtime_ns) == (st.st_size, st.st_mtime_ns)
        if quiet_for >= self._settle and unchanged:
            self._seen.pop(path, None)
            return True
        return False

    def forget(self, path: Path) -> None:
        self._seen.pop(path, None)

    def waiting(self) -> list[Path]:
        return list(self._seen)


class Intake:
    """The files ready to claim, in the order they became ready, from three
    sources: the watch's notices (drained from the loop's event queue), the
    settle check of files still being written, and the rescan that catches
    what inotify dropped. Claims nothing: the loop pops `ready` when it has room."""

    def __init__(self, inbox: Path, *, recursive: bool, patterns: tuple[str, ...],
                 settle_seconds: float) -> None:
        self.inbox = inbox
        self.recursive = recursive
        self.patterns = patterns
        self.settler = Settler(settle_seconds)
        self.ready: dict[Path, None] = {}  # insertion-ordered set

    def accept(self, path: Path) -> bool:
        rel = relative_name(path, self.inbox)
        if rel is None or (not self.recursive and "/" in rel):
            return False
        return ignored_reason(path.name, self.patterns) is None

    def take_events(self, events: queue.Queue) -> None:
        """Everything on the queue now, without waiting. A None path is a bare
        wake-up (a worker finished a file)."""
        while True:
            try:
                path, settled = events.get_nowait()
            except queue.Empty:
                return
            if path is not None and self.accept(path := Path(os.path.abspath(path))):
                if settled:
                    self.settler.forget(path)
                    self.ready[path] = None
                elif self.settler.ready(path):
                    self.ready[path] = None

    def check_settling(self) -> None:
        for path in self.settler.waiting():
            if self.settler.ready(path):
                self.ready[path] = None

    def rescan(self) -> int:
        """List the inbox (backlog at start, then a periodic sweep); returns how
        many files it holds that the name rules take."""
        backlog = 0
        for path in list_inbox(self.inbox, self.recursive):
            if self.accept(path):
                backlog += 1
                if path not in self.ready and self.settler.ready(path):
                    self.ready[path] = None
        return backlog

    def pop(self) -> str | None:
        """The oldest ready file's name relative to the inbox, taken off `ready`;
        None when that path is no longer one the inbox offers."""
        path = next(iter(self.ready))
        del self.ready[path]
        return relative_name(path, self.inbox)


class _Handler(FileSystemEventHandler):
    """Turns watchdog events into (path, settled?) notices on a queue."""

    def __init__(self, out: queue.Queue, polling: bool, inbox: Path | None = None,
                 recursive: bool = False) -> None:
        self._out = out
        self._polling = polling
        self._inbox = inbox
        self._recursive = recursive

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            if self._recursive and not event.is_synthetic:
                # Synthetic events are watchdog's own listing of a folder moved
                # in: the listing of that folder below already covers them.
                if isinstance(event, DirMovedEvent) and event.dest_path:
                    self._list_new_folder(event.dest_path)
                elif isinstance(event, DirCreatedEvent):
                    self._list_new_folder(event.src_path)
            return
        if isinstance(event, FileMovedEvent):
            if event.dest_path:  # empty when moved out of the inbox
                self._report(Path(os.fsdecode(event.dest_path)), not self._polling)
        elif isinstance(event, FileClosedEvent):
            self._report(Path(os.fsdecode(event.src_path)), True)
        elif self._polling and isinstance(event, FileCreatedEvent | FileModifiedEvent):
            # Polling sees no close events: the file must settle first.
            self._report(Path(os.fsdecode(event.src_path)), False)
        elif isinstance(event, FileCreatedEvent):
            # Links, FIFOs and devices are never written and closed: refuse them
            # now rather than at the next rescan. Regular files wait for close.
            path = Path(os.fsdecode(event.src_path))
            try:
                regular = stat.S_ISREG(os.lstat(path).st_mode)
            except OSError:
                return
            if not regular:
                self._report(path, True)

    def _report(self, path: Path, settled: bool) -> None:
        """Queue a candidate, unless it lies in a hidden folder (our own claims
        among them: every claim is a rename into .digitwatch) or outside."""
        if self._inbox is None or relative_name(path, self._inbox) is not None:
            self._out.put((path, settled))

    def _list_new_folder(self, folder: bytes | str) -> None:
        """Report what is already in a folder that just appeared. Listed files
        must settle like any others: one may still be being written."""
        if self._inbox is None:
            return
        for path in list_folder(self._inbox, Path(os.fsdecode(folder)), recursive=True):
            self._out.put((path, False))


def start_observer(inbox: Path, *, recursive: bool, polling: bool, poll_interval: float,
                   out: queue.Queue) -> BaseObserver:
    """A running watchdog observer that reports candidate files on `out`."""
    if polling:
        observer: BaseObserver = PollingObserver(timeout=poll_interval)
    else:
        try:
            # Full events report a file moved in from outside the inbox as a
            # move, not a bare creation: `mv ~/scan.png inbox/` is complete.
            from watchdog.observers import inotify_move_event_grouper
            from watchdog.observers.inotify import InotifyObserver

            # watchdog holds every IN_MOVED_FROM for 0.5 s to pair it with its
            # IN_MOVED_TO, and its queue is FIFO: each claim (a rename out of
            # the inbox) would delay every later event by half a second. The
            # two halves of a rename arrive in the same read, so 20 ms still
            # pairs them.
            inotify_move_event_grouper.InotifyMoveEventGrouper.delay = 0.02
            observer = InotifyObserver(generate_full_events=True)
        except ImportError:  # not Linux
            observer = Observer()
    observer.schedule(_Handler(out, polling, inbox, recursive), str(inbox), recursive=recursive)
    observer.daemon = True
    observer.start()
    return observer
