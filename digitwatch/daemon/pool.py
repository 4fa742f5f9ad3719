"""Worker processes that read, hash, decode and normalize claimed files, so a
decoder that crashes, hangs or eats memory on a hostile PNG costs that one file
and a fresh worker, never the daemon; and so every core decodes (normalize is
many small numpy steps that hold the GIL: threads do not scale it).

The loop process claims and commits; it hands a claimed file (a path or an
open descriptor) to `submit` and collects `Outcome`s from `completed()`,
woken by `on_done`. One collector
thread in the loop process waits on the workers' pipes and exit sentinels,
hands out queued files, enforces the per-file time limit and replaces dead
workers. Each worker has at most `depth` files sent to it; it works through
them in order, so when it dies the oldest unanswered file is the one it was on:
that file fails with the reason, the others sent to it are handed to another
worker unharmed.

Workers are plain `python -c` subprocesses speaking pickled messages over a
socketpair (multiprocessing's Connection framing). Not multiprocessing's spawn
or forkserver: both re-import the loop process's __main__ (the CLI, or a test
runner) in every worker. A fresh worker costs ~0.2 s of CPU (importing numpy
and OpenCV, measured here); that is paid at start-up and after a crash only.
Every worker is started from the collector thread, which lives as long as the
pool: PR_SET_PDEATHSIG fires when the thread that started a process exits.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing.connection as mpc
import multiprocessing.reduction as reduction
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import structlog

from digitwatch.daemon.worker import EXIT_NO_MEMORY, OUT_OF_MEMORY, Limits, Task, prepare_claimed
from digitwatch.errors import DigitwatchError
from digitwatch.reader.prepare import Prepared
from digitwatch.reader.reading import Candidates
from digitwatch.results import Result

log = structlog.get_logger("digitwatch")

DEFAULT_DEPTH = 2  # files sent to a worker at once: the next is in its pipe while it works
START_TIMEOUT = 60.0  # each worker imports numpy and OpenCV first (~0.2 s idle, far more under load)
MAX_FAILED_STARTS = 3  # replacements dying before they are ready: stop replacing
# A worker on one file this long is stuck (a file takes 5-150 ms; a 40 Mpx page
# a few seconds): the files queued behind it go to other workers, and a spare
# worker is started so a stuck crew still reads (until the time limit kills it).
STUCK_AFTER = 0.5
HASH_CHUNK = 1 << 20

CANNOT_START = "decoder workers cannot start"


def worker_count() -> int:
    """The CPUs this process may run on (a cgroup or taskset may allow fewer than exist)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Outcome:
    """One file prepared by a worker, or the reason it could not be.
    `candidates` holds the scan cut into candidate digits (their 28x28 crops)."""

    token: Hashable
    name: str
    sha256: str = ""
    started: float = 0.0  # time.perf_counter() when work began (CLOCK_MONOTONIC: same in every process)
    candidates: Candidates | None = None
    width: int | None = None
    height: int | None = None
    error: str = ""
    worker_ms: float = 0.0  # wall time the worker spent on it
    result: Result | None = None  # read in the worker too (Limits.reading); None: prepared only

    def prepared(self) -> Prepared:
        """The record `classify_batch` takes."""
        return Prepared(name=self.name, sha256=self.sha256, started=self.started,
                        width=self.width, height=self.height, error=self.error, candidates=self.candidates)


# ------------------------------------------------------------------ in the loop process


