"""The daemon's own state inside the inbox, and claiming files into it.

The inbox is written by other users, so nothing under it is trusted until
checked. Layout (everything created by the daemon, mode 0700):

    inbox/.digitwatch/                      the state root: a real folder, ours, 0700
    inbox/.digitwatch/quarantine/           what failed a check, set aside (never followed)
    inbox/.digitwatch/<name>-<pid>-<ns>/    one per instance run, flock'ed on `lock`
        lock  owner.json                    owner.json names the instance's results file
        <token>-<name>                      a claim whose name fits beside its token
        <token>/<sub>/<name>                a claim from a sub-folder, or a long name
        journal-<n>.json                    a batch's intent (see `commit`)

Every operation goes through folder descriptors opened with O_NOFOLLOW, and
names below them (dir_fd=..., follow_symlinks=False), so a path component
swapped for a link half way is never followed. A folder is trusted only if
lstat says it is a real directory, owned by our euid, writable by nobody
else; the state root failing that stops the daemon (exit 78, config error),
anything below it failing that is quarantined.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import os
import re
import socket
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from digitwatch.daemon.crashpoints import checkpoint
from digitwatch.daemon.inbox import WORK_DIR
from digitwatch.errors import ConfigError
from digitwatch.files import read_regular, refuse_unless_regular
from digitwatch.results import display_name

log = structlog.get_logger("digitwatch")

NAME_MAX = 255
QUARANTINE = "quarantine"
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FOLDER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}-(\d+)-([0-9a-f]{1,20})")
TOKEN = re.compile(rb"\d{8}")
FLAT = re.compile(rb"(\d{8})-(.+)", re.S)
JOURNAL = re.compile(r"journal-\d{8}\.json")
STALE_LOCKLESS_SECONDS = 60.0


class UntrustedError(Exception):
    """A folder or entry that is not what the daemon creates; the message says why."""


def untrusted_reason(st: os.stat_result) -> str | None:
    """Why a folder cannot be trusted with our state, or None if it can."""
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}, not by this process (uid {os.geteuid()})"
    if st.st_mode & 0o022:
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def untrusted_root(root: Path, why: str) -> ConfigError:
    """The one refusal for a state root we did not make (exit 78)."""
    return ConfigError(f"state folder {root} {why}; refusing to use it "
                       "(it must be a real directory owned by this user, mode 0700)")


def check_state_root(inbox: Path) -> bool:
    """Refuse (ConfigError) a state root that is not ours, before anything
    else touches the disk; never follows it. True when it exists."""
    root = inbox / WORK_DIR
    try:
        why = untrusted_reason(os.lstat(root))
    except FileNotFoundError:
        return False
    if why:
        raise untrusted_root(root, why)
    return True


def open_dir(name: str | bytes, dir_fd: int | None) -> int:
    """Open a trusted folder by name without following a link; UntrustedError if it is not ours."""
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        raise UntrustedError(untrusted_reason(os.lstat(name, dir_fd=dir_fd)) or str(exc)) from exc
    reason = untrusted_reason(os.fstat(fd))
    if reason:
        os.close(fd)
        raise UntrustedError(reason)
    return fd


def write_new(dir_fd: int, name: bytes, data: bytes, *, replace: bool = False) -> None:
    """Write a file durably under `name` in the folder: a temporary name created
    exclusively, synced, then renamed into place (`replace`) or linked (never
    overwriting: FileExistsError)."""
    tmp = b"." + name + b".tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dir_fd)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        # A full disk (or any failed write) must not leave one temporary file per retry.
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    else:
        os.close(fd)
    renamed = False
    try:
        if replace:
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            renamed = True
        else:
            os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    finally:
        if not renamed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)
    os.fsync(dir_fd)


@dataclass(eq=False)
class Folder:
    """An instance folder, held open by descriptor."""

    name: str
    fd: int
    path: Path  # for messages only; never used to reach a file
    lock_fd: int | None = None
    _journals: Iterator[int] = field(default_factory=lambda: itertools.count(1), repr=False)

    def journal_name(self) -> str:
        return f"journal-{next(self._journals):08d}.json"

    @property
    def uid(self) -> bytes:
        """Unique among instance folders ever made: pid and start time, in hex."""
        m = FOLDER_NAME.fullmatch(self.name)
        return (f"{int(m.group(1)):x}{m.group(2)}" if m else self.name).encode()

    def close(self) -> None:
        for fd in (self.lock_fd, self.fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.lock_fd = None

    def deleted(self) -> bool:
        """Whether the folder was removed under us (the inbox deleted with it)."""
        try:
            return os.fstat(self.fd).st_nlink == 0
        except OSError:
            return True


@dataclass(frozen=True)
class Claim:
    """A file taken (or about to be taken) out of the inbox into an instance folder."""

    folder: Folder = field(compare=False)
    token: bytes
    rel: bytes  # the name relative to the inbox, as dropped, as bytes

    @property
    def flat(self) -> bool:
        return b"/" not in self.rel and len(self.token) + 1 + len(self.rel) <= NAME_MAX

    @property
    def local(self) -> bytes:
        """The claim's path inside its instance folder."""
        return self.token + (b"-" if self.flat else b"/") + self.rel

    @property
    def name(self) -> bytes:
        return self.rel.rpartition(b"/")[2]

    @property
    def display(self) -> str:
        """The name as shown in results and logs (undecodable bytes as \\xNN)."""
        return display_name(os.fsdecode(self.rel))


