"""Tasks the worker tests hand to `WorkerPool` (imported inside the worker
processes): the real pipeline, except for names that ask the worker to hang or
to allocate far more than it may. Kept out of digitwatch: production workers
honour no test hooks."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from digitwatch.daemon.worker import Limits, prepare_claimed
from digitwatch.reader.prepare import Prepared


def marked(path: str, name: str, limits: Limits) -> Prepared:
    """hang-*: say so in <path>.started (with this worker's pid), then never
    return. huge-*: ask for a terabyte. Anything else: the real pipeline."""
    if name.startswith(("hang-", "huge-")):
        Path(path + ".started").write_text(str(os.getpid()))
    if name.startswith("hang-"):
        while True:
            time.sleep(3600)
    if name.startswith("huge-"):
        bytearray(1 << 40)
    return prepare_claimed(path, name, limits)


def echo(path: str, name: str, limits: Limits) -> Prepared:
    """No work at all: what is left of a file's round trip is the IPC (the bench)."""
    return Prepared(name=name, sha256="0" * 64, started=time.perf_counter(),
                    pixels=np.zeros((28, 28), np.float32), width=28, height=28)
