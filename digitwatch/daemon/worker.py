"""One worker process: reads, hashes, decodes and normalizes the files the
loop process sends it, one at a time, under a memory limit, and dies with the
loop process. The daemon's workers also read what they prepared (the model
calls and the decision, `Limits.reading`): the loop process only claims, hands
over and commits, so throughput grows with the workers. Started and replaced
by `digitwatch.daemon.pool.WorkerPool`; kept apart from it so a worker imports
only the pipeline (numpy, OpenCV, LiteRT), not the
loop's logging (structlog and what it pulls in: ~9 MB and 0.1 s per worker).
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
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from digitwatch.config import DEFAULT_MEMORY_LIMIT, DEFAULT_TIME_LIMIT
from digitwatch.errors import ImageError
from digitwatch.files import DEFAULT_MAX_BYTES, read_regular
from digitwatch.reader.imaging import DEFAULT_MAX_PIXELS, load_digit
from digitwatch.reader.model import Classifier, load_classifier
from digitwatch.reader.prepare import Prepared, classify_batch, prepare_bytes, prepare_file
from digitwatch.results import Result

EXIT_NO_MEMORY = 75  # a worker's exit status when it ran out of memory outside a file
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
OUT_OF_MEMORY = "decoder ran out of memory"


@dataclass(frozen=True)
class Reading:
    """How a worker reads a prepared file: the model (loaded once per worker)
    and the constraints and threshold of `classify_batch`."""

    model: str | None = None  # a path; None: the shipped default
    low_confidence: float | None = None  # None: the model card's thresholds
    expect: str = "number"
    length: str = ""


@dataclass(frozen=True)
class Limits:
    """What one worker may spend on one file, and (`reading`) whether it reads it too."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    time_limit: float = DEFAULT_TIME_LIMIT
    memory_limit: int | None = DEFAULT_MEMORY_LIMIT  # None: no RLIMIT_AS
    pairs: bool = True  # cut pair pictures: False when the model has no pair model to read them
    reading: Reading | None = None  # None: prepare only, the caller classifies


def prepare_claimed(source: str | int, name: str, limits: Limits) -> Prepared:
    """The work a worker does for one file: the daemon's own pipeline. `source`
    is a path (read without following links: the inbox is untrusted) or a
    descriptor the loop process opened for it."""
    if isinstance(source, str):
        return prepare_file(Path(source), name, max_pixels=limits.max_pixels, max_bytes=limits.max_bytes,
                            follow_links=False, pairs=limits.pairs)
    started = time.perf_counter()
    try:
        data = read_regular(source, limits.max_bytes)
    except ImageError as exc:
        return Prepared(name=name, sha256="", started=started, error=str(exc))
    except OSError as exc:
        return Prepared(name=name, sha256="", started=started, error=f"cannot read: {exc.strerror or exc}")
    return prepare_bytes(name, data, started, max_pixels=limits.max_pixels, pairs=limits.pairs)


def prepare_named(source: str | int, name: str, limits: Limits) -> Prepared:
    """The work for a file named on the command line (`digitwatch classify`):
    the path as the user gave it, links followed, exactly as in-process."""
    if isinstance(source, int):
        raise TypeError("classify names its files: a path, not a descriptor")
    return prepare_file(Path(source), name, max_pixels=limits.max_pixels, max_bytes=limits.max_bytes,
                        pairs=limits.pairs)


Task = Callable[[str | int, str, Limits], Prepared]


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


def _warm(reading: Reading | None) -> None:
    """Run the pipeline once on a drawn digit, so the first real file does not
    pay for first calls (OpenCV's lazy init, numpy's dispatch caches, the
    model's load and first invoke)."""
    page = np.full((96, 96), 255, np.uint8)
    cv2.putText(page, "7", (24, 78), cv2.FONT_HERSHEY_SIMPLEX, 2.4, 0, 6)
    ok, png = cv2.imencode(".png", page)
    if not ok:
        return
    if reading is None:
        load_digit(png.tobytes())
        return
    read_prepared(prepare_bytes("warm.png", png.tobytes(), time.perf_counter(), max_pixels=DEFAULT_MAX_PIXELS),
                  reading)


