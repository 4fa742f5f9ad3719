"""A file's path from disk to a Result: read, hash, cut into candidate digits
(`prepare_file` -> Prepared), then classify a batch at once and read each
file's digits (`classify_batch` -> Result). Shared by the `classify` command
(classify_cmd.py) and the daemon: both prepare in the worker processes of
workers.py / decoder.py (`classify` in its own process for a few files) and
classify in the calling process.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from digitwatch.confidence import Thresholds
from digitwatch.errors import ImageError, RefusedError
from digitwatch.imaging import DEFAULT_MAX_PIXELS, decode_gray
from digitwatch.model import Classifier
from digitwatch.reading import Candidates, Constraints, constraints_for, decide, read_scan, score
from digitwatch.results import STATUS_ERROR, Result

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_LOW_CONFIDENCE = 0.5


@dataclass(frozen=True)
class Prepared:
    """A file read and cut into candidate digits, or the reason it could not be."""

    name: str
    sha256: str
    started: float  # time.perf_counter() when work on the file began
    pixels: np.ndarray | None = None  # the candidates side by side, (SIDE, SIDE*K): what --debug-dir writes
    width: int | None = None
    height: int | None = None
    error: str = ""
    candidates: Candidates | None = None


def refuse_unless_regular(mode: int) -> None:
    """RefusedError naming what a non-regular file is (links are never followed)."""
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise RefusedError("is a directory, not a file")
    if stat.S_ISLNK(mode):
        raise RefusedError("refused: a symbolic link (never followed)")
    kind = "FIFO" if stat.S_ISFIFO(mode) else "device or socket"
    raise RefusedError(f"refused: a {kind}, not a regular file")


def read_file(path: Path, max_bytes: int, *, follow_links: bool = True) -> bytes:
    """Read a whole regular file, never blocking on a FIFO or device and refusing
    files over max_bytes before reading them. With follow_links=False (the
    daemon's inbox) a symbolic link is refused rather than followed."""
    flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow_links else os.O_NOFOLLOW)
    if not follow_links:
        # Look before opening: opening a device node can itself have effects.
        refuse_unless_regular(os.lstat(path).st_mode)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RefusedError("refused: a symbolic link (never followed)") from exc
        raise
    return read_regular(fd, max_bytes)


def read_regular(fd: int, max_bytes: int) -> bytes:
    """The whole content of the file open at `fd`, which is closed here: what
    `read_file`, a claim (`claims.read_claim`) and a worker given a descriptor
    all read with. Refuses anything but a regular file (by fstat: the name may
    have been swapped since it was looked at) and files over max_bytes before
    reading them."""
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        refuse_unless_regular(st.st_mode)
        if st.st_size > max_bytes:
            raise RefusedError(
                f"refused: file is {st.st_size / 1e6:.1f} MB, over the limit of {max_bytes / 1e6:.1f} MB"
            )
        # From the start: a descriptor handed to a worker shares its offset with
        # the loop's copy, and a worker that died part way left it mid-file.
        fh.seek(0)
        # Ask for the size fstat gave (+1 to see growth): read(max_bytes) would
        # allocate the whole limit up front, every file.
        data = fh.read(st.st_size + 1)
        if len(data) > st.st_size:  # still growing; take what is there, up to the limit
            data += fh.read(max_bytes + 1 - len(data))
        return data


def prepare_bytes(name: str, data: bytes, started: float, *, max_pixels: int, pairs: bool = True) -> Prepared:
    """Bytes -> Prepared; image problems become an error message, never an
    exception. `pairs`: cut pair pictures too (reading.read_scan)."""
    digest = hashlib.sha256(data).hexdigest()
    try:
        gray = decode_gray(data, max_pixels=max_pixels)
        cands = read_scan(gray, pairs=pairs)
    except ImageError as exc:
        return Prepared(name=name, sha256=digest, started=started, error=str(exc))
    return Prepared(
        name=name, sha256=digest, started=started, pixels=side_by_side(cands.crops),
        width=gray.shape[1], height=gray.shape[0], candidates=cands,
    )


def side_by_side(crops: np.ndarray) -> np.ndarray:
    """A scan's candidate digits in one image, (SIDE, SIDE*K): what --debug-dir writes."""
    return crops[0] if len(crops) == 1 else np.hstack(list(crops))


def prepare_file(
    path: Path, name: str, *, max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES, follow_links: bool = True, pairs: bool = True,
) -> Prepared:
    """Read and normalize one file. Refusals and OS errors (vanished,
    unreadable) become the record's error, never an exception."""
    started = time.perf_counter()
    try:
        data = read_file(path, max_bytes, follow_links=follow_links)
    except ImageError as exc:
        return Prepared(name=name, sha256="", started=started, error=str(exc))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        return Prepared(name=name, sha256="", started=started, error=f"cannot read: {reason}")
    return prepare_bytes(name, data, started, max_pixels=max_pixels, pairs=pairs)


def threshold_for(classifier: Classifier, low_confidence: float | None) -> Thresholds:
    """The threshold given (for every answer), else the ones the model card
    recommends (chosen with the card's calibration, tests/bench/fit_answers.py:
    one for one-digit answers, one for longer), else 0.5."""
    if low_confidence is not None:
        return Thresholds.of(low_confidence)
    spec = classifier.spec
    if spec.low_confidence is None:
        return Thresholds.of(DEFAULT_LOW_CONFIDENCE)
    single = spec.low_confidence if spec.low_confidence_single is None else spec.low_confidence_single
    return Thresholds(single, spec.low_confidence)


def classify_batch(
    classifier: Classifier, items: Sequence[Prepared], *, low_confidence: float | None,
    expect: str | None = None, length: str | None = None,
) -> list[Result]:
    """One model call for every candidate digit of every good item in the batch,
    then each file's reading; errors pass straight through. `expect` and
    `length` are the per-run constraints (see reading.constraints_for);
    `low_confidence` None is the model card's thresholds (see threshold_for)."""
    constraints: Constraints = constraints_for(expect, length)
    thresholds = threshold_for(classifier, low_confidence)
    good = [i for i, item in enumerate(items) if item.candidates is not None]
    # No model call for a batch of errors.
    scored = score(classifier, [items[i].candidates for i in good])  # type: ignore[misc]
    by_index = dict(zip(good, scored, strict=True))
    done = time.perf_counter()
    results = []
    for i, item in enumerate(items):
        latency = (done - item.started) * 1000.0
        if i in by_index:
            probs, pair_probs = by_index[i]
            r = decide(item.candidates, probs, pair_probs=pair_probs, constraints=constraints,  # type: ignore[arg-type]
                       threshold=thresholds, calibration=classifier.spec.answers)
            results.append(
                Result(
                    file=item.name, digit=r.digit, confidence=r.confidence, status=r.status,
                    error="", sha256=item.sha256, width=item.width, height=item.height,
                    model=classifier.model_id, latency_ms=latency, text=r.text, reason=r.reason,
                    digits=r.digits,
                )
            )
        else:
            results.append(
                Result(
                    file=item.name, digit=None, confidence=None, status=STATUS_ERROR,
                    error=item.error, sha256=item.sha256, width=None, height=None,
                    model=classifier.model_id, latency_ms=latency,
                )
            )
    return results