def valid_rel(rel: bytes) -> bool:
    """A relative name of plain components: no empty, '.', '..' or NUL, not absolute."""
    parts = rel.split(b"/")
    return bool(rel) and not rel.startswith(b"/") and b"\0" not in rel and all(
        p and p not in (b".", b"..") and len(p) <= NAME_MAX for p in parts)


@contextlib.contextmanager
def parent_of(dir_fd: int, local: bytes, *, create: bool = False) -> Iterator[tuple[int, bytes]]:
    """The folder holding the last component of `local` (opened without
    following links, made 0700 on the way if `create`) and that component."""
    *dirs, leaf = local.split(b"/")
    fds: list[int] = []
    try:
        fd = dir_fd
        for d in dirs:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(d, 0o700, dir_fd=fd)
            fd = os.open(d, DIR_FLAGS, dir_fd=fd)
            fds.append(fd)
        yield fd, leaf
    finally:
        for f in fds:
            os.close(f)


def lstat_claim(claim: Claim) -> os.stat_result | None:
    try:
        with parent_of(claim.folder.fd, claim.local) as (fd, leaf):
            return os.lstat(leaf, dir_fd=fd)
    except (FileNotFoundError, NotADirectoryError):
        return None


def open_claim(claim: Claim) -> int:
    """A claimed file opened for reading. Links are refused, never followed; FIFOs
    and devices are refused before opening (opening a device can itself have effects)."""
    with parent_of(claim.folder.fd, claim.local) as (dfd, leaf):
        refuse_unless_regular(os.lstat(leaf, dir_fd=dfd).st_mode)
        return os.open(leaf, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)


def read_claim(claim: Claim, max_bytes: int) -> bytes:
    """A claimed file's bytes (see `open_claim`)."""
    return read_regular(open_claim(claim), max_bytes)


def release(claim: Claim) -> None:
    """The claim is reported: drop our name for the file (and its token folders)."""
    with contextlib.suppress(FileNotFoundError, NotADirectoryError), \
            parent_of(claim.folder.fd, claim.local) as (fd, leaf):
        os.unlink(leaf, dir_fd=fd)
    if not claim.flat:
        _drop_token_dirs(claim.folder.fd, claim.local)


def _drop_token_dirs(dir_fd: int, local: bytes) -> None:
    """rmdir the token folders of a claim, deepest first, stopping at one not empty."""
    dirs = local.split(b"/")[:-1]
    for depth in range(len(dirs), 0, -1):
        try:
            with parent_of(dir_fd, b"/".join(dirs[:depth])) as (fd, leaf):
                os.rmdir(leaf, dir_fd=fd)
        except OSError:
            return


