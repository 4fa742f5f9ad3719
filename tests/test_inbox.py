"""Name rules, relative names and the settle logic (clock injected)."""

from __future__ import annotations

import contextlib
import os
import queue
import time
from pathlib import Path

import pytest

from digitwatch.daemon.inbox import Settler, ignored_reason, list_folder, list_inbox, relative_name, start_observer


class TestRules:
    """What the inbox takes and what it ignores."""

    @pytest.mark.parametrize(
        ("name", "reason"),
        [
            ("scan.png", None),
            ("SCAN.PNG", None),
            ("Scan 01 (copy).Png", None),
            (".hidden.png", "dotfile"),
            ("scan.png.part", "temporary"),
            ("scan.png.tmp", "temporary"),
            ("scan.png.crdownload", "temporary"),
            ("scan.png~", "temporary"),
            ("Thumbs.db", "os_litter"),
            (".DS_Store", "os_litter"),
            ("desktop.ini", "os_litter"),
            ("._scan.png", "os_litter"),
            ("notes.txt", "pattern"),
            ("scan.jpg", "pattern"),
        ],
    )
    def test_rules(self, name, reason):
        assert ignored_reason(name, ("*.png",)) == reason

    def test_relative_names(self, tmp_path):
        assert relative_name(tmp_path / "a.png", tmp_path) == "a.png"
        assert relative_name(tmp_path / "sub" / "a.png", tmp_path) == "sub/a.png"
        assert relative_name(tmp_path / ".digitwatch" / "x" / "a.png", tmp_path) is None
        assert relative_name(tmp_path.parent / "a.png", tmp_path) is None


class TestSettler:
    """A listed file is ready once unchanged for settle_seconds."""

    def test_old_file_is_ready_at_once(self, tmp_path):
        f = tmp_path / "a.png"
        f.write_bytes(b"x")
        os.utime(f, (time.time() - 10, time.time() - 10))
        assert Settler(2.0).ready(f) is True

    def test_fresh_file_waits_until_quiet(self, tmp_path):
        f = tmp_path / "a.png"
        f.write_bytes(b"x")
        now = [time.time()]
        settler = Settler(2.0, clock=lambda: now[0])
        assert settler.ready(f) is False
        now[0] += 1.0
        assert settler.ready(f) is False
        now[0] += 1.5
        assert settler.ready(f) is True

    def test_file_written_again_waits_again(self, tmp_path):
        f = tmp_path / "a.png"
        f.write_bytes(b"x")
        now = [time.time()]
        settler = Settler(2.0, clock=lambda: now[0])
        assert settler.ready(f) is False
        now[0] += 1.9
        with f.open("ab") as fh:  # the writer is still at it
            fh.write(b"more")
        os.utime(f, (now[0], now[0]))
        now[0] += 1.0
        assert settler.ready(f) is False
        now[0] += 1.5
        assert settler.ready(f) is True

    def test_vanished_file(self, tmp_path):
        assert Settler(1.0).ready(tmp_path / "gone.png") is None


def _drain(out: queue.Queue, want: set[Path], timeout: float) -> set[Path]:
    """Paths reported on `out` until all of `want` were seen or `timeout` passed."""
    seen: set[Path] = set()
    deadline = time.monotonic() + timeout
    while not want <= seen and time.monotonic() < deadline:
        with contextlib.suppress(queue.Empty):
            path, _ = out.get(timeout=0.1)
            seen.add(Path(path))
    # Whatever else arrives right after (e.g. a file that must not be reported).
    with contextlib.suppress(queue.Empty):
        while True:
            seen.add(Path(out.get(timeout=0.3)[0]))
    return seen


