"""The watch loop: a file appears, is claimed, decoded and normalized in a worker
process (`workers`), classified in a batch, its result line written and synced,
and the file put away. Trusted state and claiming live in `claims`, what is
ready to claim in `inbox` (Intake), handing claims to the worker processes in
`handover`, the waiting batch, its model call and the reporting of results in
`batches`, the commit protocol and its retries with back-off in `commit`
(Outbox), finishing dead instances' work in `recovery`; this module is the
order of events, start-up and stop, and signals.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import signal
import threading
import time
from collections.abc import Callable

import structlog
from watchdog.observers.api import BaseObserver

from digitwatch import logs
from digitwatch.config import Settings
from digitwatch.daemon import claims, commit, inbox, recovery, runtime, systemd
from digitwatch.daemon.batches import Batches
from digitwatch.daemon.dispatch import Handover
from digitwatch.daemon.metrics import Metrics
from digitwatch.daemon.results_file import ResultsFile
from digitwatch.daemon.worker import Limits, Reading
from digitwatch.reader.model import Classifier

log = structlog.get_logger("digitwatch")

SETTLE_CHECK_SECONDS = 0.2


class _Flag:
    """A flag a signal handler may set: a plain attribute, no lock to deadlock on
    (threading.Event.set takes a lock the interrupted loop may hold)."""

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


class WakeQueue(queue.Queue):
    """The loop's event queue, with a self-pipe: every put (and every signal)
    writes a byte, and the loop sleeps in select() on the pipe, so a signal
    wakes it as surely as an event does."""

    def __init__(self) -> None:
        super().__init__()
        self.rfd, self.wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poll = select.poll()
        self._poll.register(self.rfd, select.POLLIN)

    def put(self, item, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self.poke()

    def poke(self) -> None:
        with contextlib.suppress(BlockingIOError):  # full: a wake-up is already pending
            os.write(self.wfd, b"\0")

    def sleep(self, timeout: float) -> None:
        """Until something is put, a signal arrives, or `timeout` passes."""
        if timeout > 0 and self.empty():
            self._poll.poll(timeout * 1000)
        with contextlib.suppress(BlockingIOError):
            while os.read(self.rfd, 4096):
                pass


class Daemon:
    """One instance of `digitwatch watch`."""

    def __init__(self, settings: Settings, classifier: Classifier, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.s = settings
        self.clock = clock  # monotonic seconds: the loop's schedule, the batch wait, retries
        self.classifier = classifier
        self.instance = settings.instance_name()
        self.inbox = settings.inbox.resolve()
        self.events = WakeQueue()
        self.intake = inbox.Intake(self.inbox, recursive=settings.recursive, patterns=settings.patterns,
                                   settle_seconds=settings.settle_seconds)
        self.stopping = _Flag()
        self._hups = self._hups_seen = 0  # a counter: a HUP during a clear is never lost
        self.results = ResultsFile(settings.results, settings.format)
        roots = {"processed": settings.processed, "failed": settings.failed}
        if settings.review is not None:
            roots["review"] = settings.review
        self.committer = commit.Committer(roots, self.results, settings.results, settings.format)
        self.batches = Batches(settings, classifier, self.committer, self.instance, clock=clock)
        self.outbox = self.batches.outbox
        self.counters = self.batches.counters
        self.handover = Handover(self.batches, lambda: self.events.put((None, False)),
                                 batch_size=settings.batch_size)
        self.in_flight = self.handover.in_flight  # token -> claim, in a worker process
        self.workspace: claims.Workspace | None = None
        self._retired: list[claims.Workspace] = []
        self.observer: BaseObserver | None = None
        self.inbox_missing = False
        self.metrics = Metrics(0, "", model_id="", instance="")  # replaced in run()
        self.status = systemd.StatusNotifier()

    # ------------------------------------------------------------ lifecycle

    def run(self, *, once: bool = False) -> int:
        runtime.tune_loop_process()
        self.metrics = Metrics(self.s.metrics_port, self.s.metrics_bind,
                               model_id=self.classifier.model_id, instance=self.instance)
        self.batches.metrics = self.metrics
        self.workspace = claims.Workspace(self.inbox, self.instance, self.s.results)
        # Worker processes read, hash, decode, normalize and read the digits (the
        # model calls and the decision); warm, model loaded, before READY.
        reading = Reading(model=str(self.s.model) if self.s.model else None, low_confidence=self.s.review_threshold,
                          expect=self.s.expect, length=self.s.length)
        limits = Limits(max_pixels=self.s.max_pixels, time_limit=self.s.worker_timeout_s,
                        memory_limit=self.s.worker_memory_mb << 20, pairs=self.classifier.pairs is not None,
                        reading=reading)
        self.handover.start(self.s.workers or None, limits)
        try:
            self._install_signals()
            try:  # created now, CSV header included, so `tail -f` works from the start
                self.results.open()
            except OSError as exc:  # each commit retries it and reports commit_failed
                log.error("results_unavailable", path=str(self.s.results), error=str(exc))
            self._recover(starting=True)
            if not once:
                self._watch()
            self._rescan()
            log.info("daemon_started", instance=self.instance, model=self.classifier.model_id,
                     once=once, pid=os.getpid(), settings=self.s.as_dict())
            runtime.freeze_startup_objects()
            self.status.ready(f"watching {self.inbox}", self._status())
            self._loop(once=once)
        finally:
            if threading.current_thread() is threading.main_thread():
                # Stopping: a late HUP has nothing to reopen, and must not kill
                # the process once the interpreter resets its handlers on exit.
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
            systemd.notify("STOPPING=1")
            if self.observer is not None:
                self.observer.stop()
            self._drain_on_stop()
            self.handover.close()
            for ws in (*self._retired, self.workspace):
                ws.close()
            self.results.close()
            # The self-pipe stays open until the process ends: a signal landing
            # after a close would write into whatever file reused its number.
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
        assert self.workspace is not None, "run() made it"
        if self.inbox_missing or not self.workspace.alive():
            self.inbox_missing = False
            # Claims in hand still name the old folder: keep it open until we stop.
            self._retired.append(self.workspace)
            self.workspace = claims.Workspace(self.inbox, self.instance, self.s.results)
            if watching:
                self._watch()
            log.warning("inbox_reappeared", inbox=str(self.inbox))
            self._rescan()
        return True

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)

    # Handlers set a flag and poke the self-pipe; nothing else (no locks, no I/O
    # but one non-blocking write), so a storm of signals costs nothing and a
    # signal landing anywhere in the loop cannot deadlock it.
    def _on_stop(self, *_: object) -> None:
        self.stopping.set()
        self.events.poke()

    def _on_hup(self, *_: object) -> None:
        self._hups += 1
        self.events.poke()

    def _loop(self, *, once: bool) -> None:
        next_rescan = self.clock() + self.s.rescan_seconds
        next_settle = 0.0
        inbox_ok = True
        watchdog = systemd.Watchdog()
        while not self.stopping.is_set():
            now = self.clock()
            self.status.update(self._status())
            watchdog.ping(status=self.status.shown)
            if self._hups != self._hups_seen:
                self._hups_seen = self._hups
                try:
                    self.results.reopen()
                except OSError as exc:  # each commit retries it and reports commit_failed
                    log.error("results_unavailable", path=str(self.s.results), error=str(exc))
                else:
                    log.info("results_reopened", path=str(self.s.results))
            self.outbox.retry_due(now)
            self._take_events(timeout=self._wait_time())
            if now >= next_settle:
                next_settle = now + SETTLE_CHECK_SECONDS
                inbox_ok = self._check_inbox(watching=not once)
                if once and not inbox_ok:
                    return
                self.intake.check_settling()
            if now >= next_rescan and inbox_ok:
                next_rescan = now + self.s.rescan_seconds
                self._rescan()
                self._recover()
            if not self.batches.held_up() and inbox_ok:
                self._claim_ready()
            self.handover.collect()
            if self.batches.due(more_coming=bool(self.in_flight or self.intake.ready)):
                self._commit_done()
            if once and self._idle():
                return

    def _wait_time(self) -> float:
        """How long the loop may sleep. Workers wake it early through the event
        queue when a file is prepared, so it never spins on futures."""
        if self.intake.ready and not self.batches.held_up() and self._has_capacity():
            return 0.0
        if self.batches.done:
            return self.batches.wait_left()
        if self.in_flight:
            return 0.1
        if self.intake.settler.waiting():
            return SETTLE_CHECK_SECONDS
        return 0.25

    def _queued(self) -> int:
        return len(self.intake.ready) + len(self.in_flight) + len(self.batches.done)

    def _has_capacity(self) -> bool:
        return len(self.in_flight) + len(self.batches.done) < 2 * self.s.batch_size

    def _idle(self) -> bool:
        return not (self.intake.ready or self.in_flight or self.batches.done or self.outbox.parked
                    or self.intake.settler.waiting() or not self.events.empty())

    def _status(self) -> str:
        c = self.counters
        return systemd.status_text(
            ok=c.ok, low_confidence=c.low_confidence, error=c.error, in_flight=len(self.in_flight),
            waiting=len(self.intake.ready), blocked=self.outbox.blocked(),
            blocked_reason=self.outbox.parked[-1].error if self.outbox.parked else "")

    # ------------------------------------------------------------ intake

    def _take_events(self, timeout: float) -> None:
        if timeout > 0:
            logs.flush()  # about to sleep: let the events so far out
        self.events.sleep(timeout)
        self.intake.take_events(self.events)

    def _rescan(self) -> None:
        """Backlog at start and a periodic sweep: inotify drops events on overflow."""
        backlog = self.intake.rescan()
        self.metrics.depth(self._queued(), backlog)
        # One line per sweep (every rescan_seconds): `found` above 0 in a quiet
        # inbox means events were missed, and tests wait on it instead of sleeping.
        log.info("inbox_rescanned", found=backlog)

    def _claim_ready(self) -> None:
        while self.intake.ready and self._has_capacity():
            rel = self.intake.pop()
            if rel is not None:
                workspace = self._workspace()
                self.handover.submit(workspace, workspace.reserve(rel))

    # ------------------------------------------------------------ commit

    def _commit_done(self) -> None:
        started = time.perf_counter()
        size = self.batches.commit_next()
        self.metrics.depth(self._queued())
        log.info("batch_classified", size=size, ms=round((time.perf_counter() - started) * 1000, 2),
                 queued=len(self.intake.ready) + len(self.in_flight))

    # ------------------------------------------------------------ recovery and stop

    def _recover(self, *, starting: bool = False) -> None:
        """Finish what dead instances (this one's past included) left half done.
        Runs at start and on every rescan: another instance may have died."""
        workspace = self._workspace()
        self.counters.recovered += recovery.recover_others(
            workspace, self.committer, starting=starting, stopping=self.stopping.is_set,
            on_done=lambda intent: self.batches.count(intent.result),
            adopt=lambda claim: self.handover.submit(workspace, claim, take=False))

    def _workspace(self) -> claims.Workspace:
        """This instance's claim folder: made in run(), remade when the inbox is."""
        assert self.workspace is not None, "run() makes it before any claim"
        return self.workspace

    def _drain_on_stop(self) -> None:
        """Finish the batch in hand within stop_timeout; whatever remains is recovered later."""
        deadline = self.clock() + self.s.stop_timeout
        self.intake.ready.clear()
        while (self.in_flight or self.batches.done or self.outbox.parked) and self.clock() < deadline:
            if self.outbox.parked and not (self.in_flight or self.batches.done):
                self.outbox.retry_due(self.clock())
                time.sleep(0.05)
                continue
            self.handover.collect()
            if self.batches.done and not self.in_flight or len(self.batches.done) >= self.s.batch_size:
                self._commit_done()
            else:
                time.sleep(0.002)
