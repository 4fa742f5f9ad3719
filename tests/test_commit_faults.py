"""The commit protocol, killed at every named step: each step x placement
kind (hard link; copy across filesystems) x name kind (plain, non-UTF-8
bytes, in a sub-folder with --recursive; a name collision and a failed input
ride along). The real daemon, real folders, real PNGs: the first run is
SIGKILLed by DIGITWATCH_CRASH_AT at the step, a second run (killed again
inside recovery for the recovery steps) and a clean one finish. Then: exactly
one result line per input, exactly one placed copy, with the input's bytes,
no temporary file anywhere, nothing outside the configured folders touched."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.daemon_harness import GOOD, DaemonProc, read_results

pytestmark = pytest.mark.system

RAW = b"bytes-\xff\xfe.png"  # not UTF-8: kept as bytes end to end
# name in the inbox (bytes) -> (name in results, content)
INPUTS: dict[bytes, tuple[str, bytes]] = {
    b"plain.png": ("plain.png", GOOD[0].read_bytes()),
    RAW: ("bytes-\\xff\\xfe.png", GOOD[1].read_bytes()),
    b"sub/deeper/nested.png": ("sub/deeper/nested.png", GOOD[0].read_bytes() + b"\n\n"),
    b"sub/plain.png": ("sub/plain.png", GOOD[1].read_bytes() + b"\n"),  # same name as plain.png: a collision
    b"broken.png": ("broken.png", b"not a png at all"),  # failed/ with a sidecar
}

# (placement, step to crash at, the n-th time it is reached, then crash in recovery at).
# Every step for links; for copies the steps where a copy differs (a temporary
# name exists between copied and released).
STEPS = [
    ("claimed", 3, None),
    ("journaled", 1, None),
    ("placed", 1, None),
    ("placed_batch", 1, None),
    ("reported", 1, None),
    ("released", 2, None),
    ("placed", 2, "recovering"),
    ("reported", 1, "recovered"),
    ("placed", 2, "placed"),  # a second crash while recovery places
]
CASES = [("link", *c) for c in STEPS] + [
    ("copy", "copied", 2, None),
    ("copy", "placed", 1, None),
    ("copy", "reported", 1, None),
    ("copy", "released", 2, None),
    ("copy", "copied", 1, "copied"),  # a half-done copy, then again in recovery
    ("copy", "reported", 1, "recovered"),
    # Same filesystem, but linking refused (EPERM): copies for lack of permission.
    ("eperm", "copied", 2, None),
    ("eperm", "placed", 1, None),
    ("eperm", "reported", 1, "recovered"),
]

# Without CAP_FOWNER and CAP_DAC_OVERRIDE, root may not hard-link a file it
# neither owns nor can write (fs.protected_hardlinks=1): link() fails with
# EPERM, deterministically, so placement falls back to copying.
NO_LINK = ["setpriv", "--bounding-set", "-fowner,-dac_override"]


def _link_refused(tmp_path: Path) -> str | None:
    """None if NO_LINK really makes link() fail here, else why not."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        return "needs root and setpriv (util-linux)"
    probe = tmp_path / "probe"
    probe.write_bytes(b"x")
    os.chown(probe, 65534, 65534)
    r = subprocess.run([*NO_LINK, "ln", str(probe), str(tmp_path / "probe2")], capture_output=True)
    probe.unlink()
    if r.returncode == 0:
        (tmp_path / "probe2").unlink()
        return "linking a file of another user is not refused here (fs.protected_hardlinks off?)"
    return None


@contextlib.contextmanager
def mounted_tmpfs(mnt: Path, size: str):
    """A tmpfs of `size` mounted at `mnt` (made here) for the block; needs root, skips otherwise."""
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(path: Path) -> Path:
    """Write zeros to `path` until its filesystem is full."""
    with open(path, "wb", buffering=0) as fh, contextlib.suppress(OSError):
        while True:
            fh.write(b"\0" * 4096)
    return path


@pytest.fixture
def tmpfs(tmp_path):
    """A separate filesystem for processed/ and failed/ (copies, not links)."""
    with mounted_tmpfs(tmp_path / "otherfs", "64m") as mnt:
        yield mnt


