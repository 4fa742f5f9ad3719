"""Finishing what a dead instance left in its folder (this one's past included).

Journals are finished in place by the commit protocol itself (their claims
never move, so a crash during recovery loses nothing: the folder is simply
recovered again). Claims no journal names never reached a journal: they are
moved into the live instance's folder to be classified again. A folder whose
journal failed validation has those claims set aside too, since which of
them the bad journal named (and perhaps reported) cannot be known.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from digitwatch.daemon import claims, commit
from digitwatch.daemon.crashpoints import checkpoint
from digitwatch.results import STATUS_ERROR

log = structlog.get_logger("digitwatch")


@dataclass
class Recovered:
    """What recovering one folder did."""

    done: list[commit.Intent] = field(default_factory=list)  # placed, reported, released now
    adopted: list[claims.Claim] = field(default_factory=list)  # now ours, to classify again
    journals: int = 0


def _not_as_read(intent: commit.Intent) -> str:
    """Why a journaled claim cannot be what the journal says was read, or "".
    The intake reads regular files only: a link, FIFO or device goes to failed/
    as an error, never with a reading. A journal placing one otherwise is forged."""
    if intent.result.status == STATUS_ERROR and intent.dest == "failed":
        return ""
    try:
        with claims.parent_of(intent.claim.folder.fd, intent.claim.local) as (cfd, leaf):
            mode = os.lstat(leaf, dir_fd=cfd).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return ""  # released already: placed and reported before the crash
    return "" if stat.S_ISREG(mode) else "places a claim that is not a regular file"


def recover_folder(ws: claims.Workspace, committer: commit.Committer, folder: claims.Folder) -> Recovered:
    """Quarantine what is not ours, finish valid journals, adopt the other claims."""
    out = Recovered()
    listing = claims.list_folder(folder)
    for name, reason in listing.junk:
        ws.quarantine(folder.fd, name, folder.path, reason)
    journaled: set[bytes] = set()
    untrusted = False
    for name in listing.journals:
        try:
            intents = commit.read_journal(folder, name, committer.results_path, committer.roots)
        except commit.JournalError as exc:
            ws.quarantine(folder.fd, name, folder.path, f"journal {exc}")
            untrusted = True
            continue
        forged = next((why for i in intents if (why := _not_as_read(i))), "")
        if forged:
            ws.quarantine(folder.fd, name, folder.path, f"journal {forged}")
            untrusted = True
            continue
        journaled |= {i.claim.token for i in intents}
        checkpoint("recovering")
        run = committer.run(folder, name, intents, dedupe=True)
        checkpoint("recovered")
        out.journals += 1
        out.done += run.done
        if run.parked:
            log.error("recovery_incomplete", folder=str(folder.path), journal=name,
                      files=len(run.parked), error=run.error)
    leftovers = [c for c in listing.claims if c.token not in journaled]
    if untrusted:
        for top in sorted({c.local.split(b"/")[0] for c in leftovers}):
            ws.quarantine(folder.fd, os.fsdecode(top), folder.path, "claim beside a quarantined journal")
        leftovers = []
    for claim in leftovers:
        try:
            out.adopted.append(ws.adopt(claim))
        except OSError as exc:
            log.error("adopt_failed", file=claim.display, error=str(exc))
    claims.remove_if_empty(ws.root_fd, folder)
    if out.journals or leftovers:
        log.info("recovered", folder=folder.name, journals=out.journals, claims=len(out.adopted))
    return out


def recover_others(ws: claims.Workspace, committer: commit.Committer, *, starting: bool,
                   stopping: Callable[[], bool], on_done: Callable[[commit.Intent], None],
                   adopt: Callable[[claims.Claim], None]) -> int:
    """Recover every other instance folder (this one's past too, at start):
    `on_done` for each file a journal finished, `adopt` for each claim to
    classify again. One bad folder, journal or file costs that item only: a
    folder that fails is logged and retried on the next call. Returns how many
    files were finished or adopted."""
    count = 0
    try:
        for folder in ws.others(starting=starting):
            if stopping():
                return count
            try:
                rec = recover_folder(ws, committer, folder)
            except Exception as exc:  # contained: the folder is retried on the next rescan
                log.error("recovery_failed", folder=str(folder.path), error=str(exc))
                continue
            for intent in rec.done:
                on_done(intent)
            for claim in rec.adopted:
                adopt(claim)
            count += len(rec.done) + len(rec.adopted)
    except OSError as exc:
        log.error("recovery_failed", folder=str(ws.root_path), error=str(exc))
    return count