@pytest.fixture
def watched(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    out: queue.Queue = queue.Queue()
    observer = start_observer(inbox, recursive=True, polling=False, poll_interval=1.0, out=out)
    yield inbox, out
    observer.stop()
    observer.join(5)


class TestRecursiveNewFolders:
    """Files renamed into a folder that just appeared are reported at once, not
    at the next rescan; hidden folders and links to folders are never entered."""

    def test_files_renamed_into_fresh_folders(self, tmp_path, watched):
        inbox, out = watched
        staging = tmp_path / "staging"
        staging.mkdir()
        want = set()
        for i in range(300):
            (staging / f"{i}.png").write_bytes(b"x")
        for i in range(300):
            sub = inbox / f"batch-{i}"
            sub.mkdir()
            os.rename(staging / f"{i}.png", sub / f"{i}.png")
            want.add(sub / f"{i}.png")
        seen = _drain(out, want, timeout=20)
        assert want <= seen, f"{len(want - seen)} of 300 not reported"

    def test_tree_moved_in_and_nested_mkdir(self, tmp_path, watched):
        inbox, out = watched
        tree = tmp_path / "tree"
        (tree / "a" / "b").mkdir(parents=True)
        (tree / "top.png").write_bytes(b"x")
        (tree / "a" / "b" / "deep.png").write_bytes(b"x")
        os.rename(tree, inbox / "tree")
        staging = tmp_path / "late.png"
        staging.write_bytes(b"x")
        (inbox / "n1" / "n2" / "n3").mkdir(parents=True)
        os.rename(staging, inbox / "n1" / "n2" / "n3" / "late.png")
        want = {inbox / "tree" / "top.png", inbox / "tree" / "a" / "b" / "deep.png",
                inbox / "n1" / "n2" / "n3" / "late.png"}
        assert want <= _drain(out, want, timeout=20)

    def test_hidden_and_linked_folders_not_entered(self, tmp_path, watched):
        inbox, out = watched
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "victim.png").write_bytes(b"x")
        (inbox / "link").symlink_to(outside, target_is_directory=True)
        staging = tmp_path / "s"
        staging.mkdir()
        (staging / "h.png").write_bytes(b"x")
        (staging / "ok.png").write_bytes(b"x")
        (inbox / ".digitwatch" / "x").mkdir(parents=True)
        os.rename(staging / "h.png", inbox / ".digitwatch" / "x" / "h.png")
        (inbox / "fresh").mkdir()
        (inbox / "fresh" / "inner-link").symlink_to(outside, target_is_directory=True)
        os.rename(staging / "ok.png", inbox / "fresh" / "ok.png")
        seen = _drain(out, {inbox / "fresh" / "ok.png"}, timeout=20)
        assert inbox / "fresh" / "ok.png" in seen
        assert not any(".digitwatch" in p.parts for p in seen)
        assert not any(p.name == "victim.png" for p in seen)

    def test_listing_never_follows_links(self, tmp_path):
        inbox = tmp_path / "inbox"
        (inbox / "real").mkdir(parents=True)
        (inbox / "real" / "a.png").write_bytes(b"x")
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "victim.png").write_bytes(b"x")
        (inbox / "link").symlink_to(outside, target_is_directory=True)
        (inbox / ".hidden").mkdir()
        (inbox / ".hidden" / "h.png").write_bytes(b"x")
        assert set(list_inbox(inbox, True)) == {inbox / "real" / "a.png", inbox / "link"}
        assert list(list_folder(inbox, inbox / "link", True)) == []
        assert list(list_folder(inbox, inbox / ".hidden", True)) == []
        assert list(list_folder(inbox, outside, True)) == []

    def test_deep_and_wide_trees(self, tmp_path):
        inbox = tmp_path / "inbox"
        inbox.mkdir()
        depth = 1100  # deeper than Python's recursion limit
        fds = [os.open(inbox, os.O_RDONLY)]
        try:
            for _ in range(depth):
                os.mkdir("d", dir_fd=fds[-1])
                fds.append(os.open("d", os.O_RDONLY, dir_fd=fds[-1]))
            os.close(os.open("x.png", os.O_WRONLY | os.O_CREAT, dir_fd=fds[-1]))
            for i in range(2000):  # more folders than a default descriptor limit
                (inbox / f"w{i}").mkdir()
            (inbox / "w1999" / "y.png").write_bytes(b"x")
            deep = inbox.joinpath(*["d"] * depth)
            assert set(list_inbox(inbox, True)) == {deep / "x.png", inbox / "w1999" / "y.png"}
        finally:
            # Bottom up, by descriptor: pytest's own clean-up (shutil.rmtree)
            # recurses per level and would fail on this tree in a later session.
            with contextlib.suppress(FileNotFoundError):
                os.unlink("x.png", dir_fd=fds[-1])
            for i in range(len(fds) - 1, 0, -1):
                os.close(fds[i])
                os.rmdir("d", dir_fd=fds[i - 1])
            os.close(fds[0])


@pytest.mark.system
def test_daemon_takes_files_renamed_into_new_folders_at_once(tmp_path):
    """The issue's measure: 300 files, each renamed into a folder made just
    before; all get their line long before the 60 s rescan."""
    from tests.daemon_harness import PNG_GOOD, DaemonProc

    d = DaemonProc(tmp_path, "--recursive", "--rescan-seconds", "600").start()
    staging = tmp_path / "staging"
    staging.mkdir()
    try:
        for i in range(300):
            (staging / f"{i}.png").write_bytes(PNG_GOOD)
        started = time.monotonic()
        for i in range(300):
            (d.inbox / f"b{i}").mkdir()
            os.rename(staging / f"{i}.png", d.inbox / f"b{i}" / f"{i}.png")
        rows = d.wait_lines(300, timeout=45)
        took = time.monotonic() - started
    finally:
        assert d.terminate() == 0
    assert sorted(r["file"] for r in rows) == sorted(f"b{i}/{i}.png" for i in range(300))
    assert took < 45
