"""Claimed files on their way through the worker processes: the loop takes a
claim, opens it without following links and hands the descriptor to the
`WorkerPool`; the pool's collector thread says when results are worth
collecting, and `collect` moves them into the waiting batch (`batches`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

from digitwatch.daemon import claims
from digitwatch.daemon.batches import Batches
from digitwatch.daemon.pool import DEFAULT_DEPTH, Limits, WorkerPool
from digitwatch.errors import ImageError
from digitwatch.reader.prepare import Prepared

log = structlog.get_logger("digitwatch")

READING_DEPTH = 4  # files sent to a reading worker at once: its model call takes all it holds


class Handover:
    """The files in worker processes, by claim token, and the pool they are in."""

    def __init__(self, batches: Batches, wake: Callable[[], None], *, batch_size: int) -> None:
        self.batches = batches
        self.wake = wake  # wakes the loop; called from the pool's collector thread
        self.batch_size = batch_size
        self.in_flight: dict[bytes, claims.Claim] = {}  # token -> claim, in a worker process
        self.pool: WorkerPool | None = None
        self._lock = threading.Lock()
        self._submitted = self._finished = self._unwoken = 0

    def start(self, workers: int | None, limits: Limits) -> None:
        """Start the worker processes; returns once every one is warm."""
        # Reading workers batch what they hold into one model call: let them hold more.
        depth = READING_DEPTH if limits.reading is not None else DEFAULT_DEPTH
        self.pool = WorkerPool(workers, limits=limits, on_done=self._prepared, depth=depth).start()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

    def __len__(self) -> int:
        return len(self.in_flight)

    def submit(self, workspace: claims.Workspace, claim: claims.Claim, take: bool = True) -> None:
        """Take the file (unless already ours) and hand a worker process a
        descriptor for it, opened without following links: the inbox is untrusted."""
        try:
            if take and not workspace.take(claim):
                return  # gone, or another instance has it
        except OSError as exc:  # the claim itself failed; the file stays in the inbox
            log.warning("claim_failed", file=claim.display, error=str(exc))
            return
        try:
            fd = claims.open_claim(claim)
        except (ImageError, OSError) as exc:  # ours now: an error line
            error = str(exc) if isinstance(exc, ImageError) else f"cannot read: {exc.strerror or exc}"
            self.batches.add(claim, Prepared(claim.display, "", time.perf_counter(), error=error))
            return
        with self._lock:
            self._submitted += 1
        self.in_flight[claim.token] = claim
        assert self.pool is not None, "start() first"
        self.pool.submit(claim.token, fd, claim.display)

    def _prepared(self) -> None:
        """Runs in the pool's collector thread. Wake the loop when the pool has
        nothing else in hand (a lone file is never kept waiting) or half a batch
        is ready; waking it for every file in a burst cost a loop turn and a GIL
        hand-off each."""
        with self._lock:
            self._finished += 1
            self._unwoken += 1
            if self._finished < self._submitted and self._unwoken < max(1, self.batch_size // 2):
                return
            self._unwoken = 0
        self.wake()

    def collect(self) -> None:
        """What the workers finished, into the waiting batch."""
        assert self.pool is not None, "start() first"
        for outcome in self.pool.completed():
            claim = self.in_flight.pop(outcome.token)  # type: ignore[call-overload]
            self.batches.add(claim, outcome.prepared(), outcome.result)
