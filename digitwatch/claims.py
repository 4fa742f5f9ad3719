"""Claiming files and putting them away, so that no file is ever lost or counted twice.

Every input goes through these states, each durable on disk:

1. **in the inbox**: `inbox/a.png`.
2. **claimed**: renamed (atomically; of several instances exactly one wins)
   to `inbox/.digitwatch/<instance-dir>/<token>-a.png`, or into a token
   folder, `<token>/sub/a.png`, when the name has folders in it or would not
   fit in NAME_MAX beside the token. Either way the name as dropped can be read
   back off the path. A crash here leaves the claim, which is classified again
   on restart.
3. **placed**: hard-linked into `processed/`, `failed/` or `review/` under a
   name nobody else holds (link creation is exclusive), and the batch's
   records written to a journal. A crash here: the journal says which lines
   may be missing from the results file.
4. **reported**: the batch's lines appended to the results file and synced.
5. **done**: the claim unlinked, the journal removed.

Recovery (at start, and when a dead instance's folder is adopted) finishes
journals by appending only the lines not already in the results file, and
re-classifies claims that never reached a journal. Each instance holds an
flock on its folder; a folder whose lock can be taken belongs to a dead
instance, on this host or another sharing the inbox.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from digitwatch.inbox import WORK_DIR
from digitwatch.results import Result

NAME_MAX = 255


@dataclass(frozen=True)
class Claim:
    """A file taken (or about to be taken) out of the inbox into this instance's folder."""

    token: str
    rel: str  # the name relative to the inbox, as dropped
    path: Path  # where the file is once claimed

    @property
    def flat(self) -> bool:
        """Whether the claim is a file directly in the instance folder (no token folder)."""
        return self.path.parents[self.rel.count("/")].name != self.token


_FLAT = re.compile(r"(\d{8}a?)-(.+)", re.S)


