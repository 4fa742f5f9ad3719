"""From a file on disk to a Result: read, hash, normalize (in worker threads),
then classify a batch at once. Shared by `digitwatch classify` and the daemon.
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

from digitwatch.errors import ImageError, RefusedError
from digitwatch.imaging import DEFAULT_MAX_PIXELS, load_digit
from digitwatch.model import Classifier
from digitwatch.results import STATUS_ERROR, STATUS_LOW, STATUS_OK, Result

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_LOW_CONFIDENCE = 0.5


@dataclass(frozen=True)
class Prepared:
    """A file read and normalized, or the reason it could not be."""

    name: str
    sha256: str
    started: float  # time.perf_counter() when work on the file began
    pixels: np.ndarray | None = None
    width: int | None = None
    height: int | None = None
    error: str = ""


def _refuse_unless_regular(mode: int) -> None:
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
        _refuse_unless_regular(os.lstat(path).st_mode)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RefusedError("refused: a symbolic link (never followed)") from exc
        raise
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        _refuse_unless_regular(st.st_mode)
        if st.st_size > max_bytes:
            raise RefusedError(
                f"refused: file is {st.st_size / 1e6:.1f} MB, over the limit of {max_bytes / 1e6:.1f} MB"
            )
        # Ask for the size fstat gave (+1 to see growth): read(max_bytes) would
        # allocate the whole limit up front, every file.
        data = fh.read(st.st_size + 1)
        if len(data) > st.st_size:  # still growing; take what is there, up to the limit
            data += fh.read(max_bytes + 1 - len(data))
        return data


def prepare_bytes(name: str, data: bytes, started: float, *, max_pixels: int) -> Prepared:
    """Bytes -> Prepared; image problems become an error message, never an exception."""
    digest = hashlib.sha256(data).hexdigest()
    try:
        digit = load_digit(data, max_pixels=max_pixels)
    except ImageError as exc:
        return Prepared(name=name, sha256=digest, started=started, error=str(exc))
    return Prepared(
        name=name, sha256=digest, started=started, pixels=digit.pixels,
        width=digit.width, height=digit.height,
    )


def prepare_file(
    path: Path, name: str, *, max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES, follow_links: bool = True,
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
    return prepare_bytes(name, data, started, max_pixels=max_pixels)


def classify_batch(
    classifier: Classifier, items: Sequence[Prepared], *, low_confidence: float
) -> list[Result]:
    """One model call for every good item in the batch; errors pass straight through."""
    good = [i for i, item in enumerate(items) if item.pixels is not None]
    probs = (
        classifier.predict(np.stack([items[i].pixels for i in good]))
        if good else np.zeros((0, 10), np.float32)
    )
    by_index = dict(zip(good, probs, strict=True))
    done = time.perf_counter()
    results = []
    for i, item in enumerate(items):
        latency = (done - item.started) * 1000.0
        if i in by_index:
            p = by_index[i]
            digit = int(np.argmax(p))
            confidence = float(p[digit])
            status = STATUS_OK if confidence >= low_confidence else STATUS_LOW
            results.append(
                Result(
                    file=item.name, digit=digit, confidence=confidence, status=status,
                    error="", sha256=item.sha256, width=item.width, height=item.height,
                    model=classifier.model_id, latency_ms=latency,
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
