"""Worker processes that read, hash, decode and normalize claimed files, so a
decoder that crashes, hangs or eats memory on a hostile PNG costs that one file
and a fresh worker, never the daemon; and so every core decodes (normalize is
many small numpy steps that hold the GIL: threads do not scale it).

The loop process claims and commits; it hands a claimed path to `submit` and
collects `Outcome`s from `completed()`, woken by `on_done`. One collector
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
import ctypes
import ctypes.util
import multiprocessing.connection as mpc
import multiprocessing.reduction as reduction
import os
import resource
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import structlog

from digitwatch.classify import DEFAULT_MAX_BYTES, Prepared, prepare_bytes, prepare_file
from digitwatch.errors import DigitwatchError, ImageError, RefusedError
from digitwatch.imaging import DEFAULT_MAX_PIXELS, load_digit

log = structlog.get_logger("digitwatch")

DEFAULT_TIME_LIMIT = 10.0  # seconds one file may take in a worker
# Address space a worker may map beyond what it has when warm. A 40 Mpx RGB16
# page (the pixel limit) decodes to 240 MB and its gray copies to ~400 MB more.
DEFAULT_MEMORY_LIMIT = 2 * 1024**3
DEFAULT_DEPTH = 2  # files sent to a worker at once: the next is in its pipe while it works
START_TIMEOUT = 60.0  # each worker imports numpy and OpenCV first (~0.2 s idle, far more under load)
MAX_FAILED_STARTS = 3  # replacements dying before they are ready: stop replacing
EXIT_NO_MEMORY = 75  # a worker's exit status when it ran out of memory outside a file
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

OUT_OF_MEMORY = "decoder ran out of memory"
CANNOT_START = "decoder workers cannot start"


def worker_count() -> int:
    """The CPUs this process may run on (a cgroup or taskset may allow fewer than exist)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Limits:
    """What one worker may spend on one file."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    time_limit: float = DEFAULT_TIME_LIMIT
    memory_limit: int | None = DEFAULT_MEMORY_LIMIT  # None: no RLIMIT_AS


@dataclass(frozen=True)
class Outcome:
    """One file prepared by a worker, or the reason it could not be. `crops` is
    (k, 28, 28) float32: one crop per digit found (one today)."""

    token: Hashable
    name: str
    sha256: str = ""
    started: float = 0.0  # time.perf_counter() when work began (CLOCK_MONOTONIC: same in every process)
    crops: np.ndarray | None = None
    width: int | None = None
    height: int | None = None
    error: str = ""
    worker_ms: float = 0.0  # wall time the worker spent on it

    def prepared(self) -> Prepared:
        """The single-digit record `classify_batch` takes."""
        pixels = None if self.crops is None or not len(self.crops) else self.crops[0]
        return Prepared(name=self.name, sha256=self.sha256, started=self.started, pixels=pixels,
                        width=self.width, height=self.height, error=self.error)


def read_open(fd: int, max_bytes: int) -> bytes:
    """The bytes of a file the loop process opened (without following links) and
    handed over; closes it. Only regular files, and none over max_bytes."""
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise RefusedError("refused: not a regular file")
        if st.st_size > max_bytes:
            raise RefusedError(
                f"refused: file is {st.st_size / 1e6:.1f} MB, over the limit of {max_bytes / 1e6:.1f} MB")
        # The offset is shared with the loop's copy: a worker that died part
        # way through this file left it wherever it stopped.
        fh.seek(0)
        data = fh.read(st.st_size + 1)
        if len(data) > st.st_size:  # still growing; take what is there, up to the limit
            data += fh.read(max_bytes + 1 - len(data))
        return data


def prepare_claimed(source: str | int, name: str, limits: Limits) -> Prepared:
    """The work a worker does for one file: the daemon's own pipeline. `source`
    is a path (read without following links: the inbox is untrusted) or a
    descriptor the loop process opened for it."""
    if isinstance(source, str):
        return prepare_file(Path(source), name, max_pixels=limits.max_pixels, max_bytes=limits.max_bytes,
                            follow_links=False)
    started = time.perf_counter()
    try:
        data = read_open(source, limits.max_bytes)
    except ImageError as exc:
        return Prepared(name=name, sha256="", started=started, error=str(exc))
    except OSError as exc:
        return Prepared(name=name, sha256="", started=started, error=f"cannot read: {exc.strerror or exc}")
    return prepare_bytes(name, data, started, max_pixels=limits.max_pixels)


Task = Callable[[str | int, str, Limits], Prepared]


# ------------------------------------------------------------------ in the worker


def _die_with_parent(parent: int) -> None:
    """SIGKILL this worker when the loop process dies, even by SIGKILL (a socket
    at EOF stops a worker too, but only once it is between files)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(0)


