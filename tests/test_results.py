"""Result rendering and the results file."""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from digitwatch.daemon.results_file import NotRegularFileError, ResultsFile
from digitwatch.results import DAEMON_COLUMNS, Result, csv_line, defuse, display_name, json_line


def result(name: str = "a.png", **kw) -> Result:
    base = dict(file=name, digit=7, confidence=0.93, status="ok", error="", sha256="ab",
                width=100, height=80, model="m@1", latency_ms=3.2, ts="t", moved_to="/p/a.png",
                instance="i")
    base.update(kw)
    return Result(**base)


class TestRendering:
    """CSV and JSON lines survive hostile names."""

    @pytest.mark.parametrize("name", ["a,b.png", 'q"uote.png', "new\nline.png", "ü数.png", "=1+2.png"])
    def test_csv_round_trip(self, name):
        line = csv_line(result(name), DAEMON_COLUMNS)
        row = next(csv.reader(io.StringIO(line)))
        assert row[1] == defuse(name)
        assert len(row) == len(DAEMON_COLUMNS)

    @pytest.mark.parametrize("lead", ["=", "+", "-", "@", "\t"])
    def test_formula_prefix_defused(self, lead):
        assert defuse(lead + "x") == "'" + lead + "x"
        assert defuse("x" + lead) == "x" + lead

    def test_json_line_is_one_line(self):
        line = json_line(result("two\nlines.png"), DAEMON_COLUMNS)
        assert line.count("\n") == 1
        assert json.loads(line)["file"] == "two\nlines.png"

    def test_undecodable_name_is_escaped(self):
        raw = b"bad\xffname.png".decode("utf-8", "surrogateescape")
        shown = display_name(raw)
        assert shown == "bad\\xffname.png"
        json_line(result(shown), DAEMON_COLUMNS).encode("utf-8")


class TestResultsFile:
    """Append-only, header once, torn tails repaired, reopened after rotation."""

    def test_header_once_and_append(self, tmp_path):
        f = ResultsFile(tmp_path / "r.csv", "csv")
        f.append([csv_line(result("a.png"), DAEMON_COLUMNS)])
        f.append([csv_line(result("b.png"), DAEMON_COLUMNS)])
        text = (tmp_path / "r.csv").read_text()
        assert text.count("ts,file") == 1 and text.count("\n") == 3

    def test_torn_tail_is_cut(self, tmp_path):
        path = tmp_path / "r.jsonl"
        path.write_text('{"file": "whole"}\n{"file": "to')
        ResultsFile(path, "jsonl").append([json_line(result("next"), DAEMON_COLUMNS)])
        lines = path.read_text().splitlines()
        assert [json.loads(x)["file"] for x in lines] == ["whole", "next"]

    def test_reopens_when_deleted(self, tmp_path):
        path = tmp_path / "r.jsonl"
        f = ResultsFile(path, "jsonl")
        f.append([json_line(result("a"), DAEMON_COLUMNS)])
        path.unlink()
        f.append([json_line(result("b"), DAEMON_COLUMNS)])
        assert [json.loads(x)["file"] for x in path.read_text().splitlines()] == ["b"]


def lines_of(n: int) -> bytes:
    return b"".join(json_line(result(f"f{i:05d}.png"), DAEMON_COLUMNS).encode() for i in range(n))


class TestTornTail:
    """Repair cuts exactly the final partial line, never anything before it."""

    def test_nul_tail_keeps_every_earlier_line(self, tmp_path):
        # A power cut: the size reached the disk, the last 1.5 MiB of data did not.
        path = tmp_path / "r.jsonl"
        history = lines_of(20_000)
        path.write_bytes(history + b"\0" * (3 << 19))
        ResultsFile(path, "jsonl").append([json_line(result("next"), DAEMON_COLUMNS)])
        data = path.read_bytes()
        assert data.startswith(history)
        rows = [json.loads(x) for x in data.splitlines()]
        assert len(rows) == 20_001 and rows[-1]["file"] == "next"

    def test_partial_line_then_nuls_is_cut(self, tmp_path):
        path = tmp_path / "r.jsonl"
        history = lines_of(3)
        path.write_bytes(history + b'{"file": "to' + b"\0" * 5000)
        ResultsFile(path, "jsonl").append(["{}\n"])
        assert path.read_bytes() == history + b"{}\n"

    def test_csv_header_kept(self, tmp_path):
        path = tmp_path / "r.csv"
        f = ResultsFile(path, "csv")
        f.append([csv_line(result("a.png"), DAEMON_COLUMNS)])
        whole = path.read_bytes()
        with path.open("ab") as fh:
            fh.write(b"2026-01-01,b.p" + b"\0" * 100)
        f.append([csv_line(result("c.png"), DAEMON_COLUMNS)])
        assert path.read_bytes() == whole + csv_line(result("c.png"), DAEMON_COLUMNS).encode()

    @pytest.mark.parametrize("junk", [b"\0" * 70_000, b"no newline anywhere"])
    def test_no_newline_at_all_cuts_nothing(self, tmp_path, junk):
        path = tmp_path / "r.jsonl"
        path.write_bytes(junk)
        ResultsFile(path, "jsonl").append(["{}\n"])
        assert path.read_bytes() == junk + b"\n{}\n"

    def test_newline_beyond_the_scan_window_cuts_nothing(self, tmp_path):
        path = tmp_path / "r.jsonl"
        path.write_bytes(b"{}\n" + b"\0" * 5000)
        f = ResultsFile(path, "jsonl")
        f.REPAIR_SCAN = 4096
        f.append(["{}\n"])
        assert path.read_bytes() == b"{}\n" + b"\0" * 5000 + b"\n{}\n"


