"""Process-wide tuning of the loop process: malloc arenas, OpenCV's threads,
the garbage collector. Each is one call made once, at start-up, in `loop`."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

import cv2

M_ARENA_MAX = -8  # glibc <malloc.h>
MALLOC_ARENAS = 2


def tune_loop_process() -> None:
    """Before any thread starts: cap malloc arenas, and keep OpenCV to one
    thread (the worker processes are the parallelism: OpenCV's own thread pool
    on top of them only adds contention)."""
    limit_malloc_arenas()
    cv2.setNumThreads(1)


def freeze_startup_objects() -> None:
    """Start-up objects (modules, the model) live as long as the process: keep
    them out of the collector's full passes, which otherwise walk them again
    and again (~5% of the CPU in a burst, profiled)."""
    gc.freeze()


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas before any thread starts.

    Each thread that allocates may get its own arena (up to 8 per core), and
    megabyte buffers freed in one arena and needed in another make RSS creep
    over a long run (figures in the CHANGELOG). Same as MALLOC_ARENA_MAX=2, but
    it also holds under `make run` and any other launcher. No-op off glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False
