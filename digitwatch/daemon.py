"""The watch loop: a file appears, is claimed, decoded and normalized in a worker
thread, classified in a batch, its result line written and synced, and the
file put away. Crash safety lives in `claims`; this module is the order of
events, batching, back-off and signals.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime as dt
import gc
import json
import os
import queue
import signal
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import structlog

from digitwatch import claims, inbox, logs, systemd
from digitwatch.classify import Prepared, classify_batch, prepare_file
from digitwatch.config import Settings
from digitwatch.metrics import Metrics
from digitwatch.model import Classifier
from digitwatch.results import STATUS_ERROR, STATUS_LOW, Result, ResultsFile, display_name, render

log = structlog.get_logger("digitwatch")

MAX_BACKOFF = 30.0
M_ARENA_MAX = -8  # glibc <malloc.h>
SETTLE_CHECK_SECONDS = 0.2


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas before any thread starts.

    Each thread that allocates may get its own arena (up to 8 per core), and
    the decoder's megabyte buffers, freed in one arena and needed in another,
    left RSS creeping up in ~2 MB steps over a 100,000-file soak (163 -> 173
    MB). With 2 arenas a 100,000-file soak plateaued at 114-119 MB from the
    6,000th file on. Same as MALLOC_ARENA_MAX=2, but it also holds under
    `make run` and any other launcher. No-op off glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def prepare_claim(claim: claims.Claim, source: Path | None, *, max_pixels: int) -> Prepared | None:
    """Take the file (unless `source` is None: already ours) and prepare it in a
    worker, keeping the rename off the loop's thread. None: it vanished or
    another instance took it. A claimed file is read without following links:
    the inbox is untrusted."""
    if source is not None and not claims.Workspace.take(claim, source):
        return None
    return prepare_file(claim.path, display_name(claim.rel), max_pixels=max_pixels, follow_links=False)


@dataclass
class _Batch:
    """A batch whose commit failed part way; retried with back-off."""

    entries: list[claims.Entry]
    journal: Path | None = None
    attempts: int = 0
    retry_at: float = 0.0


@dataclass
class Counters:
    ok: int = 0
    low_confidence: int = 0
    error: int = 0
    batches: int = 0
    recovered: int = 0


class Daemon:
    """One instance of `digitwatch watch`."""

    def __init__(self, settings: Settings, classifier: Classifier) -> None:
        self.s = settings
        self.classifier = classifier
        self.instance = settings.instance_name()
        self.inbox = settings.inbox.resolve()
        self.events: queue.Queue = queue.Queue()
        self.settler = inbox.Settler(settings.settle_seconds)
        self.ready: dict[Path, None] = {}  # insertion-ordered set
        self.in_flight: deque[tuple[claims.Claim, Future]] = deque()
        self.done: list[tuple[claims.Claim, Prepared]] = []
        self.oldest_done = 0.0
        self.blocked: _Batch | None = None
        self.stopping = threading.Event()
        self.hup = threading.Event()
        self.counters = Counters()
        self.results = ResultsFile(settings.results, settings.format)
        self.workspace: claims.Workspace | None = None
        self.pool: ThreadPoolExecutor | None = None
        self.observer = None
        self.inbox_missing = False
        self.metrics = Metrics(0, "", model_id="", instance="")  # replaced in run()
        self._wake_lock = threading.Lock()
        self._submitted = self._finished = self._unwoken = 0

    # ------------------------------------------------------------ lifecycle

    def run(self, *, once: bool = False) -> int:
        limit_malloc_arenas()
        # The workers are the parallelism: OpenCV's own thread pool on top of
        # them only adds contention (measured: 2000 files 7.0 -> 6.0 s).
        cv2.setNumThreads(1)
        self.metrics = Metrics(self.s.metrics_port, self.s.metrics_bind,
                               model_id=self.classifier.model_id, instance=self.instance)
        self.workspace = claims.Workspace(self.inbox, self.instance)
        self.pool = ThreadPoolExecutor(max_workers=self.s.workers, thread_name_prefix="prepare")
        try:
            self._install_signals()
            self._recover()
            if not once:
                self._watch()
            self._rescan()
            log.info("daemon_started", instance=self.instance, model=self.classifier.model_id,
                     once=once, pid=os.getpid(), settings=self.s.as_dict())
            # Start-up objects (modules, the model) live as long as the process:
            # keep them out of the collector's full passes, which otherwise
            # walk them again and again (~5% of the CPU in a burst, profiled).
            gc.freeze()
            systemd.notify("READY=1", f"STATUS=watching {self.inbox}")
            self._loop(once=once)
        finally:
            systemd.notify("STOPPING=1")
            if self.observer is not None:
                self.observer.stop()
            self._drain_on_stop()
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.workspace.close()
            self.results.close()
            self.metrics.close()
            c = self.counters
            log.info("daemon_stopped", ok=c.ok, low_confidence=c.low_confidence, error=c.error,
                     batches=c.batches, recovered=c.recovered)
            logs.flush()
        return 0

    def _watch(self) -> None:
        if self.observer is not None:
            with contextlib.suppress(Exception):
                self.observer.stop()
        self.observer = inbox.start_observer(
            self.inbox, recursive=self.s.recursive, polling=self.s.polling,
            poll_interval=self.s.poll_interval, out=self.events,
        )

    def _check_inbox(self, *, watching: bool) -> bool:
        """The inbox may be removed and recreated under us (an admin, a remount):
        its watch and our claim folder went with it, so start both again."""
        if not self.inbox.is_dir():
            if not self.inbox_missing:
                self.inbox_missing = True
                log.error("inbox_missing", inbox=str(self.inbox))
            return False
        if self.inbox_missing or not self.workspace.dir.is_dir():
            self.inbox_missing = False
            self.workspace.close()
            self.workspace = claims.Workspace(self.inbox, self.instance)
            if watching:
                self._watch()
            log.warning("inbox_reappeared", inbox=str(self.inbox))
            self._rescan()
        return True

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, lambda *_: self.stopping.set())
        signal.signal(signal.SIGINT, lambda *_: self.stopping.set())
        signal.signal(signal.SIGHUP, lambda *_: self.hup.set())

    def _loop(self, *, once: bool) -> None:
        next_rescan = time.monotonic() + self.s.rescan_seconds
        next_settle = 0.0
        inbox_ok = True
        watchdog = systemd.Watchdog()
        while not self.stopping.is_set():
            now = time.monotonic()
            watchdog.ping(status=self._status())
            if self.hup.is_set():
                self.hup.clear()
                self.results.reopen()
                log.info("results_reopened", path=str(self.s.results))
            if self.blocked is not None and now >= self.blocked.retry_at:
                self._retry_blocked()
            self._take_events(timeout=self._wait_time())
            if now >= next_settle:
                next_settle = now + SETTLE_CHECK_SECONDS
                inbox_ok = self._check_inbox(watching=not once)
                if once and not inbox_ok:
                    return
                self._check_settling()
            if now >= next_rescan and inbox_ok:
                next_rescan = now + self.s.rescan_seconds
                self._rescan()
                self._recover()
            if self.blocked is None and inbox_ok:
                self._claim_ready()
            self._collect()
            if self._batch_due():
                self._commit_done()
            if once and self._idle():
                return

    def _wait_time(self) -> float:
        """How long the loop may sleep. Workers wake it early through the event
        queue when a file is prepared, so it never spins on futures."""
        if self.ready and self.blocked is None and self._has_capacity():
            return 0.0
        if self.done:
            age_ms = (time.monotonic() - self.oldest_done) * 1000
            return max(0.0, (self.s.batch_wait_ms - age_ms) / 1000)
        if self.in_flight:
            return 0.1
        if self.settler.waiting():
            return SETTLE_CHECK_SECONDS
        return 0.25

    def _queued(self) -> int:
        return len(self.ready) + len(self.in_flight) + len(self.done)

    def _has_capacity(self) -> bool:
        return len(self.in_flight) + len(self.done) < 2 * self.s.batch_size

    def _idle(self) -> bool:
        return not (self.ready or self.in_flight or self.done or self.blocked
                    or self.settler.waiting() or not self.events.empty())

    def _status(self) -> str:
        c = self.counters
        return (f"ok={c.ok} low_confidence={c.low_confidence} error={c.error} "
                f"in_flight={len(self.in_flight)} waiting={len(self.ready)}")

    # ------------------------------------------------------------ intake

    def _accept(self, path: Path) -> bool:
        rel = inbox.relative_name(path, self.inbox)
        if rel is None or (not self.s.recursive and "/" in rel):
            return False
        return inbox.ignored_reason(path.name, self.s.patterns) is None

    def _take_events(self, timeout: float) -> None:
        if timeout > 0:
            logs.flush()  # about to sleep: let the events so far out
        try:
            path, settled = self.events.get(timeout=timeout) if timeout > 0 else self.events.get_nowait()
        except queue.Empty:
            return
        while True:
            if path is None:  # a worker finished a file: just a wake-up
                pass
            elif self._accept(path := Path(os.path.abspath(path))):
                if settled:
                    self.settler.forget(path)
                    self.ready[path] = None
                elif self.settler.ready(path):
                    self.ready[path] = None
            try:
                path, settled = self.events.get_nowait()
            except queue.Empty:
                return

    def _check_settling(self) -> None:
        for path in self.settler.waiting():
            verdict = self.settler.ready(path)
            if verdict:
                self.ready[path] = None

    def _rescan(self) -> None:
        """Backlog at start and a periodic sweep: inotify drops events on overflow."""
        backlog = 0
        for path in inbox.list_inbox(self.inbox, self.s.recursive):
            if self._accept(path):
                backlog += 1
                if path not in self.ready and self.settler.ready(path):
                    self.ready[path] = None
        self.metrics.depth(self._queued(), backlog)

    def _claim_ready(self) -> None:
        while self.ready and self._has_capacity():
            path = next(iter(self.ready))
            del self.ready[path]
            rel = inbox.relative_name(path, self.inbox)
            if rel is None:
                continue
            self._submit(self.workspace.reserve(rel), path)

    def _submit(self, claim: claims.Claim, source: Path | None = None) -> None:
        with self._wake_lock:
            self._submitted += 1
        future = self.pool.submit(prepare_claim, claim, source, max_pixels=self.s.max_pixels)
        future.add_done_callback(self._prepared)
        self.in_flight.append((claim, future))

    def _prepared(self, _future: Future) -> None:
        """Runs in the worker. Wake the loop when the pool has nothing else in
        hand (a lone file is never kept waiting) or half a batch is ready; waking
        it for every file in a burst cost a loop turn and a GIL hand-off each."""
        with self._wake_lock:
            self._finished += 1
            self._unwoken += 1
            if self._finished < self._submitted and self._unwoken < max(1, self.s.batch_size // 2):
                return
            self._unwoken = 0
        self.events.put((None, False))

    def _collect(self) -> None:
        still = deque()
        for claim, future in self.in_flight:
            if not future.done():
                still.append((claim, future))
                continue
            try:
                prepared = future.result()
            except OSError as exc:  # the claim itself failed; the file stays in the inbox
                log.warning("claim_failed", file=display_name(claim.rel), error=str(exc))
                continue
            if prepared is None:  # gone, or another instance has it
                continue
            if not self.done:
                self.oldest_done = time.monotonic()
            self.done.append((claim, prepared))
        self.in_flight = still

    def _batch_due(self) -> bool:
        if not self.done or self.blocked is not None:
            return False
        if len(self.done) >= self.s.batch_size:
            return True
        if (time.monotonic() - self.oldest_done) * 1000 >= self.s.batch_wait_ms:
            return True
        # Nothing else is coming soon: do not make the batch in hand wait.
        return not self.in_flight and not self.ready

    # ------------------------------------------------------------ commit

    def _commit_done(self) -> None:
        batch, self.done = self.done[: self.s.batch_size], self.done[self.s.batch_size :]
        self.oldest_done = time.monotonic()
        self.counters.batches += 1
        started = time.perf_counter()
        results = classify_batch(self.classifier, [p for _, p in batch],
                                 low_confidence=self.s.review_threshold,
                                 expect=self.s.expect, length=self.s.length)
        entries = [claims.Entry(c, r) for (c, _), r in zip(batch, results, strict=True)]
        pending = _Batch(entries)
        self._try_commit(pending)
        self.metrics.batch_done(len(entries))
        self.metrics.depth(self._queued())
        log.info("batch_classified", size=len(entries), ms=round((time.perf_counter() - started) * 1000, 2),
                 queued=len(self.ready) + len(self.in_flight))

    def _destination(self, result: Result, day: str) -> Path:
        if result.status == STATUS_ERROR:
            root = self.s.failed
        elif result.status == STATUS_LOW and self.s.review is not None:
            root = self.s.review
        else:
            root = self.s.processed
        return root / day

    def _try_commit(self, batch: _Batch) -> None:
        try:
            if batch.journal is None:
                # Open the results file first: if it cannot be written, the
                # files stay claimed and nothing is placed yet.
                self.results.open()
                self._place(batch)
            self._report(batch)
        except OSError as exc:
            batch.attempts += 1
            delay = min(MAX_BACKOFF, 0.5 * 2 ** (batch.attempts - 1))
            batch.retry_at = time.monotonic() + delay
            self.blocked = batch
            log.error("commit_failed", error=str(exc), files=len(batch.entries), retry_in_s=delay,
                      attempt=batch.attempts)
            return
        self.blocked = None

    def _retry_blocked(self) -> None:
        batch, self.blocked = self.blocked, None
        self._try_commit(batch)

    def _place(self, batch: _Batch) -> None:
        """Link each file to its destination and journal the batch; undone on failure."""
        now = utc_now()
        day = now.strftime("%Y-%m-%d")
        ts = now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        placed: list[claims.Entry] = []
        made: set[Path] = set()  # destination folders created in this batch
        try:
            for entry in batch.entries:
                name = os.path.basename(entry.claim.rel)
                folder = self._destination(entry.result, day)
                if folder not in made:
                    folder.mkdir(parents=True, exist_ok=True)
                    made.add(folder)
                try:
                    target = claims.place(entry.claim.path, folder, name)
                except FileNotFoundError:
                    if os.path.lexists(entry.claim.path):
                        raise
                    # Deleted under us (the inbox was removed with our claims in
                    # it): nothing left to place or report.
                    log.error("claim_vanished", file=entry.result.file)
                    continue
                result = replace(entry.result, ts=ts, moved_to=display_name(str(target)),
                                 instance=self.instance)
                placed.append(claims.Entry(entry.claim, result))
                if result.status == STATUS_ERROR:
                    sidecar = target.with_name(target.name + ".error.json")
                    claims.write_atomic(sidecar, json.dumps(result.as_dict(),
                                                            ensure_ascii=False, indent=2).encode())
            journal = self.workspace.journal_path()
            claims.write_journal(journal, placed)
        except OSError:
            for entry in placed:
                with contextlib.suppress(OSError):
                    os.unlink(entry.result.moved_to)
                    os.unlink(entry.result.moved_to + ".error.json")
            raise
        batch.entries, batch.journal = placed, journal

    def _report(self, batch: _Batch, *, recovering: bool = False) -> None:
        lines = [render(e.result, self.s.format) for e in batch.entries]
        if recovering:
            lines = [line for line in lines if not self.results.contains(line)]
        if lines:
            self.results.append(lines)
        for folder in {Path(e.result.moved_to).parent for e in batch.entries}:
            with contextlib.suppress(OSError):
                claims.fsync_dir(folder)
        for entry in batch.entries:
            self.workspace.release(entry.claim)
            self._count(entry.result)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(batch.journal)

    def _count(self, r: Result) -> None:
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

    # ------------------------------------------------------------ recovery and stop

    def _recover(self) -> None:
        """Finish what dead instances (this one's past included) left half done.
        Runs at start and on every rescan: another instance may have died."""
        self._finish_journals(self.workspace.adopt_dead())

    def _finish_journals(self, journals: list[Path]) -> None:
        journaled: set[str] = set()
        for journal in journals:
            entries = claims.read_journal(journal)
            journaled |= {e.claim.token for e in entries}
            batch = _Batch(entries, journal=journal)
            for e in entries:
                # The link may not have survived a power cut; the claim has.
                if e.claim.path.exists() and not os.path.lexists(e.result.moved_to):
                    os.link(e.claim.path, e.result.moved_to, follow_symlinks=False)
            try:
                self._report(batch, recovering=True)
                self.counters.recovered += len(entries)
            except OSError as exc:
                batch.retry_at = time.monotonic() + 1.0
                self.blocked = batch
                log.error("recovery_report_failed", error=str(exc), journal=str(journal))
                return
        in_hand = {c.token for c, _ in self.in_flight} | {c.token for c, _ in self.done}
        if self.blocked is not None:
            in_hand |= {e.claim.token for e in self.blocked.entries}
        leftovers = self.workspace.leftover_claims(journaled | in_hand)
        for claim in leftovers:
            self._drop_orphan_link(claim)
            self._submit(claim)
            self.counters.recovered += 1
        if journals or leftovers:
            log.info("recovered", journals=len(journals), claims=len(leftovers))

    def _drop_orphan_link(self, claim: claims.Claim) -> None:
        """A crash between linking and journaling leaves a second name; remove it."""
        today = utc_now()
        days = [(today - dt.timedelta(days=d)).strftime("%Y-%m-%d") for d in (0, 1)]
        roots = [r for r in (self.s.processed, self.s.failed, self.s.review) if r is not None]
        with contextlib.suppress(OSError):
            link = claims.find_link(claim.path, [root / d for root in roots for d in days])
            if link is not None:
                os.unlink(link)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(link.with_name(link.name + ".error.json"))

    def _drain_on_stop(self) -> None:
        """Finish the batch in hand within stop_timeout; whatever remains is recovered later."""
        deadline = time.monotonic() + self.s.stop_timeout
        self.ready.clear()
        while (self.in_flight or self.done or self.blocked) and time.monotonic() < deadline:
            if self.blocked is not None:
                if time.monotonic() >= self.blocked.retry_at:
                    self._retry_blocked()
                else:
                    time.sleep(0.05)
                continue
            self._collect()
            if self.done and not self.in_flight or len(self.done) >= self.s.batch_size:
                self._commit_done()
            else:
                time.sleep(0.002)
