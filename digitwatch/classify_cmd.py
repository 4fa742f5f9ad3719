"""`digitwatch classify`: expand paths, prepare files in worker threads, classify
in batches, stream the records out in input order."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TextIO

import cv2
import numpy as np

from digitwatch import inbox
from digitwatch.model import load_classifier
from digitwatch.pipeline import Prepared, classify_batch, prepare_file
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
                        and inbox.ignored_reason(child.name, inbox.DEFAULT_PATTERNS) is None):
                    yield child, None
        elif path.exists():
            yield path, None
        else:
            yield path, "no such file or directory"


def classify_paths(
    paths: list[Path], *, out: TextIO, fmt: str, model: Path | None, debug_dir: Path | None,
    low_confidence: float | None, recursive: bool, max_pixels: int,
    expect: str | None = None, length: str | None = None,
) -> int:
    """Classify everything under `paths`; returns how many files failed."""
    classifier = load_classifier(model)
    if debug_dir is not None:
        debug_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        out.write(csv_header(CLASSIFY_COLUMNS))
    collected: list[Result] = []
    failed = 0
    items = list(expand(paths, recursive=recursive))

    def prepare(item: tuple[Path, str | None]) -> Prepared:
        path, error = item
        name = display_name(str(path))  # \xNN for bytes that are not UTF-8, as the daemon writes them
        if error is not None:
            return Prepared(name=name, sha256="", started=time.perf_counter(), error=error)
        return prepare_file(path, name, max_pixels=max_pixels)

    with ThreadPoolExecutor(max_workers=2) as pool:
        for start in range(0, len(items), BATCH):
            prepared = list(pool.map(prepare, items[start : start + BATCH]))
            results = classify_batch(classifier, prepared, low_confidence=low_confidence,
                                     expect=expect, length=length)
            for k, (item, result) in enumerate(zip(prepared, results, strict=True)):
                if result.status == STATUS_ERROR:
                    failed += 1
                    print(f"digitwatch: {result.file}: {result.error}", file=sys.stderr)
                if debug_dir is not None and item.pixels is not None:
                    stem = Path(item.name).stem
                    name = f"{start + k:05d}-{stem}.png"
                    cv2.imwrite(str(debug_dir / name), (item.pixels * 255).round().astype(np.uint8))
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
