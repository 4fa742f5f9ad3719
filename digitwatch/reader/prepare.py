"""A file's path from disk to a Result: read, hash, cut into candidate digits
(`prepare_file` -> Prepared), then classify a batch at once and read each
file's digits (`classify_batch` -> Result). Shared by the `classify` command
(classify_cmd.py) and the daemon: both prepare in the worker processes of
workers.py / decoder.py (`classify` in its own process for a few files) and
classify in the calling process.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from digitwatch.errors import ImageError
from digitwatch.files import DEFAULT_MAX_BYTES, read_file
from digitwatch.reader.confidence import Thresholds
from digitwatch.reader.imaging import DEFAULT_MAX_PIXELS, decode_gray
from digitwatch.reader.model import Classifier
from digitwatch.reader.reading import Candidates, Constraints, constraints_for, decide, read_scan, score
from digitwatch.results import STATUS_ERROR, Result

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
