"""A person's decision, committed exactly once with the daemon's discipline:
the file is claimed out of review/ by an atomic rename (a second reviewer, or
a second server, finds it gone: "already decided"), the decision journaled,
placed in processed/ (failed/ when unreadable), its line appended and synced,
the claim released (`daemon.commit`). A server killed at any step is finished
by the next one to start (`daemon.recovery`), exactly as the daemon's own.
Then what the model saw is kept in the corrections folder, with the answer."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog

from digitwatch.config import Settings
from digitwatch.daemon import claims, commit, recovery
from digitwatch.daemon.results_file import ResultsFile
from digitwatch.files import DEFAULT_MAX_BYTES
from digitwatch.reader.model import write_whole
from digitwatch.reader.prepare import prepare_bytes
from digitwatch.results import STATUS_REVIEWED, Result
from digitwatch.review.queue import Item

log = structlog.get_logger("digitwatch")

MAX_ANSWER = 64  # digits a person may type for one file
MAX_REVIEWER = 64  # characters of a reviewer's name


class DecisionError(ValueError):
    """A decision the server refuses (not digits, too long): one line for the page."""


@dataclass(frozen=True)
class Decision:
    """What became of a decision: `done` or `already` (someone else decided first)."""

    outcome: str
    moved_to: str = ""
    result: Result | None = None


def clean_answer(text: str | None) -> str | None:
    """The answer as digits, or None for 'unreadable'; DecisionError otherwise."""
    if text is None:
        return None
    text = text.strip()
    if not text or not text.isascii() or not text.isdigit() or len(text) > MAX_ANSWER:
        raise DecisionError(f"an answer is 1-{MAX_ANSWER} digits 0-9 (or 'unreadable')")
    return text


def clean_reviewer(name: str | None) -> str:
    name = (name or "").strip() or "reviewer"
    if len(name) > MAX_REVIEWER or not name.isprintable():
        raise DecisionError(f"a reviewer's name is at most {MAX_REVIEWER} printable characters")
    return name


class Decider:
    """This server's claim folder in review/.digitwatch and the committer that
    places decided files and writes their lines."""

    def __init__(self, settings: Settings, corrections: Path | None) -> None:
        if settings.review is None:
            raise ValueError("review is not set")
        self.s = settings
        self.corrections = corrections
        self.instance = f"review@{socket.gethostname()}"
        self.ws = claims.Workspace(settings.review.resolve(), self.instance, settings.results)
        roots = {"processed": settings.processed, "failed": settings.failed}
        self.committer = commit.Committer(roots, ResultsFile(settings.results, settings.format), settings.results,
                                          settings.format)
        self._lock = threading.Lock()  # one decision at a time in this process; other servers race by rename
        self.counts = {"ok": 0, "corrected": 0, "unreadable": 0, "already": 0}

    def close(self) -> None:
        self.ws.close()
        self.committer.results.close()

    def recover(self) -> int:
        """Finish what dead review servers (this one's past too) left half done;
        a claim taken but not journaled goes back to the queue."""
        with self._lock:
            return recovery.recover_others(self.ws, self.committer, starting=True, stopping=lambda: False,
                                           on_done=lambda intent: None, adopt=self._give_back)

    def _give_back(self, claim: claims.Claim) -> None:
        try:
            with claims.parent_of(claim.folder.fd, claim.local) as (sfd, sleaf), \
                    claims.parent_of(self.ws.inbox_fd, claim.rel, create=True) as (dfd, dleaf):
                if _exists(dleaf, dfd):
                    return  # its place is taken: it stays claimed, and is tried again at the next start
                os.rename(sleaf, dleaf, src_dir_fd=sfd, dst_dir_fd=dfd)
            log.info("review_returned", file=claim.display)
        except OSError as exc:
            log.error("review_return_failed", file=claim.display, error=str(exc))

    def decide(self, item: Item, answer: str | None, reviewer: str) -> Decision:
        """Commit one decision: the human's digits, or None for unreadable."""
        with self._lock:
            claim = self.ws.reserve(os.fsdecode(item.rel))
            if not self.ws.take(claim):
                self.counts["already"] += 1
                return Decision("already")
            data = claims.read_claim(claim, DEFAULT_MAX_BYTES)
            sha = hashlib.sha256(data).hexdigest()
            result = self._result(item, answer, reviewer, sha)
            dest = "processed" if answer is not None else "failed"
            now = dt.datetime.now(dt.UTC)
            [intent] = self.committer.plan([(claim, result, dest)], now, self.instance)
            name = self.ws.folder.journal_name()
            self.committer.journal(self.ws.folder, name, [intent])
            out = self.committer.run(self.ws.folder, name, [intent], dedupe=False)
            if out.parked:
                # Journaled: the next start (or a retry of this one) finishes it.
                raise OSError(out.error or "the decision could not be committed yet; it will be finished")
            kind = "unreadable" if answer is None else ("ok" if answer == item.proposed else "corrected")
            self.counts[kind] += 1
            done = out.done[0].result if out.done else intent.result
            log.info("file_reviewed", file=item.name, sha256=sha, text=answer or "", unreadable=answer is None,
                     machine_text=item.proposed, machine_reason=item.machine.get("reason") or "",
                     reviewer=reviewer, kind=kind, moved_to=done.moved_to)
        self._keep_correction(item, data, sha, answer, reviewer, kind)
        return Decision("done", done.moved_to, done)

    def _result(self, item: Item, answer: str | None, reviewer: str, sha: str) -> Result:
        m = item.machine
        said = f"'{m.get('text') or ''}'" + (f" ({m['reason']})" if m.get("reason") else "")
        reason = f"{'unreadable' if answer is None else 'reviewed'} by {reviewer}; the machine read {said}"
        waited = time.time() - item.mtime
        return Result(
            file=item.name, digit=int(answer) if answer is not None and len(answer) == 1 else None,
            confidence=None, status=STATUS_REVIEWED, error="", sha256=sha,
            width=_int(m.get("width")), height=_int(m.get("height")), model=str(m.get("model") or ""),
            latency_ms=max(0.0, waited) * 1000.0, text=answer or "", reason=reason,
        )

    def _keep_correction(self, item: Item, data: bytes, sha: str, answer: str | None, reviewer: str,
                         kind: str) -> None:
        """What the model saw (its 28x28 inputs) with the person's answer, for
        `digitwatch train --corrections`. A failure here costs the example, not the decision."""
        if self.corrections is None:
            return
        try:
            prepared = prepare_bytes(item.name, data, time.perf_counter(), max_pixels=self.s.max_pixels)
            crops = prepared.candidates.crops if prepared.candidates is not None else np.zeros((0, 28, 28))
            self.corrections.mkdir(parents=True, exist_ok=True)
            # One card per decision, even for files with the same content (each was decided).
            stem = self.corrections / f"{sha[:32]}-{secrets.token_hex(4)}"
            np.save(stem.with_suffix(".npy"), np.asarray(crops, np.float32), allow_pickle=False)
            write_whole(stem.with_suffix(".json"), json.dumps({
                "sha256": sha, "label": answer, "unreadable": answer is None, "kind": kind,
                "machine": {k: item.machine.get(k) for k in ("text", "status", "reason", "confidence", "model")},
                "file": item.name, "reviewer": reviewer, "inputs": stem.with_suffix(".npy").name,
                "decided": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            }, indent=1) + "\n")
        except Exception as exc:  # noqa: BLE001 - the decision is committed; the example is extra
            log.error("correction_not_kept", file=item.name, error=str(exc))


def _int(value: object) -> int | None:
    try:
        return None if value in (None, "") else int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def _exists(name: bytes, dir_fd: int) -> bool:
    try:
        os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True