@dataclass
class _Job:
    token: Hashable
    path: str | None
    name: str
    fd: int = -1  # a descriptor to hand over instead of a path; ours until the job is over
    seq: int = 0
    started: float = field(default_factory=time.perf_counter)  # submitted: a failed file's latency counts from here
    prepared: bool = False  # a reading worker said it is prepared: it waits only for the batch's model call

    def over(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class _Worker:
    """One worker process as the loop process sees it."""

    proc: subprocess.Popen
    conn: mpc.Connection
    sentinel: int  # a pidfd, readable once the process has exited; -1 where there is none
    pending: deque[_Job] = field(default_factory=deque)  # sent, unanswered, in order
    ready: bool = False
    since: float = 0.0  # monotonic: when the head of `pending` started (at the latest)
    killed_for: str = ""
    stuck: bool = False  # on one file past STUCK_AFTER: sent nothing more, retired when done
    abandoned: set[int] = field(default_factory=set)  # seqs handed to others: their answers are dropped

    @classmethod
    def start(cls, task: Task, limits: Limits) -> _Worker:
        ours, theirs = socket.socketpair()
        # The worker imports from where the loop process did (a checkout, a
        # venv), never another installed copy; one BLAS thread: it is one core.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p or os.getcwd() for p in sys.path),
               "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", "from digitwatch.daemon.worker import main; main()",
                 str(theirs.fileno()), str(os.getpid())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=env,
            )
        finally:
            theirs.close()
        conn = mpc.Connection(ours.detach())
        conn.send((task, limits))
        try:
            sentinel = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            sentinel = -1  # no pidfd: the socket's EOF says it died
        return cls(proc, conn, sentinel)

    def send(self, job: _Job) -> None:
        if not self.pending:
            self.since = time.monotonic()
        self.conn.send((job.seq, job.path, job.name))
        if job.fd >= 0:  # the worker gets its own copy; ours is kept in case it dies
            reduction.send_handle(self.conn, job.fd, self.proc.pid)
        self.pending.append(job)

    def release(self) -> None:
        self.conn.close()
        if self.sentinel >= 0:
            os.close(self.sentinel)
            self.sentinel = -1


def _death_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"decoder crashed (signal {-exitcode})"
    if exitcode == EXIT_NO_MEMORY:
        return OUT_OF_MEMORY
    return f"decoder exited with status {exitcode}"


