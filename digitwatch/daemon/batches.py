"""From read files to reported results: files the workers have read (or
failed to) wait here; when a batch is due each result is routed (processed/,
review/ or failed/) and the batch handed to the commit Outbox in one journal,
and every committed result is reported (counters, metrics, the
`file_classified` line). A file a worker prepared but did not read (it
failed) is turned into its error line here, with no model call.
The watch loop (`daemon`) decides when to look; this module decides what a
batch is and what becomes of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import structlog

from digitwatch.config import Settings
from digitwatch.daemon import claims, commit
from digitwatch.daemon.metrics import Metrics
from digitwatch.reader.model import Classifier
from digitwatch.reader.prepare import Prepared, classify_batch
from digitwatch.results import STATUS_ERROR, STATUS_LOW, Result

log = structlog.get_logger("digitwatch")


@dataclass
class Counters:
    ok: int = 0
    low_confidence: int = 0
    error: int = 0
    batches: int = 0
    recovered: int = 0


class Batches:
    """The prepared files waiting for the model, and the reporting of results."""

    def __init__(self, settings: Settings, classifier: Classifier, committer: commit.Committer,
                 instance: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.s = settings
        self.clock = clock
        self.classifier = classifier
        self.done: list[tuple[claims.Claim, Prepared, Result | None]] = []
        self.oldest_done = 0.0  # monotonic: when the oldest file in `done` arrived
        self.counters = Counters()
        self.outbox = commit.Outbox(committer, instance, on_done=self.count, clock=clock)
        self.metrics = Metrics(0, "", model_id="", instance="")  # the daemon's own, once it runs

    def add(self, claim: claims.Claim, prepared: Prepared, result: Result | None = None) -> None:
        """A file back from the workers: its result when a worker read it."""
        if not self.done:
            self.oldest_done = self.clock()
        self.done.append((claim, prepared, result))

    def wait_left(self) -> float:
        """Seconds until the batch in hand must go even if no more files come."""
        age_ms = (self.clock() - self.oldest_done) * 1000
        return max(0.0, (self.s.batch_wait_ms - age_ms) / 1000)

    def held_up(self) -> bool:
        """Too many files waiting on a broken destination: stop claiming more
        (they are safer in the inbox). Below the cap, other files go on."""
        return self.outbox.blocked() >= 2 * self.s.batch_size

    def due(self, *, more_coming: bool) -> bool:
        """A full batch, one that waited batch_wait_ms, or nothing else is
        coming soon (`more_coming`: files in workers or ready to claim)."""
        if not self.done or self.held_up():
            return False
        if len(self.done) >= self.s.batch_size:
            return True
        if (self.clock() - self.oldest_done) * 1000 >= self.s.batch_wait_ms:
            return True
        return not more_coming

    def commit_next(self) -> int:
        """Hand the oldest batch_size files to the Outbox, grouped by claim
        folder: the workers' results, and one classify_batch call for any the
        workers only prepared. Returns how many."""
        batch, self.done = self.done[: self.s.batch_size], self.done[self.s.batch_size :]
        self.oldest_done = self.clock()
        self.counters.batches += 1
        unread = [p for _, p, r in batch if r is None]
        computed = iter(classify_batch(self.classifier, unread, low_confidence=self.s.review_threshold,
                                       expect=self.s.expect, length=self.s.length) if unread else [])
        now = time.perf_counter()
        # A worker's result measured its own work; the line's latency runs to
        # now, as when the loop process classified (from the start of work).
        results = [next(computed) if r is None else replace(r, latency_ms=(now - p.started) * 1000.0)
                   for _, p, r in batch]
        items = [(c, r, self.destination(r)) for (c, _, _), r in zip(batch, results, strict=True)]
        by_folder: dict[claims.Folder, list] = {}  # one folder, unless the inbox was recreated
        for item in items:
            by_folder.setdefault(item[0].folder, []).append(item)
        for folder, its in by_folder.items():
            self.outbox.commit(folder, its)
        self.metrics.batch_done(len(items))
        return len(items)

    def destination(self, result: Result) -> str:
        if result.status == STATUS_ERROR:
            return "failed"
        if result.status == STATUS_LOW and self.s.review is not None:
            return "review"
        return "processed"

    def count(self, r: Result) -> None:
        """A result is committed (line synced, file moved): count it and say so."""
        self.metrics.file_done(r.status, r.latency_ms)
        fields = dict(file=r.file, digit=r.digit, confidence=r.confidence, status=r.status,
                      sha256=r.sha256, width=r.width, height=r.height,
                      latency_ms=round(r.latency_ms, 2), moved_to=r.moved_to)
        if r.status == STATUS_ERROR:
            self.counters.error += 1
            log.warning("file_failed", error=r.error, **fields)
        else:
            if r.status == STATUS_LOW:
                self.counters.low_confidence += 1
            else:
                self.counters.ok += 1
            log.info("file_classified", **fields)
