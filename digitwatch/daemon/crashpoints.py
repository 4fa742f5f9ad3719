"""Named steps of the commit protocol that a test can stop the process at.

`DIGITWATCH_CRASH_AT="placed:3"` SIGKILLs the process the 3rd time the
`placed` step is reached (several specs may be given, comma-separated). The
variable is read once at import: with it unset, `checkpoint` is one test of a
module constant. A kill, not an exception: nothing may run after it, exactly
as after a power cut or an OOM kill.
"""

from __future__ import annotations

import os
import signal
import threading

STEPS = (
    "claimed",        # renamed out of the inbox into the instance folder
    "journaled",      # the batch's intent is on disk
    "copied",         # a copy is whole under its temporary name (copy placement only)
    "placed",         # one file has its name in processed/ failed/ review/
    "placed_batch",   # every placeable file of the batch is placed
    "reported",       # the lines are appended and synced
    "released",       # one claim is unlinked
    "recovering",     # recovery is about to finish one journal
    "recovered",      # recovery finished one journal
)


def _parse(spec: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        step, _, n = part.partition(":")
        if step not in STEPS:
            raise ValueError(f"DIGITWATCH_CRASH_AT: unknown step {step!r} (steps: {', '.join(STEPS)})")
        out[step] = int(n or 1)
    return out


_TARGETS = _parse(os.environ.get("DIGITWATCH_CRASH_AT", ""))
_counts: dict[str, int] = {}
_lock = threading.Lock()


def checkpoint(step: str) -> None:
    """Die here if this is the n-th time `step` is reached and a test asked for it."""
    if not _TARGETS:
        return
    with _lock:
        _counts[step] = n = _counts.get(step, 0) + 1
    if _TARGETS.get(step) == n:
        os.kill(os.getpid(), signal.SIGKILL)