class Workspace:
    """This instance's folder in the state root, locked for as long as it lives."""

    def __init__(self, inbox: Path, instance: str, results: Path) -> None:
        self.inbox = inbox
        self.results = results
        self.inbox_fd = os.open(inbox, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.root_path = inbox / WORK_DIR
        try:
            self.root_fd = self._open_root(WORK_DIR, self.inbox_fd)
            self.quarantine_fd = self._open_root(QUARANTINE, self.root_fd)
        except UntrustedError as exc:
            os.close(self.inbox_fd)
            raise untrusted_root(self.root_path, str(exc)) from None
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", instance)[:100] or "x"
        name = f"{safe}-{os.getpid()}-{time.time_ns():x}"
        os.mkdir(name, 0o700, dir_fd=self.root_fd)
        self.folder = Folder(name, open_dir(name, self.root_fd), self.root_path / name)
        self.folder.lock_fd = os.open("lock", os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                      0o600, dir_fd=self.folder.fd)
        fcntl.flock(self.folder.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        owner = {"results": str(results), "host": socket.gethostname(), "pid": os.getpid()}
        write_new(self.folder.fd, b"owner.json", json.dumps(owner).encode())
        self._tokens = itertools.count(1)

    @staticmethod
    def _open_root(name: str, parent_fd: int) -> int:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=parent_fd)
        return open_dir(name, parent_fd)

    @property
    def dir(self) -> Path:
        return self.folder.path

    def close(self) -> None:
        """Release the folder. An empty one is removed; leftovers stay for recovery."""
        with contextlib.suppress(OSError):
            names = set(os.listdir(self.folder.fd))
            if names <= {"lock", "owner.json"}:
                for n in names:
                    os.unlink(n, dir_fd=self.folder.fd)
                os.rmdir(self.folder.name, dir_fd=self.root_fd)
        self.folder.close()
        for fd in (self.quarantine_fd, self.root_fd, self.inbox_fd):
            with contextlib.suppress(OSError):
                os.close(fd)

    def alive(self) -> bool:
        """Our folder still exists and the inbox path is still the folder we opened."""
        try:
            st, mine = os.stat(self.inbox), os.fstat(self.inbox_fd)
        except OSError:
            return False
        return (st.st_ino, st.st_dev) == (mine.st_ino, mine.st_dev) and not self.folder.deleted()

    # ------------------------------------------------------------ claiming

    def reserve(self, rel: str) -> Claim:
        """A fresh token and the claim it names; nothing touches the disk, so
        the loop can hand the claim itself to a worker."""
        return Claim(self.folder, f"{next(self._tokens):08d}".encode(), os.fsencode(rel))

    def take(self, claim: Claim) -> bool:
        """Atomically rename the inbox file to the claim; False if it vanished or
        another instance took it first. The inbox side is walked without
        following links too: a sub-folder swapped for a link is not entered."""
        try:
            with parent_of(self.inbox_fd, claim.rel) as (src_fd, src_leaf), \
                    parent_of(claim.folder.fd, claim.local, create=True) as (dst_fd, dst_leaf):
                os.rename(src_leaf, dst_leaf, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        except OSError as exc:
            # Gone, or a sub-folder on its way swapped for a link (ELOOP,
            # ENOTDIR with O_NOFOLLOW): not ours to take, never entered.
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                raise
            if not claim.flat:
                _drop_token_dirs(claim.folder.fd, claim.local)
            return False
        checkpoint("claimed")
        return True

    def adopt(self, claim: Claim) -> Claim:
        """Move a dead instance's unjournaled claim into our folder under a fresh
        token. Safe to be cut short: the file is in one folder or the other,
        and no journal names it in either."""
        mine = Claim(self.folder, f"{next(self._tokens):08d}".encode(), claim.rel)
        with parent_of(claim.folder.fd, claim.local) as (sfd, sleaf), \
                parent_of(self.folder.fd, mine.local, create=True) as (dfd, dleaf):
            os.rename(sleaf, dleaf, src_dir_fd=sfd, dst_dir_fd=dfd)
        if not claim.flat:
            _drop_token_dirs(claim.folder.fd, claim.local)
        return mine

    # ------------------------------------------------------------ other instances

    def quarantine(self, dir_fd: int, name: str, where: Path, reason: str) -> None:
        """Move an entry we did not make aside (a rename: never followed), with an event."""
        target = f"{time.time_ns():x}-{name}"[:NAME_MAX]
        try:
            os.rename(name, target, src_dir_fd=dir_fd, dst_dir_fd=self.quarantine_fd)
        except OSError as exc:
            log.error("state_quarantine_failed", path=display_name(str(where / name)), reason=reason,
                      error=str(exc))
            return
        log.error("state_quarantined", path=display_name(str(where / name)), reason=reason,
                  moved_to=display_name(str(self.root_path / QUARANTINE / target)))

    def others(self, *, starting: bool) -> Iterator[Folder]:
        """Dead instances' folders, each locked by us while the caller works on it.
        Entries that are not instance folders we could have made are quarantined;
        a live instance writing another results file stops us at start."""
        for name in sorted(os.listdir(self.root_fd)):
            if name in (self.folder.name, QUARANTINE):
                continue
            if not FOLDER_NAME.fullmatch(name):
                self.quarantine(self.root_fd, name, self.root_path, "not an instance folder name")
                continue
            try:
                folder = Folder(name, open_dir(name, self.root_fd), self.root_path / name)
            except UntrustedError as exc:
                self.quarantine(self.root_fd, name, self.root_path, f"instance folder {exc}")
                continue
            except FileNotFoundError:
                continue  # finished by another instance just now
            try:
                dead = self._lock_if_dead(folder, starting=starting)
            except UntrustedError as exc:
                folder.close()
                self.quarantine(self.root_fd, name, self.root_path, str(exc))
                continue
            except BaseException:
                folder.close()
                raise
            if not dead:
                folder.close()
                continue
            try:
                yield folder
            finally:
                folder.close()

    def _lock_if_dead(self, folder: Folder, *, starting: bool) -> bool:
        try:
            fd = os.open("lock", os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder.fd)
        except FileNotFoundError:
            # No lock: died before locking, or finished; trust age, not a race.
            return time.time() - os.fstat(folder.fd).st_mtime > STALE_LOCKLESS_SECONDS
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UntrustedError("its lock is a symbolic link") from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UntrustedError("its lock is not a regular file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if starting:
                self._check_same_results(folder)
            return False
        folder.lock_fd = fd
        return True

    def _check_same_results(self, folder: Folder) -> None:
        """One results file per inbox: a live instance writing elsewhere stops us."""
        theirs = owner_results(folder)
        if theirs is not None and theirs != str(self.results):
            raise ConfigError(f"inbox {self.inbox} is watched by a live instance ({folder.name}) writing "
                              f"results to {theirs}, not {self.results}: one results file per inbox")


def owner_results(folder: Folder) -> str | None:
    """The results file an instance folder's owner.json names; None if absent or unreadable."""
    try:
        fd = os.open("owner.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=folder.fd)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        body = json.loads(os.read(fd, 65536))
        results = body.get("results") if isinstance(body, dict) else None
        return results if isinstance(results, str) else None
    except ValueError:
        return None
    finally:
        os.close(fd)


@dataclass
class Listing:
    """What a dead instance folder holds, sorted out."""

    journals: list[str] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)
    junk: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)


def list_folder(folder: Folder) -> Listing:
    """Sort a folder's entries into journals, claims and junk, following nothing.
    Claims may themselves be links, FIFOs...: they were dropped so, and are
    never followed; token folders must be real folders of ours."""
    out = Listing()
    for entry in sorted(os.scandir(folder.fd), key=lambda e: e.name):
        name, raw = entry.name, os.fsencode(entry.name)
        if name in ("lock", "owner.json"):
            if not entry.is_file(follow_symlinks=False):
                out.junk.append((name, f"{name} is not a regular file"))
            continue
        if JOURNAL.fullmatch(name):
            if entry.is_file(follow_symlinks=False):
                out.journals.append(name)
            else:
                out.junk.append((name, "journal is not a regular file"))
            continue
        if name.startswith(".") and name.endswith(".tmp"):
            with contextlib.suppress(OSError):  # a write cut short by the crash: ours, unfinished
                os.unlink(name, dir_fd=folder.fd)
            continue
        if (m := FLAT.fullmatch(raw)) and not entry.is_dir(follow_symlinks=False):
            out.claims.append(Claim(folder, m.group(1), m.group(2)))
            continue
        if TOKEN.fullmatch(raw):
            try:
                out.claims += _token_claims(folder, raw)
            except (UntrustedError, OSError) as exc:
                out.junk.append((name, f"token folder {exc}"))
            continue
        out.junk.append((name, "not a name this daemon makes"))
    return out


def _token_claims(folder: Folder, token: bytes) -> list[Claim]:
    """The files under a token folder, walked by descriptor without following links."""
    found: list[Claim] = []
    top = open_dir(token, folder.fd)
    stack = [(top, b"")]
    try:
        while stack:
            fd, prefix = stack.pop()
            try:
                for entry in os.scandir(fd):
                    raw = os.fsencode(entry.name)
                    if entry.is_dir(follow_symlinks=False):
                        stack.append((open_dir(raw, fd), prefix + raw + b"/"))
                    else:
                        found.append(Claim(folder, token, prefix + raw))
            finally:
                if fd != top:
                    os.close(fd)
    finally:
        os.close(top)
        for fd, _ in stack:
            os.close(fd)
    if not found:
        with contextlib.suppress(OSError):
            _rmtree_empty(folder.fd, token)
    if any(c.flat for c in found):
        # We only make token folders for names that cannot be flat.
        raise UntrustedError("holds a name this daemon would not put there")
    return found


def _rmtree_empty(dir_fd: int, name: bytes) -> None:
    """Remove a tree of empty folders (nothing else), by descriptor."""
    fd = open_dir(name, dir_fd)
    try:
        for entry in os.scandir(fd):
            _rmtree_empty(fd, os.fsencode(entry.name))
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def remove_if_empty(root_fd: int, folder: Folder) -> bool:
    """Remove a finished instance folder (only its lock and owner.json left)."""
    try:
        names = set(os.listdir(folder.fd))
        if not names <= {"lock", "owner.json"}:
            return False
        for n in names:
            os.unlink(n, dir_fd=folder.fd)
        os.rmdir(folder.name, dir_fd=root_fd)
        return True
    except OSError:
        return False