class TestRegularFileOnly:
    """Never a link, FIFO, device or socket; never blocks; refusals are OSErrors."""

    def test_open_creates_with_csv_header(self, tmp_path):
        path = tmp_path / "sub" / "r.csv"
        ResultsFile(path, "csv").open()
        assert path.read_text() == ",".join(DAEMON_COLUMNS) + "\n"
        ResultsFile(path, "csv").open()  # an existing file is opened, not rewritten
        assert path.read_text().count("\n") == 1

    def test_open_jsonl_creates_empty(self, tmp_path):
        path = tmp_path / "r.jsonl"
        ResultsFile(path, "jsonl").open()
        assert path.read_bytes() == b""

    def test_fifo_refused_without_blocking(self, tmp_path):
        path = tmp_path / "r.csv"
        os.mkfifo(path)
        f = ResultsFile(path, "csv")
        outcome: list[BaseException | None] = []

        def attempt() -> None:
            try:
                f.append([csv_line(result("a.png"), DAEMON_COLUMNS)])
                outcome.append(None)
            except BaseException as exc:  # noqa: BLE001 - reported to the test thread
                outcome.append(exc)

        t = threading.Thread(target=attempt, daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive(), "append blocked on a FIFO"
        assert isinstance(outcome[0], NotRegularFileError)
        assert "is a FIFO" in str(outcome[0]) and str(path) in str(outcome[0])
        with pytest.raises(NotRegularFileError):
            f.open()

    def test_symlink_refused_and_target_untouched(self, tmp_path):
        victim = tmp_path / "victim.txt"
        victim.write_bytes(b"keep")
        path = tmp_path / "r.jsonl"
        path.symlink_to(victim)
        with pytest.raises(NotRegularFileError, match="symbolic link"):
            ResultsFile(path, "jsonl").append(["{}\n"])
        assert victim.read_bytes() == b"keep"

    def test_dangling_symlink_not_followed(self, tmp_path):
        path = tmp_path / "r.jsonl"
        path.symlink_to(tmp_path / "made-through-link")
        with pytest.raises(NotRegularFileError):
            ResultsFile(path, "jsonl").open()
        assert not (tmp_path / "made-through-link").exists()

    def test_device_refused(self):
        with pytest.raises(NotRegularFileError, match="character device"):
            ResultsFile(Path("/dev/null"), "jsonl").append(["{}\n"])

    def test_socket_refused(self, tmp_path):
        path = tmp_path / "r.jsonl"
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.bind(str(path))
            with pytest.raises(NotRegularFileError, match="socket"):
                ResultsFile(path, "jsonl").open()
        finally:
            sock.close()

    def test_swapped_for_a_fifo_after_rotation(self, tmp_path):
        path = tmp_path / "r.jsonl"
        f = ResultsFile(path, "jsonl")
        f.append(["{}\n"])
        path.unlink()
        os.mkfifo(path)
        with pytest.raises(NotRegularFileError):
            f.append(["{}\n"])

    def test_lock_held_elsewhere_times_out(self, tmp_path):
        path = tmp_path / "r.jsonl"
        f = ResultsFile(path, "jsonl")
        f.open()
        f.LOCK_TIMEOUT = 0.3
        with path.open("rb") as other:  # read access is enough to flock
            fcntl.flock(other, fcntl.LOCK_EX)
            started = time.monotonic()
            with pytest.raises(OSError, match="locked by another process"):
                f.append(["{}\n"])
            assert time.monotonic() - started < 5
        f.append(["{}\n"])
        assert path.read_bytes() == b"{}\n"


@pytest.mark.system
@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_daemon_creates_results_file_at_start(tmp_path, fmt):
    """`tail -f results.csv` works right after start: the file exists, with its header."""
    from tests.daemon_harness import DaemonProc

    d = DaemonProc(tmp_path, fmt=fmt).start()
    try:
        assert d.results.exists()
        assert d.results.read_text() == (",".join(DAEMON_COLUMNS) + "\n" if fmt == "csv" else "")
    finally:
        assert d.terminate() == 0
