"""The commit protocol: from claimed files to placed files and result lines,
exactly once, whatever step a crash interrupts.

For each batch, in this order (each a named `checkpoint`):

1. **plan**: choose each file's destination (processed/ failed/ review/ and
   the day folder), its target name (the name as dropped, or when taken
   `stem-<folder id>-<token>.ext`: unique, so O(1)), its placement (a hard
   link on the same filesystem, else a copy through a temporary name), and
   its final result record.
2. **journaled**: all of that written to `journal-<n>.json` in the claims'
   instance folder and fsynced, before any byte moves. Names are bytes
   (hex in the journal), never their display form.
3. **placed**: per file, a hard link created exclusively (never replacing), or
   a copy written to the journaled temporary name in the destination folder,
   synced (**copied**), then linked to the target exclusively. Failed inputs
   get a sidecar `.errors/<target>.error.json`, in a folder that holds only
   sidecars, so it can never be another input's file.
4. **reported**: the placed files' lines appended to the results file, synced.
5. **released**: each claim unlinked (then its temporary copy name), then the
   journal removed, or rewritten with the files that could not be placed.

Recovery runs the same steps from the journal: a target counts as placed only
if it is ours (the claim's inode for a link; the temporary copy's inode for a
copy), lines already in the results file are not appended again, and a
claim already gone was released after its line was written. A file whose
destination is broken stays claimed and journaled and is retried; the others
of its batch go through.
"""

from __future__ import annotations

import binascii
import contextlib
import datetime as dt
import errno
import json
import os
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import structlog

from digitwatch.daemon import claims
from digitwatch.daemon.claims import DIR_FLAGS, NAME_MAX, Claim, Folder
from digitwatch.daemon.crashpoints import checkpoint
from digitwatch.daemon.results_file import ResultsFile
from digitwatch.results import RESULT_FIELDS, STATUS_ERROR, Result, display_name, render

log = structlog.get_logger("digitwatch")

JOURNAL_VERSION = 2
DEST_KINDS = ("processed", "failed", "review")
DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
TMP = re.compile(rb"\.dw-[0-9a-f]{1,40}-\d{8}\.tmp")
ERRORS_DIR = b".errors"
TAIL_BYTES = 16 * 1024 * 1024
# Linking refused for a reason that copying gets around.
MAX_BACKOFF = 30.0  # seconds between retries of a parked batch, at most
COPY_INSTEAD = (errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP)


class JournalError(ValueError):
    """A journal that cannot be trusted: it is quarantined, never acted on."""


@dataclass(frozen=True)
class Intent:
    """One file of a journaled batch: where it goes, how, and its line."""

    claim: Claim
    dest: str  # one of DEST_KINDS
    day: str
    target: bytes  # a plain name in the day folder
    kind: str  # "link" or "copy": how placement starts; recovery accepts either
    result: Result

    @property
    def tmp(self) -> bytes:
        """The temporary name of a copy, unique to the claim."""
        return b".dw-" + self.claim.folder.uid + b"-" + self.claim.token + b".tmp"


@dataclass
class Outcome:
    """What one pass of the protocol did with a batch."""

    done: list[Intent] = field(default_factory=list)  # placed, reported, released
    parked: list[Intent] = field(default_factory=list)  # still claimed and journaled: retry
    gone: list[Intent] = field(default_factory=list)  # claim already released (or deleted)
    error: str = ""


def unique_name(name: bytes, tag: bytes) -> bytes:
    """`stem-<tag>.ext` within NAME_MAX bytes; `tag` is unique, so no probing."""
    stem, dot, ext = name.rpartition(b".")
    if not dot or not stem:
        stem, ext = name, b""
    else:
        ext = b"." + ext
    suffix = b"-" + tag + ext
    return stem[: max(1, NAME_MAX - len(suffix))] + suffix


def valid_target(name: bytes) -> bool:
    return (0 < len(name) <= NAME_MAX and b"/" not in name and b"\0" not in name
            and not name.startswith(b"."))


# ---------------------------------------------------------------- the journal


def _hex(b: bytes) -> str:
    return b.hex()


def encode_journal(results: Path, intents: list[Intent]) -> bytes:
    body = {
        "v": JOURNAL_VERSION,
        "results": str(results),
        "entries": [
            {"token": i.claim.token.decode(), "rel": _hex(i.claim.rel), "dest": i.dest, "day": i.day,
             "target": _hex(i.target), "tmp": _hex(i.tmp), "kind": i.kind, "result": i.result.as_dict()}
            for i in intents
        ],
    }
    return json.dumps(body, ensure_ascii=True).encode()