def _sha256_of(job: _Job, max_bytes: int) -> str:
    """The file's sha256 for a line the worker never wrote (it timed out, crashed
    or ran out of memory): from our own descriptor (pread: its offset is the
    worker's too), else the path as given; "" when it cannot be read safely."""
    fd = job.fd
    opened = False
    try:
        if fd < 0:
            if job.path is None:
                return ""
            fd = os.open(job.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            opened = True
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes:
            return ""
        digest, offset = hashlib.sha256(), 0
        while chunk := os.pread(fd, HASH_CHUNK, offset):
            digest.update(chunk)
            offset += len(chunk)
        return digest.hexdigest()
    except OSError:
        return ""
    finally:
        if opened:
            os.close(fd)


class WorkerStartError(DigitwatchError):
    """The workers could not be started (they died or did not report ready)."""


class _Crew:
    """The worker processes themselves: started, told apart by what they hold,
    killed past the time limit, replaced when they die. No thread of its own:
    the pool calls it under the pool's lock."""

    def __init__(self, size: int, task: Task, limits: Limits) -> None:
        self.size = size
        self.task = task
        self.limits = limits
        self.workers: list[_Worker] = []
        self.failed_starts = 0  # replacements that died before they were ready, in a row
        self.replaced = 0

    def add(self) -> None:
        """One more worker (OSError if it cannot even be spawned)."""
        self.workers.append(_Worker.start(self.task, self.limits))

    def ready(self) -> int:
        return sum(w.ready for w in self.workers)

    def became_ready(self, w: _Worker) -> None:
        w.ready, w.since = True, time.monotonic()
        self.failed_starts = 0

    def free(self, depth: int) -> list[_Worker]:
        """Ready workers holding fewer than `depth` files, none of them stuck."""
        return [w for w in self.workers if w.ready and not w.stuck and len(w.pending) < depth]

    def find_stuck(self) -> list[tuple[_Worker, list[_Job]]]:
        """Workers on one file for STUCK_AFTER, newly: each with the files it
        holds behind that one, taken back (their late answers will be dropped)."""
        now = time.monotonic()
        out = []
        for w in self.workers:
            if w.pending and not w.stuck and not w.killed_for and now - w.since >= STUCK_AFTER:
                w.stuck = True
                current = next((j for j in w.pending if not j.prepared), w.pending[0])
                behind = [j for j in w.pending if j is not current]  # prepared ones too: their batch waits on it
                for job in behind:
                    job.prepared = False
                w.pending = deque([current])
                w.abandoned.update(j.seq for j in behind)
                out.append((w, behind))
        return out

    def waits(self) -> list:
        """What the collector waits on: every worker's pipe and exit sentinel."""
        out: list = []
        for w in self.workers:
            out.append(w.conn)
            if w.sentinel >= 0:
                out.append(w.sentinel)
        return out

    def next_deadline(self) -> float | None:
        """Seconds until the earliest file in a worker is stuck or reaches the time limit."""
        limit = self.limits.time_limit
        due = [w.since + (limit if w.stuck else min(STUCK_AFTER, limit))
               for w in self.workers if w.pending and not w.killed_for]
        if not due:
            return None
        return max(0.0, min(due) - time.monotonic())

    def enforce_time_limit(self) -> None:
        now = time.monotonic()
        for w in self.workers:
            if w.pending and not w.killed_for and now - w.since >= self.limits.time_limit:
                w.killed_for = f"decoding took longer than {self.limits.time_limit:g} s"
                w.ready = False
                w.proc.kill()

    def remove(self, w: _Worker) -> tuple[_Job | None, str]:
        """A dead worker out of the crew: the file it was on (the oldest sent)
        and why it died. The rest it held stay in `w.pending`."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            w.proc.wait(5)  # its socket closes a moment before it can be reaped
        reason = w.killed_for or _death_reason(w.proc.returncode)
        # The file it was on: the first it had not finished preparing.
        culprit = next((j for j in w.pending if not j.prepared), w.pending[0] if w.pending else None)
        if culprit is not None:
            w.pending.remove(culprit)
        for job in w.pending:
            job.prepared = False  # done again elsewhere, from the start
        self.workers.remove(w)
        w.release()
        self.replaced += 1
        if not w.ready:
            self.failed_starts += 1
        return culprit, reason

    def take_all(self) -> list[_Worker]:
        """Every worker, out of the crew (to be killed with `kill`)."""
        workers, self.workers = self.workers, []
        return workers

    @staticmethod
    def kill(workers: list[_Worker]) -> None:
        """Kill and reap these workers (their pending jobs are the caller's)."""
        for w in workers:
            with contextlib.suppress(OSError):
                w.proc.kill()
        for w in workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                w.proc.wait(10)
            w.release()


class WorkerPool:
    """Pre-started worker processes; `submit` never blocks, `completed` collects.
    This class is the queue of files and the collector thread; `_Crew` the
    processes."""

    def __init__(self, workers: int | None = None, *, limits: Limits | None = None,
                 on_done: Callable[[], None] | None = None, task: Task = prepare_claimed,
                 depth: int = DEFAULT_DEPTH) -> None:
        self.size = workers or worker_count()
        self.limits = limits or Limits()
        self.on_done = on_done
        self.depth = max(1, depth)
        self._crew = _Crew(self.size, task, self.limits)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a worker became ready, or the pool broke
        self._backlog: deque[_Job] = deque()
        self._done: deque[Outcome] = deque()
        self._seq = 0
        self._broken = ""
        self._closing = False
        self._sleeping = False  # the collector waits with no deadline: wake it on submit
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="workers", daemon=True)

    @property
    def replaced(self) -> int:
        """Workers that died and were replaced (or given up on) so far."""
        return self._crew.replaced

    # ---------------------------------------------------------- public

    def start(self, timeout: float = START_TIMEOUT) -> WorkerPool:
        """Start every worker and return once all are warm and ready."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        with self._changed:
            while not self._broken and self._crew.ready() < self.size:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._broken = f"workers did not start within {timeout:g} s"
                    break
                self._changed.wait(left)
            broken = self._broken
        if broken:
            self.close()
            raise WorkerStartError(broken)
        log.info("workers_started", workers=self.size, pids=self.pids(), time_limit_s=self.limits.time_limit,
                 memory_limit_mb=None if self.limits.memory_limit is None else self.limits.memory_limit >> 20)
        return self

    def submit(self, token: Hashable, source: str | os.PathLike | int, name: str) -> None:
        """Queue one claimed file, by path or as an open descriptor (the pool
        owns it from here and closes it when the file is done); its Outcome
        appears in `completed()`."""
        if isinstance(source, int):
            job = _Job(token, None, name, fd=source)
        else:
            job = _Job(token, os.fspath(source), name, fd=-1)
        with self._lock:
            refused = self._closing or bool(self._broken and not self._crew.workers)
            if refused:
                self._fail(job, CANNOT_START)
            else:
                self._backlog.append(job)
                self._dispatch()
            if self._sleeping:  # its wait has no deadline; this file may need one
                self._sleeping = False
                self._wake()
        if refused and self.on_done is not None:
            self.on_done()

    def completed(self) -> list[Outcome]:
        """Outcomes finished since the last call, oldest first."""
        out = []
        while self._done:
            out.append(self._done.popleft())
        return out

    def pids(self) -> list[int]:
        with self._lock:
            return [w.proc.pid for w in self._crew.workers]

    def busy(self) -> dict[int, list[Hashable]]:
        """Worker pid -> tokens sent to it and unanswered, the first being worked on."""
        with self._lock:
            return {w.proc.pid: [j.token for j in w.pending] for w in self._crew.workers}

    def in_flight(self) -> int:
        with self._lock:
            return len(self._backlog) + sum(len(w.pending) for w in self._crew.workers)

    def close(self) -> None:
        """Stop at once: kill the workers (they hold nothing but the files in
        flight, which stay claimed) and reap them. Safe to call twice."""
        with self._lock:
            self._closing = True
            self._wake()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(10)
        with self._lock:
            workers = self._crew.take_all()
            fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        _Crew.kill(workers)
        for w in workers:
            for job in w.pending:
                job.over()
        with self._lock:
            for job in self._backlog:
                job.over()
            self._backlog.clear()
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    def __enter__(self) -> WorkerPool:
        return self.start()

    def __exit__(self, *_exc) -> None:
        self.close()

    # ---------------------------------------------------------- the queue

    def _wake(self) -> None:
        """Interrupt the collector's wait. Holds the lock (the pipe is closed under it)."""
        with contextlib.suppress(BlockingIOError, OSError):
            if self._wake_w >= 0:
                os.write(self._wake_w, b"x")

    def _dispatch(self) -> None:
        """Hand queued files to ready workers, the least loaded first. Holds the lock."""
        while self._backlog:
            free = self._crew.free(self.depth)
            if not free:
                return
            w = min(free, key=lambda x: len(x.pending))
            job = self._backlog.popleft()
            self._seq += 1
            job.seq = self._seq
            try:
                w.send(job)
            except OSError:  # it died; the collector buries it and re-queues
                self._backlog.appendleft(job)
                w.ready = False

    def _fail(self, job: _Job, reason: str) -> None:
        # The line still names the file's content and the time it took.
        sha256 = _sha256_of(job, self.limits.max_bytes)
        job.over()
        self._done.append(Outcome(token=job.token, name=job.name, sha256=sha256, started=job.started, error=reason))

    # ---------------------------------------------------------- collector thread

    def _run(self) -> None:
        try:
            with self._lock:
                for _ in range(self.size):
                    self._crew.add()
        except OSError as exc:
            with self._changed:
                self._broken = f"cannot start a worker: {exc}"
                self._changed.notify_all()
            return
        while True:
            with self._lock:
                if self._closing:
                    return
                waits = [self._wake_r, *self._crew.waits()]
                timeout = self._crew.next_deadline()
                self._sleeping = timeout is None
            ready = set(mpc.wait(waits, timeout))
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
            with self._changed:
                if self._closing:
                    return
                finished = self._turn(ready)
            if self.on_done is not None:
                for _ in range(finished):
                    self.on_done()

    def _turn(self, ready: set) -> int:
        """One wake-up of the collector: results, deaths, time limits. Holds the lock."""
        finished = 0
        for w in list(self._crew.workers):
            if w.conn in ready:
                finished += self._receive(w)
            if w.sentinel in ready or w.proc.poll() is not None:
                finished += self._bury(w)
        self._crew.enforce_time_limit()
        self._unstick()
        self._dispatch()
        return finished

    def _unstick(self) -> None:
        """Files queued behind a stuck worker go back to the front of the queue,
        and a spare worker starts for each stuck one (at most `size` spares).
        A stuck worker that finishes its file retires if the crew is over size.
        Holds the lock."""
        for w, behind in self._crew.find_stuck():
            self._backlog.extendleft(reversed(behind))
            spare = len(self._crew.workers) < 2 * self.size
            log.warning("worker_stuck", pid=w.proc.pid, file=w.pending[0].name, handed_on=len(behind),
                        spare=spare)
            if spare:
                with contextlib.suppress(OSError):
                    self._crew.add()
        for w in [w for w in self._crew.workers if w.stuck and not w.pending]:
            if len(self._crew.workers) > self.size:
                self._crew.workers.remove(w)
                _Crew.kill([w])
            else:  # no spare took its place: back to work (late answers are still dropped)
                w.stuck = False

    def _receive(self, w: _Worker) -> int:
        """Take every message the worker has sent. Holds the lock."""
        n = 0
        while True:
            try:
                if not w.conn.poll():
                    return n
                msg = w.conn.recv()
            except (EOFError, OSError):
                return n  # it died: its exit status says how
            if msg[0] == "ready":
                self._crew.became_ready(w)
                self._changed.notify_all()
                continue
            if msg[0] == "prepared":  # the worker moves on to its next file: that one's clock starts
                job = next((j for j in w.pending if j.seq == msg[1]), None)
                if job is not None:
                    job.prepared = True
                    w.since = time.monotonic()
                continue
            seq, (sha256, started, candidates, width, height, error, worker_ms, result) = msg
            if seq in w.abandoned:  # handed to another worker when this one was stuck
                w.abandoned.discard(seq)
                continue
            job = w.pending.popleft()
            assert job.seq == seq, (job.seq, seq)
            job.over()
            w.since = time.monotonic()
            self._done.append(Outcome(token=job.token, name=job.name, sha256=sha256, started=started,
                                      candidates=candidates, width=width, height=height, error=error,
                                      worker_ms=worker_ms, result=result))
            n += 1

    def _bury(self, w: _Worker) -> int:
        """A worker died: fail the file it was on, re-queue the rest, replace it. Holds the lock."""
        n = self._receive(w)  # what it finished before dying still counts
        culprit, reason = self._crew.remove(w)
        if culprit is not None:
            self._fail(culprit, reason)
            n += 1
        self._backlog.extendleft(reversed(w.pending))
        log.warning("worker_replaced", pid=w.proc.pid, reason=reason, file=culprit.name if culprit else None,
                    requeued=len(w.pending))
        if self._crew.failed_starts >= MAX_FAILED_STARTS:
            return n + self._give_up(reason)
        if len(self._crew.workers) >= self.size:  # a spare took its place while it was stuck
            return n
        try:
            self._crew.add()
        except OSError as exc:
            return n + self._give_up(f"cannot start a worker: {exc}")
        return n

    def _give_up(self, reason: str) -> int:
        """Workers keep dying before they are ready: fail what waits rather than loop."""
        self._broken = reason
        self._changed.notify_all()
        log.error("workers_broken", reason=reason)
        if self._crew.workers:  # the ones still alive serve what was sent to them
            return 0
        n = len(self._backlog)
        for job in self._backlog:
            self._fail(job, CANNOT_START)
        self._backlog.clear()
        return n
