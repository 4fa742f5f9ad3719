"""Start-up checks that touch the disk, as this process: every folder the
daemon writes must exist (or be makeable) and take a new file, so a service
that cannot work exits 78 at once instead of looking healthy."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from digitwatch.config import Settings
from digitwatch.daemon.claims import check_state_root
from digitwatch.daemon.inbox import WORK_DIR as CLAIMS_DIR
from digitwatch.errors import ConfigError, reason


def check_paths(s: Settings, *, create: bool = True) -> None:
    """Start-up checks that touch the disk, as this process (its user, its
    mounts: a systemd sandbox makes paths read-only that look writable from a
    shell). The inbox must exist; the outputs are made if missing (`create`)
    or must be makeable; every folder must take a new file. One ConfigError
    naming the path and the reason, so the service exits 78 instead of looking
    healthy while every commit fails."""
    if not s.inbox.exists():
        raise ConfigError(f"inbox {s.inbox} does not exist")
    if not s.inbox.is_dir():
        raise ConfigError(f"inbox {s.inbox} is not a folder")
    if s.model is not None and not s.model.is_file():
        raise ConfigError(f"model {s.model} not found")
    folders = [("inbox", s.inbox)]
    # First, and without following it: a planted link must not even be probed.
    if check_state_root(s.inbox):
        folders.append(("claim folder", s.inbox / CLAIMS_DIR))
    folders += [("processed", s.processed), ("failed", s.failed)]
    if s.review is not None:
        folders.append(("review", s.review))
    folders.append(("results folder", s.results.parent))
    for what, folder in folders:
        _check_folder(what, folder, create=create)
    _check_results_file(s.results)


def _check_folder(what: str, folder: Path, *, create: bool) -> None:
    if not folder.exists():
        if create:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"{what} {folder}: cannot create it ({reason(exc)})") from None
        else:
            # check-config changes nothing: the nearest existing folder above
            # must take the new one.
            parent = folder.parent
            while not parent.exists() and parent != parent.parent:
                parent = parent.parent
            problem = _write_problem(parent)
            if problem:
                raise ConfigError(f"{what} {folder}: cannot create it, {parent} {problem}")
            return
    if not folder.is_dir():
        raise ConfigError(f"{what} {folder} is not a folder")
    problem = _write_problem(folder)
    if problem:
        raise ConfigError(f"{what} {folder} {problem}")


def _write_problem(folder: Path) -> str:
    """Why this process cannot make a file in `folder`, or ''. A real exclusive
    create and unlink: os.access() ignores read-only mounts, immutable flags
    and root's override."""
    probe = folder / f".digitwatch-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        return f"is not writable ({reason(exc)})"
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError as exc:
        return f"does not let files be removed ({reason(exc)})"
    return ""


def _check_results_file(path: Path) -> None:
    """An existing results file must take appends (no O_CREAT: nothing made here)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"results {path} cannot be appended to ({reason(exc)})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"results {path} is not a regular file")
    finally:
        os.close(fd)