_RESULT_TYPES: dict[str, tuple[type, ...]] = {
    "file": (str,), "digit": (int, type(None)), "confidence": (float, int, type(None)), "status": (str,),
    "error": (str,), "sha256": (str,), "width": (int, type(None)), "height": (int, type(None)),
    "model": (str,), "latency_ms": (float, int), "ts": (str,), "moved_to": (str,), "instance": (str,),
}


def decode_journal(folder: Folder, data: bytes, results: Path, roots: dict[str, Path]) -> list[Intent]:
    """Parse and check every field; JournalError names the first thing wrong."""
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise JournalError(f"not JSON: {exc}") from None
    if not isinstance(body, dict) or body.get("v") != JOURNAL_VERSION or not isinstance(body.get("entries"), list):
        raise JournalError("not a version 2 journal")
    if body.get("results") != str(results):
        raise JournalError(f"names another results file ({body.get('results')!r}), not {results}")
    intents, seen = [], set()
    for n, e in enumerate(body["entries"]):
        try:
            intents.append(_decode_entry(folder, e, roots))
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise JournalError(f"entry {n}: {exc}") from None
        if intents[-1].claim.token in seen:
            raise JournalError(f"entry {n}: token listed twice")
        seen.add(intents[-1].claim.token)
    return intents


def _decode_entry(folder: Folder, e: object, roots: dict[str, Path]) -> Intent:
    if not isinstance(e, dict):
        raise TypeError("not an object")
    token = e["token"].encode("ascii")
    rel, target, tmp = bytes.fromhex(e["rel"]), bytes.fromhex(e["target"]), bytes.fromhex(e["tmp"])
    if not claims.TOKEN.fullmatch(token):
        raise ValueError("bad token")
    if not claims.valid_rel(rel):
        raise ValueError("claim name is not a plain relative name")
    if e["dest"] not in roots:
        raise ValueError(f"unknown destination {e['dest']!r}")
    if not (isinstance(e["day"], str) and DAY.fullmatch(e["day"])):
        raise ValueError("bad day folder")
    dt.date.fromisoformat(e["day"])
    if not valid_target(target):
        raise ValueError("target is not a plain name")
    if e["kind"] not in ("link", "copy"):
        raise ValueError("bad placement kind")
    r = e["result"]
    if not isinstance(r, dict) or set(r) != set(RESULT_FIELDS):
        raise ValueError("result record has the wrong fields")
    for key, types in _RESULT_TYPES.items():
        if not isinstance(r[key], types) or isinstance(r[key], bool):
            raise TypeError(f"result field {key} has the wrong type")
    intent = Intent(Claim(folder, token, rel), e["dest"], e["day"], target, e["kind"], Result(**r))
    if tmp != intent.tmp:
        raise ValueError("temporary name is not this claim's")
    # moved_to is shown, never used as a path: recompute it rather than trust it.
    return replace(intent, result=replace(intent.result, moved_to=moved_to(roots, intent)))


def moved_to(roots: dict[str, Path], intent: Intent) -> str:
    path = os.fsencode(roots[intent.dest]) + b"/" + intent.day.encode() + b"/" + intent.target
    return display_name(os.fsdecode(path))


