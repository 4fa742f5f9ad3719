"""`digitwatch classify`: expand paths, prepare files (in this process for a
few, in the daemon's worker processes for more: one per CPU, since normalizing
holds the GIL), classify in batches, stream the records out in input order."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Generator, Hashable, Iterator
from pathlib import Path
from typing import TextIO

import cv2
import numpy as np

from digitwatch.config import DEFAULT_PATTERNS
from digitwatch.daemon import inbox
from digitwatch.files import DEFAULT_MAX_BYTES
from digitwatch.reader.model import Classifier, load_classifier
from digitwatch.reader.prepare import Prepared, classify_batch, prepare_file, side_by_side
from digitwatch.results import (
    CLASSIFY_COLUMNS,
    CLASSIFY_JSON,
    STATUS_ERROR,
    Result,
    csv_header,
    csv_line,
    display_name,
    json_line,
    table,
)

BATCH = 64
# Fewer files than this are prepared in this process: starting the workers
# (importing numpy and OpenCV in each, ~0.2 s of CPU) costs more than it saves.
MIN_FILES_FOR_WORKERS = 16
WINDOW = 4 * BATCH  # files handed to the workers ahead of the next record out


def expand(paths: list[Path], *, recursive: bool) -> Iterator[tuple[Path, str | None]]:
    """Files named directly are taken whatever they are; from folders, what the
    daemon would take from an inbox (inbox.ignored_reason with the default
    patterns; hidden folders such as an inbox's .digitwatch are not entered).
    Yields (path, error) where error names a path that cannot be used."""
    for path in paths:
        if path.is_dir():
            walker = path.rglob("*") if recursive else path.iterdir()
            for child in sorted(walker):
                if (child.is_file() and inbox.relative_name(child, path) is not None
                        and inbox.ignored_reason(child.name, DEFAULT_PATTERNS) is None):
                    yield child, None
        elif path.exists():
            yield path, None
        else:
            yield path, "no such file or directory"


Item = tuple[Path, str | None]


def _refused(name: str, error: str) -> Prepared:
    return Prepared(name=name, sha256="", started=time.perf_counter(), error=error)


def prepare_here(items: list[Item], *, max_pixels: int, pairs: bool = True) -> Generator[Prepared, None, None]:
    """Each file in this process, in order."""
    for path, error in items:
        name = display_name(str(path))  # \xNN for bytes that are not UTF-8, as the daemon writes them
        yield _refused(name, error) if error is not None else prepare_file(path, name, max_pixels=max_pixels,
                                                                              pairs=pairs)


def prepare_in_workers(items: list[Item], *, max_pixels: int, workers: int | None,
                       pairs: bool = True) -> Generator[Prepared, None, None]:
    """Each file in the daemon's worker processes, yielded in order. At most
    WINDOW files are handed out ahead of the one awaited, so memory stays
    flat whatever the count. A decoder that crashes or hangs costs one file."""
    from digitwatch.daemon.pool import WorkerPool
    from digitwatch.daemon.worker import Limits, prepare_named

    finished = threading.Semaphore(0)  # one release per outcome, from the pool's collector thread
    limits = Limits(max_pixels=max_pixels, max_bytes=DEFAULT_MAX_BYTES, pairs=pairs)
    with WorkerPool(workers, limits=limits, on_done=finished.release, task=prepare_named) as pool:
        ready: dict[Hashable, Prepared] = {}
        sent = 0
        for i in range(len(items)):
            while sent < min(len(items), i + WINDOW):
                path, error = items[sent]
                name = display_name(str(path))
                if error is not None:
                    ready[sent] = _refused(name, error)
                else:
                    pool.submit(sent, str(path), name)
                sent += 1
            while i not in ready:
                finished.acquire()
                for outcome in pool.completed():
                    ready[outcome.token] = outcome.prepared()
            yield ready.pop(i)


def classify_paths(
    paths: list[Path], *, out: TextIO, fmt: str, model: Path | None, debug_dir: Path | None,
    low_confidence: float | None, recursive: bool, max_pixels: int,
    expect: str | None = None, length: str | None = None, workers: int | None = None,
) -> int:
    """Classify everything under `paths`; returns how many files failed.
    `workers`: worker processes for many files (None: one per CPU)."""
    classifier = load_classifier(model)
    if debug_dir is not None:
        debug_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        out.write(csv_header(CLASSIFY_COLUMNS))
    items = list(expand(paths, recursive=recursive))
    if len(items) < MIN_FILES_FOR_WORKERS:
        prepared_all = prepare_here(items, max_pixels=max_pixels, pairs=classifier.pairs is not None)
    else:
        from digitwatch import logs

        # stdout is records: the pool's few events (a worker gave up) go to
        # stderr; a file a worker lost already has its one error line.
        logs.configure("auto", level=logging.ERROR, stream=sys.stderr)
        prepared_all = prepare_in_workers(items, max_pixels=max_pixels, workers=workers,
                                          pairs=classifier.pairs is not None)
    try:
        failed = _classify_all(items, prepared_all, classifier, out=out, fmt=fmt, debug_dir=debug_dir,
                               low_confidence=low_confidence, expect=expect, length=length)
    finally:
        prepared_all.close()  # stops the workers, if any
    return failed


def _classify_all(items: list[Item], prepared_all: Iterator[Prepared], classifier: Classifier, *, out: TextIO, fmt: str,
                  debug_dir: Path | None, low_confidence: float | None, expect: str | None,
                  length: str | None) -> int:
    """Batches of prepared files through the model; records out in input order."""
    collected: list[Result] = []
    failed = 0
    for start in range(0, len(items), BATCH):
        prepared = [next(prepared_all) for _ in range(min(BATCH, len(items) - start))]
        results = classify_batch(classifier, prepared, low_confidence=low_confidence,
                                 expect=expect, length=length)
        for k, (item, result) in enumerate(zip(prepared, results, strict=True)):
            if result.status == STATUS_ERROR:
                failed += 1
                print(f"digitwatch: {result.file}: {result.error}", file=sys.stderr)
            if debug_dir is not None and item.candidates is not None:
                stem = Path(item.name).stem
                name = f"{start + k:05d}-{stem}.png"
                pixels = side_by_side(item.candidates.crops)
                cv2.imwrite(str(debug_dir / name), (pixels * 255).round().astype(np.uint8))
            if fmt == "csv":
                out.write(csv_line(result, CLASSIFY_COLUMNS))
            elif fmt == "jsonl":
                out.write(json_line(result, CLASSIFY_JSON))
            else:
                collected.append(result)
        out.flush()
    if fmt == "table":
        out.write(table(collected))
    return failed