def _plant(inbox: Path) -> None:
    old = time.time() - 60  # settled already: the backlog scan takes them at once
    for raw, (_, data) in INPUTS.items():
        path = os.path.join(os.fsencode(inbox), raw)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(data)
        os.utime(path, (old, old))


def _tree(root: Path) -> dict[bytes, bytes]:
    """Every file under root (bytes path -> content), links and all."""
    out = {}
    for dirpath, _dirs, files in os.walk(os.fsencode(root)):
        for f in files:
            p = os.path.join(dirpath, f)
            out[p] = os.readlink(p) if os.path.islink(p) else Path(os.fsdecode(p)).read_bytes()
    return out


def _placed(root: Path) -> list[bytes]:
    return [p for p in _tree(root) if b"/.errors/" not in p]


@pytest.mark.parametrize(("kind", "step", "n", "then"), CASES,
                         ids=[f"{k}-{s}{n}-{t or 'clean'}" for k, s, n, t in CASES])
def test_crash_at_step_then_recover(tmp_path, request, kind, step, n, then):
    out = request.getfixturevalue("tmpfs") if kind == "copy" else tmp_path
    if kind == "eperm" and (why := _link_refused(tmp_path)):
        pytest.skip(why)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("untouched")
    before_outside = _tree(outside)
    args = ("--recursive", "--batch-size", "16", "--batch-wait-ms", "3000", "--processed", str(out / "processed"),
            "--failed", str(out / "failed"))
    d = DaemonProc(tmp_path, *args, settle=0.05)
    _plant(d.inbox)
    crash = DaemonProc(tmp_path, *args, settle=0.05, env={"DIGITWATCH_CRASH_AT": f"{step}:{n}"})
    again = DaemonProc(tmp_path, *args, settle=0.05, env={"DIGITWATCH_CRASH_AT": f"{then}:1"})
    if kind == "eperm":
        for dirpath, _dirs, files in os.walk(os.fsencode(d.inbox)):
            for f in files:
                os.chown(os.path.join(dirpath, f), 65534, 65534)
        for proc in (d, crash, again):
            proc.args = [*NO_LINK, *proc.args]
    assert crash.run_once() == -signal.SIGKILL, f"never reached {step}:{n}:\n{crash.log.read_text()[-2000:]}"
    if then is not None:
        assert again.run_once() == -signal.SIGKILL, f"recovery never reached {then}"
    assert d.run_once() == 0, d.log.read_text()[-3000:]

    rows = read_results(d.results, "jsonl")
    counts = collections.Counter(r["file"] for r in rows)
    assert counts == collections.Counter(name for name, _ in INPUTS.values()), counts
    placed = _placed(out / "processed") + _placed(out / "failed")
    assert len(placed) == len(INPUTS), placed
    by_name = {r["file"]: r for r in rows}
    for name, data in INPUTS.values():
        r = by_name[name]
        moved = [p for p in placed if os.fsdecode(p).encode("utf-8", "surrogateescape")
                 .decode("utf-8", "backslashreplace") == r["moved_to"]]
        assert len(moved) == 1, (name, r["moved_to"])
        assert Path(os.fsdecode(moved[0])).read_bytes() == data
        assert r["sha256"] in ("", hashlib.sha256(data).hexdigest())
        # The claim's name is gone; a copy is a new inode with one name.
        assert os.stat(moved[0]).st_nlink == 1
    assert by_name["broken.png"]["status"] == "error"
    sidecars = [p for p in _tree(out / "failed") if b"/.errors/" in p]
    assert len(sidecars) == 1 and sidecars[0].endswith(b".error.json")
    # No temporary names, no claims, no journals, nothing quarantined.
    everything = list(_tree(out / "processed")) + list(_tree(out / "failed")) + list(_tree(d.inbox))
    assert not [p for p in everything if p.endswith(b".tmp")]
    assert _tree(d.inbox) == {}, "claims or journals left behind"
    assert sorted(os.listdir(d.inbox / ".digitwatch")) == ["quarantine"]
    assert os.listdir(d.inbox / ".digitwatch" / "quarantine") == []
    assert _tree(outside) == before_outside