def claim_path(folder: Path, token: str, rel: str) -> Path:
    """Where a claim lives: `<token>-<name>` when that is one short enough
    name (no mkdir and rmdir per file, ~80 us of kernel time here), else
    `<token>/<rel>`. A longer token never makes a name flat that was not, so
    re-tokening on adoption keeps a token folder a token folder."""
    flat = f"{token}-{rel}"
    if "/" not in rel and len(os.fsencode(flat)) <= NAME_MAX:
        return folder / flat
    return folder / token / rel


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write-and-rename with fsync: readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class Workspace:
    """This instance's claim folder inside the inbox, locked for as long as it lives."""

    def __init__(self, inbox: Path, instance: str) -> None:
        self.root = inbox / WORK_DIR
        self.root.mkdir(exist_ok=True)
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", instance)[:100]
        self.dir = self.root / f"{safe}-{os.getpid()}-{time.time_ns():x}"
        self.dir.mkdir()
        self._lock_fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._tokens = itertools.count(1)
        self._batches = itertools.count(1)

    def close(self) -> None:
        """Release the folder. Empty folders are removed; leftovers stay for recovery."""
        with contextlib.suppress(OSError):
            leftovers = [p for p in self.dir.iterdir() if p.name != "lock"]
            if not leftovers:
                shutil.rmtree(self.dir)
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)

    def reserve(self, rel: str) -> Claim:
        """A fresh token and the path the claim will have; nothing touches the
        disk, so the loop can hand the claim itself to a worker."""
        token = self._token()
        return Claim(token, rel, claim_path(self.dir, token, rel))

    def _token(self, suffix: str = "") -> str:
        """Unique in this folder; adopted claims get suffix "a" so they can never
        meet one of our own numbers."""
        return f"{next(self._tokens):08d}{suffix}"

    @staticmethod
    def take(claim: Claim, source: Path) -> bool:
        """Atomically rename `source` to the claim's path; False if it vanished
        or another instance took it first. Safe to run in any thread."""
        if not claim.flat:
            os.makedirs(claim.path.parent)
        try:
            os.rename(source, claim.path)
        except FileNotFoundError:
            if not claim.flat:
                _drop_token_dir(claim)
            return False
        return True

    def journal_path(self) -> Path:
        return self.dir / f"journal-{next(self._batches):08d}.json"

    @staticmethod
    def release(claim: Claim) -> None:
        """The claim is reported: drop our name for the file (and its token folder)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(claim.path)
        if not claim.flat:
            _drop_token_dir(claim)

    def adopt_dead(self) -> list[Path]:
        """Move claim folders of dead instances into ours; returns their journals."""
        journals: list[Path] = []
        for other in sorted(self.root.iterdir()):
            if other == self.dir or not other.is_dir():
                continue
            try:
                fd = os.open(other / "lock", os.O_RDWR)
            except FileNotFoundError:
                # No lock file: a folder that died before locking, or was just adopted.
                if time.time() - other.stat().st_mtime > 60:
                    journals += self._take_over(other)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # alive
            try:
                journals += self._take_over(other)
            finally:
                os.close(fd)
        return journals

    def _take_over(self, other: Path) -> list[Path]:
        """Rename a dead folder's claims into ours under fresh tokens, and rewrite
        its journals to point at them."""
        renamed: dict[str, str] = {}
        for entry in sorted(other.iterdir()):
            if entry.is_dir():
                token = self._token("a")
                os.rename(entry, self.dir / token)
                renamed[entry.name] = token
            elif m := _FLAT.fullmatch(entry.name):
                token = self._token("a")
                target = claim_path(self.dir, token, m.group(2))
                if target.parent != self.dir:
                    target.parent.mkdir()
                os.rename(entry, target)
                renamed[m.group(1)] = token
        journals = []
        for entry in sorted(other.glob("journal-*.json")):
            moved = []
            for e in read_journal(entry):
                token = renamed.get(e.claim.token, e.claim.token)
                moved.append(Entry(Claim(token, e.claim.rel, claim_path(self.dir, token, e.claim.rel)), e.result))
            target = self.journal_path()
            write_journal(target, moved)
            journals.append(target)
        shutil.rmtree(other, ignore_errors=True)
        return journals

    def leftover_claims(self, skip: set[str]) -> list[Claim]:
        """Claims in our folder whose token is not in `skip` (journaled or in
        hand): to be classified again."""
        claims = []
        for entry in sorted(self.dir.iterdir()):
            if entry.is_dir():
                if entry.name in skip:
                    continue
                files = [p for p in entry.rglob("*") if not p.is_dir()]
                if not files:
                    shutil.rmtree(entry, ignore_errors=True)
                    continue
                for f in files:
                    claims.append(Claim(entry.name, f.relative_to(entry).as_posix(), f))
            elif (m := _FLAT.fullmatch(entry.name)) and m.group(1) not in skip:
                claims.append(Claim(m.group(1), m.group(2), entry))
        return claims


def _drop_token_dir(claim: Claim) -> None:
    """Remove a token folder emptied of its file: rmdir per level, a few
    syscalls where rmtree costs dozens; rmtree only if something else is in it."""
    depth = claim.rel.count("/")
    try:
        for folder in claim.path.parents[: depth + 1]:
            os.rmdir(folder)
    except FileNotFoundError:
        pass
    except OSError:
        shutil.rmtree(claim.path.parents[depth], ignore_errors=True)


# ---------------------------------------------------------------- placing files


def _candidate_names(name: str):
    """name, then stem-2.ext, stem-3.ext ... each within NAME_MAX bytes."""
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        stem, ext = name, ""
    else:
        ext = "." + ext
    yield name
    for n in itertools.count(2):
        suffix = f"-{n}{ext}"
        raw = os.fsencode(stem)
        budget = NAME_MAX - len(os.fsencode(suffix))
        yield os.fsdecode(raw[:budget]) + suffix


def place(src: Path, folder: Path, name: str) -> Path:
    """Give `src` a new name in `folder` that nobody else holds; never overwrites.

    A hard link is created exclusively (EEXIST means taken: try the next
    name). Where links cannot be made (another filesystem), the file is copied
    into an exclusively created name instead. `folder` must exist.
    """
    for candidate_name in _candidate_names(name):
        target = folder / candidate_name
        try:
            os.link(src, target, follow_symlinks=False)
            return target
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK):
                raise
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out)
            out.flush()
            os.fsync(out.fileno())
        return target
    raise AssertionError("unreachable")


def find_link(src: Path, folders: list[Path]) -> Path | None:
    """Another name of `src` in `folders` (a link placed before a crash)."""
    st = os.stat(src, follow_symlinks=False)
    if st.st_nlink < 2:
        return None
    for folder in folders:
        with contextlib.suppress(OSError):
            for entry in os.scandir(folder):
                est = entry.stat(follow_symlinks=False)
                if (est.st_ino, est.st_dev) == (st.st_ino, st.st_dev):
                    return Path(entry.path)
    return None


# ---------------------------------------------------------------- journals


@dataclass(frozen=True)
class Entry:
    """One file of a batch: its claim and the record to report."""

    claim: Claim
    result: Result


def write_journal(path: Path, entries: list[Entry]) -> None:
    body = [
        {"token": e.claim.token, "rel": e.claim.rel, "path": str(e.claim.path), "result": e.result.as_dict()}
        for e in entries
    ]
    write_atomic(path, json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogateescape"))


def read_journal(path: Path) -> list[Entry]:
    body = json.loads(path.read_bytes().decode("utf-8", "surrogateescape"))
    return [
        Entry(Claim(item["token"], item["rel"], Path(item["path"])), Result(**item["result"]))
        for item in body
    ]