def _address_space() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def _warm() -> None:
    """Run the pipeline once on a drawn digit, so the first real file does not
    pay for first calls (OpenCV's lazy init, numpy's dispatch caches)."""
    page = np.full((96, 96), 255, np.uint8)
    cv2.putText(page, "7", (24, 78), cv2.FONT_HERSHEY_SIMPLEX, 2.4, 0, 6)
    ok, png = cv2.imencode(".png", page)
    if ok:
        load_digit(png.tobytes())


def _pack(prepared: Prepared, worker_ms: float) -> tuple:
    crops = None if prepared.pixels is None else np.ascontiguousarray(prepared.pixels, np.float32)[None]
    return (prepared.sha256, prepared.started, crops, prepared.width, prepared.height,
            prepared.error, worker_ms)


def main() -> None:
    """A worker process: `python -c '...main()' <socket fd> <parent pid>`."""
    _die_with_parent(int(sys.argv[2]))
    conn = mpc.Connection(int(sys.argv[1]))
    try:
        task, limits = conn.recv()
    except EOFError:
        return
    _serve(conn, task, limits)


def _failure(exc: Exception) -> str:
    """The one-line reason for an exception the pipeline did not turn into an
    ImageError: running out of the address space the worker may map is the
    expected one (numpy raises MemoryError, OpenCV its StsNoMem error)."""
    if isinstance(exc, MemoryError) or (isinstance(exc, cv2.error) and exc.code == cv2.Error.StsNoMem):
        return OUT_OF_MEMORY
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"decoder failed: {type(exc).__name__}: {first}"[:300]


def _serve(conn: mpc.Connection, task: Task, limits: Limits) -> None:
    """A worker's life: warm up, say ready, then one file at a time until EOF."""
    cv2.setNumThreads(1)  # the workers are the parallelism
    _warm()
    if limits.memory_limit is not None:
        cap = _address_space() + limits.memory_limit
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    conn.send(("ready", os.getpid()))
    try:
        while True:
            try:
                job = conn.recv()
            except EOFError:
                return
            if job is None:
                return
            seq, path, name = job
            source = reduction.recv_handle(conn) if path is None else path
            started = time.perf_counter()
            try:
                prepared = task(source, name, limits)
                reply = _pack(prepared, (time.perf_counter() - started) * 1000)
            except Exception as exc:  # noqa: BLE001 - one bad file must not take the worker down
                reply = ("", started, None, None, None, _failure(exc), 0.0)
            conn.send((seq, reply))
    except MemoryError:
        os._exit(EXIT_NO_MEMORY)


# ------------------------------------------------------------------ in the loop process