def read_journal(folder: Folder, name: str, results: Path, roots: dict[str, Path]) -> list[Intent]:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder.fd)
    except OSError as exc:
        raise JournalError(f"cannot open: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > 64 * 1024 * 1024:
            raise JournalError("not a regular file of sane size")
        return decode_journal(folder, fh.read(), results, roots)


def write_journal(folder: Folder, name: str, results: Path, intents: list[Intent]) -> None:
    claims.write_new(folder.fd, name.encode(), encode_journal(results, intents), replace=True)


def reported_tail(path: Path) -> bytes:
    """The results file's recent tail, with a newline in front so every whole
    line in it is found as b"\n" + line (recovery appends only the others)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return b"\n"
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            return b"\n"
        size = fh.seek(0, os.SEEK_END)
        fh.seek(max(0, size - TAIL_BYTES))
        data = fh.read()
        # A tail cut mid-line: its first partial line cannot match a whole line.
        return (b"\n" if size <= TAIL_BYTES else b"") + data


# ---------------------------------------------------------------- placing


def _lstat(name: bytes, dir_fd: int) -> os.stat_result | None:
    try:
        return os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None


def _same(a: os.stat_result | None, b: os.stat_result | None) -> bool:
    return a is not None and b is not None and (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)


def _copy(intent: Intent, day_fd: int) -> None:
    """Copy the claim to its temporary name in the day folder, synced. A half
    copy left by a crash is replaced first. Links are copied as links and
    FIFOs as FIFOs: never read through."""
    tmp = intent.tmp
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=day_fd)
    with claims.parent_of(intent.claim.folder.fd, intent.claim.local) as (cfd, leaf):
        mode = os.lstat(leaf, dir_fd=cfd).st_mode
        if stat.S_ISLNK(mode):
            os.symlink(os.readlink(leaf, dir_fd=cfd), tmp, dir_fd=day_fd)
            return
        # The copy keeps the original's permission bits (never more readable:
        # a private scan stays private); it is owned by the daemon's user.
        perm = stat.S_IMODE(mode) & 0o777
        if stat.S_ISFIFO(mode):
            os.mkfifo(tmp, 0o600, dir_fd=day_fd)
            os.chmod(tmp, perm, dir_fd=day_fd, follow_symlinks=False)
            return
        src = os.open(leaf, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=cfd) \
            if stat.S_ISREG(mode) else None
    try:
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=day_fd)
        try:
            os.fchmod(out, perm)
            while src is not None and os.sendfile(out, src, None, 1 << 20):
                pass
            os.fsync(out)
        finally:
            os.close(out)
    finally:
        if src is not None:
            os.close(src)
    checkpoint("copied")


def _place(intent: Intent, day_fd: int) -> None:
    """Give the claim its target name: a link, or a copy via the temporary name.
    Both create the target exclusively (FileExistsError if taken)."""
    if intent.kind == "link":
        try:
            with claims.parent_of(intent.claim.folder.fd, intent.claim.local) as (cfd, leaf):
                os.link(leaf, intent.target, src_dir_fd=cfd, dst_dir_fd=day_fd, follow_symlinks=False)
            return
        except OSError as exc:
            if exc.errno not in COPY_INSTEAD:
                raise
    _copy(intent, day_fd)
    os.link(intent.tmp, intent.target, src_dir_fd=day_fd, dst_dir_fd=day_fd, follow_symlinks=False)


def _write_sidecar(intent: Intent, day_fd: int) -> None:
    """The error record beside a failed input, in `.errors/`: a folder only we
    write, under the input's unique target name, so it replaces nothing but
    its own earlier copy."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(ERRORS_DIR, 0o755, dir_fd=day_fd)
    fd = os.open(ERRORS_DIR, DIR_FLAGS, dir_fd=day_fd)
    try:
        body = json.dumps(intent.result.as_dict(), ensure_ascii=False, indent=2).encode()
        claims.write_new(fd, intent.target + b".error.json", body, replace=True)
    finally:
        os.close(fd)


def sidecar_path(roots: dict[str, Path], intent: Intent) -> Path:
    return roots[intent.dest] / intent.day / os.fsdecode(ERRORS_DIR + b"/" + intent.target + b".error.json")


class Committer:
    """Runs the protocol for batches of one instance (and for dead instances' journals)."""

    def __init__(self, roots: dict[str, Path], results: ResultsFile, results_path: Path, fmt: str) -> None:
        self.roots = roots
        self.results = results
        self.results_path = results_path
        self.fmt = fmt

    # ------------------------------------------------------------ folders

    def _day_fd(self, dest: str, day: str, cache: dict[tuple[str, str], int], *, create: bool = True) -> int:
        """The day folder, created if needed and opened without following a link.
        Opened per pass, never cached across: it may be archived between batches."""
        key = (dest, day)
        if key not in cache:
            root = self.roots[dest]
            if create:
                root.mkdir(parents=True, exist_ok=True)
            root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(day, 0o755, dir_fd=root_fd)
                cache[key] = os.open(day, DIR_FLAGS, dir_fd=root_fd)
            finally:
                os.close(root_fd)
        return cache[key]

    # ------------------------------------------------------------ plan and journal

    def plan(self, items: list[tuple[Claim, Result, str]], now: dt.datetime, instance: str) -> list[Intent]:
        """Destination, target name, placement kind and final record for each file."""
        day = now.strftime("%Y-%m-%d")
        ts = now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        taken: set[tuple[str, bytes]] = set()
        intents: list[Intent] = []
        fds: dict[tuple[str, str], int] = {}
        try:
            for claim, result, dest in items:
                name, kind = claim.name, "link"
                try:
                    day_fd = self._day_fd(dest, day, fds)
                    free = _lstat(name, day_fd) is None
                    if os.fstat(day_fd).st_dev != os.fstat(claim.folder.fd).st_dev:
                        kind = "copy"
                except OSError:
                    free = True  # placing will fail and park the file; the name is re-checked then
                if not free or (dest, name) in taken or not valid_target(name):
                    name = unique_name(name.lstrip(b".") or b"x", claim.folder.uid + b"-" + claim.token)
                taken.add((dest, name))
                intent = Intent(claim, dest, day, name, kind, replace(result, ts=ts, instance=instance))
                intents.append(replace(intent, result=replace(intent.result, moved_to=moved_to(self.roots, intent))))
        finally:
            for fd in fds.values():
                os.close(fd)
        return intents

    def journal(self, folder: Folder, name: str, intents: list[Intent]) -> None:
        write_journal(folder, name, self.results_path, intents)
        checkpoint("journaled")

    # ------------------------------------------------------------ place, report, release

    def run(self, folder: Folder, journal: str, intents: list[Intent], *, dedupe: bool) -> Outcome:
        """Place what is not placed yet, report what is not reported, release.
        Idempotent: recovery and retries run exactly this. Never raises OSError:
        what could not be done is parked (still claimed and journaled)."""
        out = Outcome()
        try:
            self.results.open()  # unwritable: nothing is placed, everything waits
        except OSError as exc:
            out.parked, out.error = list(intents), f"results file: {exc}"
            return out
        fds: dict[tuple[str, str], int] = {}
        placed: list[Intent] = []
        try:
            current = list(intents)
            for n, intent in enumerate(current):
                try:
                    state, intent = self._ensure_placed(intent, fds, folder, journal, current, n)
                except OSError as exc:
                    out.parked.append(intent)
                    out.error = f"{intent.result.file}: {exc}"
                    continue
                (placed if state == "placed" else out.gone).append(intent)
            checkpoint("placed_batch")
            for fd in fds.values():
                os.fsync(fd)  # the names are on disk before their lines are
            try:
                self._report(placed, dedupe=dedupe)
            except OSError as exc:
                out.parked += placed
                out.error = f"results file: {exc}"
                return out
            for intent in placed:
                self._release(intent, fds)
                out.done.append(intent)
            for intent in out.gone:  # released before a crash; only a temporary name may be left
                self._release(intent, fds, step=False)
            try:
                if out.parked:
                    write_journal(folder, journal, self.results_path, out.parked)
                else:
                    os.unlink(journal, dir_fd=folder.fd)
            except FileNotFoundError:
                pass
            except OSError as exc:  # the journal stays as it was: recovery skips what is released
                log.warning("journal_update_failed", journal=journal, error=str(exc))
        finally:
            for fd in fds.values():
                os.close(fd)
        return out

    def _ensure_placed(self, intent: Intent, fds: dict, folder: Folder, journal: str,
                       current: list[Intent], n: int) -> tuple[str, Intent]:
        """("placed", intent) once the target is ours; ("gone", intent) if the claim is."""
        claim_st = claims.lstat_claim(intent.claim)
        if claim_st is None:
            return "gone", intent
        day_fd = self._day_fd(intent.dest, intent.day, fds)
        for _ in range(4):
            target_st = _lstat(intent.target, day_fd)
            if target_st is not None:
                if _same(target_st, claim_st) or _same(target_st, _lstat(intent.tmp, day_fd)):
                    break  # placed before a crash or a failed report
                # Taken by someone else since planning: a new unique name,
                # journaled before it is used.
                tag = intent.claim.folder.uid + b"-" + intent.claim.token + b"-" + os.urandom(4).hex().encode()
                intent = replace(intent, target=unique_name(intent.target, tag))
                intent = replace(intent, result=replace(intent.result, moved_to=moved_to(self.roots, intent)))
                current[n] = intent
                write_journal(folder, journal, self.results_path, current)
                continue
            try:
                _place(intent, day_fd)
            except FileExistsError:
                continue
            checkpoint("placed")
            break
        else:
            raise OSError(errno.EEXIST, "no free target name")
        if intent.result.status == STATUS_ERROR:
            _write_sidecar(intent, day_fd)
        return "placed", intent

    def _report(self, placed: list[Intent], *, dedupe: bool) -> None:
        lines = [render(i.result, self.fmt) for i in placed]
        if dedupe and lines:
            # Whole lines, searched as bytes: a CSV record may hold a quoted newline.
            tail = reported_tail(self.results_path)
            lines = [line for line in lines if b"\n" + line.encode("utf-8", "backslashreplace") not in tail]
        if lines:
            self.results.append(lines)
        checkpoint("reported")

    def _release(self, intent: Intent, fds: dict, *, step: bool = True) -> None:
        """Claim first, then the temporary copy name: while the claim exists, so
        does the proof that a copied target is ours."""
        try:
            claims.release(intent.claim)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(intent.tmp, dir_fd=self._day_fd(intent.dest, intent.day, fds, create=False))
        except OSError as exc:
            log.warning("release_failed", file=intent.result.file, error=str(exc))
            return
        if step:
            checkpoint("released")


def backoff_delay(attempt: int) -> float:
    """Seconds to wait before retrying a commit that failed `attempt` times
    (1-based): 0.5, 1, 2, 4, ... up to MAX_BACKOFF. The exponent is capped
    too: a destination broken all night reaches attempt 1026 in about 8.5
    hours, and 0.5 * 2**1025 does not fit a float (OverflowError)."""
    return min(MAX_BACKOFF, 0.5 * 2.0 ** min(max(attempt, 1) - 1, 16))


@dataclass
class Pending:
    """Files whose commit could not finish (a destination or the results file
    refused): still claimed, journaled unless `journal` is None; retried with back-off."""

    folder: Folder
    items: list[tuple[Claim, Result, str]]
    intents: list[Intent] = field(default_factory=list)
    journal: str | None = None
    attempts: int = 0
    retry_at: float = 0.0  # on the Outbox's clock (monotonic seconds)
    error: str = ""  # why the last attempt failed, for STATUS=


class Outbox:
    """The loop process's side of committing: each batch is journaled once,
    then placed, reported and released as far as it can be; what cannot finish
    is parked and retried with back-off (0.5 s doubling to MAX_BACKOFF). Never
    raises for one file's trouble. `on_done` gets each result once it is reported."""

    def __init__(self, committer: Committer, instance: str, on_done: Callable[[Result], None], *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.committer = committer
        self.instance = instance
        self.on_done = on_done
        self.parked: list[Pending] = []

    def blocked(self) -> int:
        """How many files wait on a parked batch."""
        return sum(len(p.items) for p in self.parked)

    def commit(self, folder: Folder, items: list[tuple[Claim, Result, str]]) -> None:
        self._commit(Pending(folder, items))

    def retry_due(self, now: float) -> None:
        due = [p for p in self.parked if now >= p.retry_at]
        if due:
            self.parked = [p for p in self.parked if now < p.retry_at]
            for pending in due:
                self._commit(pending)

    def _commit(self, pending: Pending) -> None:
        if pending.journal is None:
            try:
                pending.intents = self.committer.plan(pending.items, dt.datetime.now(dt.UTC), self.instance)
                name = pending.folder.journal_name()
                self.committer.journal(pending.folder, name, pending.intents)
                pending.journal = name
            except OSError as exc:
                if pending.folder.deleted():
                    # Deleted under us (the inbox removed with our claims in it):
                    # nothing left to place or report.
                    for _claim, result, _ in pending.items:
                        log.error("claim_vanished", file=result.file)
                    return
                self._park(pending, f"journal: {exc}")
                return
        out = self.committer.run(pending.folder, pending.journal, pending.intents, dedupe=pending.attempts > 0)
        for intent in out.done:
            self.on_done(intent.result)
        if pending.attempts == 0:
            for intent in out.gone:
                log.error("claim_vanished", file=intent.result.file)
        if out.parked:
            pending.intents = out.parked
            pending.items = [(i.claim, i.result, i.dest) for i in out.parked]
            self._park(pending, out.error)

    def _park(self, pending: Pending, error: str) -> None:
        pending.attempts += 1
        pending.error = error
        delay = backoff_delay(pending.attempts)
        pending.retry_at = self.clock() + delay
        self.parked.append(pending)
        log.error("commit_failed", error=error, files=len(pending.items), retry_in_s=delay,
                  attempt=pending.attempts)
