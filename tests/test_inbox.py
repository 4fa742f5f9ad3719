"""Name rules, relative names and the settle logic (clock injected)."""

from __future__ import annotations

import os
import time

import pytest

from digitwatch.inbox import Settler, ignored_reason, relative_name


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