@dataclass
class _Job:
    token: Hashable
    path: str | None
    name: str
    fd: int = -1  # a descriptor to hand over instead of a path; ours until the job is over
    seq: int = 0

    def over(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class _Worker:
    proc: subprocess.Popen
    conn: mpc.Connection
    sentinel: int  # a pidfd, readable once the process has exited; -1 where there is none
    pending: deque[_Job] = field(default_factory=deque)  # sent, unanswered, in order
    ready: bool = False
    since: float = 0.0  # monotonic: when the head of `pending` started (at the latest)
    killed_for: str = ""


def _death_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"decoder crashed (signal {-exitcode})"
    if exitcode == EXIT_NO_MEMORY:
        return OUT_OF_MEMORY
    return f"decoder exited with status {exitcode}"


class WorkerStartError(DigitwatchError):
    """The workers could not be started (they died or did not report ready)."""


class WorkerPool:
    """Pre-started worker processes; `submit` never blocks, `completed` collects."""

    def __init__(self, workers: int | None = None, *, limits: Limits | None = None,
                 on_done: Callable[[], None] | None = None, task: Task = prepare_claimed,
                 depth: int = DEFAULT_DEPTH) -> None:
        self.size = workers or worker_count()
        self.limits = limits or Limits()
        self.on_done = on_done
        self.task = task
        self.depth = max(1, depth)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a worker became ready, or the pool broke
        self._workers: list[_Worker] = []
        self._backlog: deque[_Job] = deque()
        self._done: deque[Outcome] = deque()
        self._seq = 0
        self._failed_starts = 0
        self._broken = ""
        self._closing = False
        self._sleeping = False  # the collector waits with no deadline: wake it on submit
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="workers", daemon=True)
        self.replaced = 0

    # ---------------------------------------------------------- public

    def start(self, timeout: float = START_TIMEOUT) -> WorkerPool:
        """Start every worker and return once all are warm and ready."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        with self._changed:
            while not self._broken and sum(w.ready for w in self._workers) < self.size:
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
        fd = source if isinstance(source, int) else -1
        job = _Job(token, None if fd >= 0 else os.fspath(source), name, fd=fd)
        with self._lock:
            refused = self._closing or bool(self._broken and not self._workers)
            if refused:
                self._fail(job, CANNOT_START)
            else:
                self._backlog.append(job)
                self._dispatch()
            wake, self._sleeping = self._sleeping, False
        if wake:
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
            return [w.proc.pid for w in self._workers]

    def busy(self) -> dict[int, list[Hashable]]:
        """Worker pid -> tokens sent to it and unanswered, the first being worked on."""
        with self._lock:
            return {w.proc.pid: [j.token for j in w.pending] for w in self._workers}

    def in_flight(self) -> int:
        with self._lock:
            return len(self._backlog) + sum(len(w.pending) for w in self._workers)

    def close(self) -> None:
        """Stop at once: kill the workers (they hold nothing but the files in
        flight, which stay claimed) and reap them. Safe to call twice."""
        with self._lock:
            self._closing = True
        self._wake()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(10)
        with self._lock:
            workers, self._workers = self._workers, []
            fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for w in workers:
            with contextlib.suppress(OSError):
                w.proc.kill()
        for w in workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                w.proc.wait(10)
            self._release(w)
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

    # ---------------------------------------------------------- workers

    def _spawn(self) -> _Worker:
        """Start one worker process. Called on the collector thread only."""
        ours, theirs = socket.socketpair()
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", "from digitwatch.workers import main; main()",
                 str(theirs.fileno()), str(os.getpid())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=env,
            )
        finally:
            theirs.close()
        conn = mpc.Connection(ours.detach())
        conn.send((self.task, self.limits))
        try:
            sentinel = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            sentinel = -1  # no pidfd: the socket's EOF says it died
        return _Worker(proc, conn, sentinel)

    @staticmethod
    def _release(w: _Worker) -> None:
        w.conn.close()
        if w.sentinel >= 0:
            os.close(w.sentinel)
            w.sentinel = -1

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            if self._wake_w >= 0:
                os.write(self._wake_w, b"x")

    def _dispatch(self) -> None:
        """Hand queued files to ready workers, the least loaded first. Holds the lock."""
        while self._backlog:
            free = [w for w in self._workers if w.ready and len(w.pending) < self.depth]
            if not free:
                return
            w = min(free, key=lambda x: len(x.pending))
            job = self._backlog.popleft()
            self._seq += 1
            job.seq = self._seq
            if not w.pending:
                w.since = time.monotonic()
            try:
                w.conn.send((job.seq, job.path, job.name))
                if job.fd >= 0:  # the worker gets its own copy; ours is kept in case it dies
                    reduction.send_handle(w.conn, job.fd, w.proc.pid)
            except OSError:  # it died; the collector buries it and re-queues
                self._backlog.appendleft(job)
                w.ready = False
                continue
            w.pending.append(job)

    def _fail(self, job: _Job, reason: str) -> None:
        job.over()
        self._done.append(Outcome(token=job.token, name=job.name, started=time.perf_counter(), error=reason))

    # ---------------------------------------------------------- collector thread

    def _run(self) -> None:
        try:
            with self._lock:
                for _ in range(self.size):
                    self._workers.append(self._spawn())
        except OSError as exc:
            with self._changed:
                self._broken = f"cannot start a worker: {exc}"
                self._changed.notify_all()
            return
        while True:
            with self._lock:
                if self._closing:
                    return
                waits = [self._wake_r]
                for w in self._workers:
                    waits.append(w.conn)
                    if w.sentinel >= 0:
                        waits.append(w.sentinel)
                timeout = self._next_deadline()
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
        for w in list(self._workers):
            if w.conn in ready:
                finished += self._receive(w)
            if w.sentinel in ready or w.proc.poll() is not None:
                finished += self._bury(w)
        self._enforce_time_limit()
        self._dispatch()
        return finished

    def _next_deadline(self) -> float | None:
        heads = [w.since for w in self._workers if w.pending and not w.killed_for]
        if not heads:
            return None
        return max(0.0, min(heads) + self.limits.time_limit - time.monotonic())

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
                w.ready, w.since = True, time.monotonic()
                self._failed_starts = 0
                self._changed.notify_all()
                continue
            seq, (sha256, started, crops, width, height, error, worker_ms) = msg
            job = w.pending.popleft()
            assert job.seq == seq, (job.seq, seq)
            job.over()
            w.since = time.monotonic()
            self._done.append(Outcome(token=job.token, name=job.name, sha256=sha256, started=started,
                                      crops=crops, width=width, height=height, error=error,
                                      worker_ms=worker_ms))
            n += 1

    def _bury(self, w: _Worker) -> int:
        """A worker died: fail the file it was on, re-queue the rest, replace it. Holds the lock."""
        n = self._receive(w)  # what it finished before dying still counts
        with contextlib.suppress(subprocess.TimeoutExpired):
            w.proc.wait(5)  # its socket closes a moment before it can be reaped
        reason = w.killed_for or _death_reason(w.proc.returncode)
        culprit = w.pending.popleft() if w.pending else None
        if culprit is not None:
            self._fail(culprit, reason)
            n += 1
        self._backlog.extendleft(reversed(w.pending))
        self._workers.remove(w)
        self._release(w)
        self.replaced += 1
        log.warning("worker_replaced", pid=w.proc.pid, reason=reason, file=culprit.name if culprit else None,
                    requeued=len(w.pending))
        if not w.ready:
            self._failed_starts += 1
        if self._failed_starts >= MAX_FAILED_STARTS:
            return n + self._give_up(reason)
        try:
            self._workers.append(self._spawn())
        except OSError as exc:
            return n + self._give_up(f"cannot start a worker: {exc}")
        return n

    def _give_up(self, reason: str) -> int:
        """Workers keep dying before they are ready: fail what waits rather than loop."""
        self._broken = reason
        self._changed.notify_all()
        log.error("workers_broken", reason=reason)
        if self._workers:  # the ones still alive serve what was sent to them
            return 0
        n = len(self._backlog)
        for job in self._backlog:
            self._fail(job, CANNOT_START)
        self._backlog.clear()
        return n

    def _enforce_time_limit(self) -> None:
        now = time.monotonic()
        for w in self._workers:
            if w.pending and not w.killed_for and now - w.since >= self.limits.time_limit:
                w.killed_for = f"decoding took longer than {self.limits.time_limit:g} s"
                w.ready = False
                w.proc.kill()