def _pack(prepared: Prepared, worker_ms: float, result: Result | None) -> tuple:
    # The candidates, not the side-by-side debug image: that is derived from
    # them; and not even those once the file is read here (the result says it all).
    candidates = None if result is not None else prepared.candidates
    return (prepared.sha256, prepared.started, candidates, prepared.width, prepared.height,
            prepared.error, worker_ms, result)


_CLASSIFIERS: dict[Reading, Classifier] = {}


def _classifier(reading: Reading) -> Classifier:
    """This worker's model, loaded on first use (at warm-up) and kept."""
    if reading not in _CLASSIFIERS:
        # One thread: the worker processes are the parallelism (two LiteRT
        # threads per worker only spin against each other on a busy machine).
        _CLASSIFIERS[reading] = load_classifier(Path(reading.model) if reading.model else None, threads=1)
    return _CLASSIFIERS[reading]


def read_prepared(prepared: Prepared, reading: Reading) -> Result:
    """One file's result, as the loop process would have made it."""
    [result] = read_batch([prepared], reading)
    return result


def read_batch(prepared: list[Prepared], reading: Reading) -> list[Result]:
    """The results of the files this worker holds, with one model call for all of them."""
    return classify_batch(_classifier(reading), prepared, low_confidence=reading.low_confidence,
                          expect=reading.expect, length=reading.length)


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
    _warm(limits.reading)
    if limits.memory_limit is not None:
        cap = _address_space() + limits.memory_limit
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    conn.send(("ready", os.getpid()))
    try:
        while True:
            jobs = _take_jobs(conn)
            if jobs is None:
                return
            if limits.reading is None:
                for seq, source, name in jobs:
                    conn.send((seq, _prepare_one(task, source, name, limits)[1]))
                continue
            # Reading too: every file this worker holds is prepared, then read
            # with one model call for all of them (per-file calls cost twice the
            # CPU). After each file is prepared the pool hears so, so a file that
            # hangs later is the one blamed, and the prepared ones can go elsewhere.
            done = []
            for seq, source, name in jobs:
                prepared, reply = _prepare_one(task, source, name, limits)
                done.append((seq, prepared, reply))
                conn.send(("prepared", seq))
            good = [(seq, prepared, reply[6]) for seq, prepared, reply in done if prepared is not None]
            try:
                started = time.perf_counter()
                results = read_batch([p for _, p, _ in good], limits.reading) if good else []
                share = (time.perf_counter() - started) * 1000 / max(1, len(good))
                replies = {seq: _pack(p, ms + share, r) for (seq, p, ms), r in zip(good, results, strict=True)}
            except Exception as exc:  # noqa: BLE001 - the model failing fails these files, not the worker
                replies = {seq: ("", p.started, None, None, None, _failure(exc), ms, None) for seq, p, ms in good}
            for seq, _prepared, reply in done:
                conn.send((seq, replies.get(seq, reply)))
    except MemoryError:
        os._exit(EXIT_NO_MEMORY)


def _take_jobs(conn: mpc.Connection) -> list[tuple[int, str | int, str]] | None:
    """The next job, waiting for it, and every other one already sent (the pool
    sends at most its depth); None at EOF."""
    jobs: list[tuple[int, str | int, str]] = []
    while not jobs or conn.poll(0):
        try:
            job = conn.recv()
        except EOFError:
            return jobs or None
        if job is None:
            return jobs or None
        seq, path, name = job
        jobs.append((seq, reduction.recv_handle(conn) if path is None else path, name))
    return jobs


def _prepare_one(task: Task, source: str | int, name: str, limits: Limits) -> tuple[Prepared | None, tuple]:
    """(prepared, the reply if nothing more is done with it); prepared None when the task failed."""
    started = time.perf_counter()
    try:
        prepared = task(source, name, limits)
    except Exception as exc:  # noqa: BLE001 - one bad file must not take the worker down
        return None, ("", started, None, None, None, _failure(exc), 0.0, None)
    return prepared, _pack(prepared, (time.perf_counter() - started) * 1000, None)
