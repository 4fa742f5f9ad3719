"""The one safe way to read a file we were handed: regular files only, links
never followed, FIFOs and devices never opened for reading, a size cap checked
before a byte is read. Used by `classify`, the daemon's claims and its workers."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from digitwatch.errors import RefusedError

DEFAULT_MAX_BYTES = 256 * 1024 * 1024


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