def _check_once(d: DaemonProc, names: set[str]) -> list[dict]:
    rows = read_results(d.results, "jsonl")
    assert collections.Counter(r["file"] for r in rows) == collections.Counter(names)
    # moved_to is the display form: a path only where the name is UTF-8.
    assert all(os.path.lexists(r["moved_to"]) for r in rows if "\\x" not in r["moved_to"])
    return rows


def test_day_folder_archived_before_recovery(tmp_path):
    """A day folder moved away between crash and restart: recovery recreates it
    and places what it must (it used to die on FileNotFoundError every start)."""
    d = DaemonProc(tmp_path, "--recursive", "--batch-size", "16", "--batch-wait-ms", "3000", settle=0.05)
    _plant(d.inbox)
    crash = DaemonProc(tmp_path, "--recursive", "--batch-size", "16", "--batch-wait-ms", "3000", settle=0.05,
                       env={"DIGITWATCH_CRASH_AT": "placed:2"})
    assert crash.run_once() == -signal.SIGKILL
    (tmp_path / "archive").mkdir()
    for day in list((tmp_path / "processed").iterdir()):
        day.rename(tmp_path / "archive" / day.name)
    assert d.run_once() == 0, d.log.read_text()[-3000:]
    _check_once(d, {name for name, _ in INPUTS.values()})
    assert os.listdir(d.inbox / ".digitwatch" / "quarantine") == []


def test_results_unwritable_during_recovery_then_fixed(tmp_path):
    """A dead instance's journal whose lines cannot be written yet waits, and is
    appended exactly once when the results file is back (9 lines for 6 before).
    The results file sits on a full tmpfs: it passes the start-up checks (it
    can be opened for appending) but every write fails with ENOSPC."""
    with mounted_tmpfs(tmp_path / "small", "1m") as mnt:
        args = ("--recursive", "--batch-size", "16", "--batch-wait-ms", "3000")
        results = mnt / "results.jsonl"
        d = DaemonProc(tmp_path, *args, settle=0.05, results=results)
        _plant(d.inbox)
        crash = DaemonProc(tmp_path, *args, settle=0.05, results=results,
                           env={"DIGITWATCH_CRASH_AT": "placed_batch:1"})
        assert crash.run_once() == -signal.SIGKILL
        filler = fill(mnt / "filler")
        d.start()
        d.wait_log("recovery_incomplete", timeout=30)
        assert d.terminate() == 0
        filler.unlink()
        assert d.run_once() == 0, d.log.read_text()[-3000:]
        assert d.run_once() == 0  # and once more: nothing is appended again
        _check_once(d, {name for name, _ in INPUTS.values()})


def test_disk_full_copy_leaves_no_partial_file(tmp_path):
    """processed/ on a full filesystem: copies fail (ENOSPC), the files stay
    claimed and retry; no partial file under any real name (a 0-byte
    `name-2.png` per retry before); once there is room, one copy each."""
    with mounted_tmpfs(tmp_path / "small", "2m") as mnt:
        d = DaemonProc(tmp_path, "--processed", str(mnt / "processed"), "--failed", str(mnt / "failed"))
        (mnt / "processed").mkdir()
        (mnt / "failed").mkdir()
        fill(mnt / "filler")
        d.start()
        big = sorted(GOOD[0].parent.glob("*.png"), key=lambda p: p.stat().st_size)[-3:]
        names = {f"full{i}.png" for i in range(3)}
        for name, src in zip(sorted(names), big, strict=True):
            (d.inbox / name).write_bytes(src.read_bytes())
        d.wait_log("commit_failed", timeout=30, count=3)  # the first try and two retries
        assert d.lines() == []
        partial = [p for p in (mnt / "processed").rglob("*") if p.is_file() and not p.name.endswith(".tmp")]
        assert partial == []
        (mnt / "filler").unlink()
        d.wait_lines(3, timeout=40)
        assert d.terminate() == 0
        _check_once(d, names)
        placed = [p for p in (mnt / "processed").rglob("*") if p.is_file()]
        assert len(placed) == 3 and not [p for p in placed if p.name.endswith(".tmp")]
