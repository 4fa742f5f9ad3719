"""`digitwatch classify` (classify.py): which files a folder gives, and what
its output lines hold."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from digitwatch.classify import expand
from tests.conftest import ROOT, SCAN_FIXTURES

SCAN = sorted(SCAN_FIXTURES.glob("mnist-*.png"))[0]


class TestExpand:
    """A folder given to `classify` gives what the daemon would take from it as an inbox."""

    def _folder(self, root: Path) -> None:
        for rel in ("a.png", "B.PNG", "sub/c.png", ".hidden.png", "._a.png", "Thumbs.db", "notes.txt",
                    "d.png.part", ".digitwatch/claimed/e.png", "sub/.cache/f.png"):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(SCAN.read_bytes())

    def test_flat_folder_takes_the_inbox_names(self, tmp_path):
        self._folder(tmp_path)
        got = [p.relative_to(tmp_path).as_posix() for p, err in expand([tmp_path], recursive=False)]
        assert got == ["B.PNG", "a.png"]

    def test_recursive_never_enters_hidden_folders(self, tmp_path):
        # An inbox's own .digitwatch folder holds claimed files: classifying the
        # inbox must not read them a second time, as the daemon does not.
        self._folder(tmp_path)
        got = [p.relative_to(tmp_path).as_posix() for p, err in expand([tmp_path], recursive=True)]
        assert got == ["B.PNG", "a.png", "sub/c.png"]

    def test_files_named_directly_are_taken_whatever_their_name(self, tmp_path):
        self._folder(tmp_path)
        named = [tmp_path / "notes.txt", tmp_path / ".hidden.png", tmp_path / "gone.png"]
        assert list(expand(named, recursive=False)) == [
            (named[0], None), (named[1], None), (named[2], "no such file or directory"),
        ]


class TestNonUtf8Names:
    """Every output line is valid UTF-8 whatever bytes a file name holds, as in the daemon's results."""

    RAW = b"bytes-\xff\xfe.png"  # not UTF-8

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        # Bytes, not text: decoding is what the test checks.
        return subprocess.run([sys.executable, "-m", "digitwatch.cli", "classify", *args],
                              capture_output=True, timeout=120, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})

    @pytest.mark.parametrize("fmt", ["jsonl", "csv"])
    def test_folder_with_a_non_utf8_name(self, tmp_path, fmt):
        with open(os.path.join(os.fsencode(tmp_path), self.RAW), "wb") as fh:
            fh.write(SCAN.read_bytes())
        (tmp_path / "plain.png").write_bytes(SCAN.read_bytes())
        r = self._run(str(tmp_path), "--format", fmt)
        assert r.returncode == 0, r.stderr
        text = r.stdout.decode("utf-8")  # strict: raises on the raw \xff\xfe
        if fmt == "jsonl":
            files = [json.loads(line)["file"] for line in text.splitlines()]
        else:
            files = [row["file"] for row in csv.DictReader(io.StringIO(text))]
        assert files == [f"{tmp_path}/bytes-\\xff\\xfe.png", f"{tmp_path}/plain.png"]

    def test_error_line_for_a_non_utf8_name_is_utf8_too(self, tmp_path):
        with open(os.path.join(os.fsencode(tmp_path), self.RAW), "wb") as fh:
            fh.write(b"not a png")
        r = self._run(str(tmp_path), "--format", "jsonl")
        assert r.returncode == 1
        (row,) = [json.loads(line) for line in r.stdout.decode("utf-8").splitlines()]
        assert row["file"] == f"{tmp_path}/bytes-\\xff\\xfe.png" and row["status"] == "error"
        assert f"{tmp_path}/bytes-\\xff\\xfe.png: " in r.stderr.decode("utf-8")


def _records(text: str) -> list[dict]:
    """JSON-lines records without the one field that is a timing."""
    out = []
    for line in text.splitlines():
        record = json.loads(line)
        record.pop("latency_ms")
        out.append(record)
    return out


class TestWorkerProcesses:
    """Many files are prepared in the daemon's worker processes: same records,
    in argument order, as preparing them in this process."""

    def _items(self, tmp_path: Path) -> list[Path]:
        scans = sorted(SCAN_FIXTURES.glob("*.png"))
        link = tmp_path / "link.png"
        link.symlink_to(scans[3])  # named on the command line: followed, as in-process
        bad = tmp_path / "notes.png"
        bad.write_text("not a png\n")
        # Reversed, a file twice, a link, a non-PNG and a missing file among them.
        return [*reversed(scans[:24]), scans[5], link, bad, tmp_path / "missing.png", *scans[24:40]]

    def test_prepared_in_workers_equals_prepared_here(self, tmp_path):
        from structlog.testing import capture_logs

        from digitwatch import classify

        items = list(classify.expand(self._items(tmp_path), recursive=False))
        here = list(classify.prepare_here(items, max_pixels=40_000_000))
        with capture_logs() as logs:
            there = list(classify.prepare_in_workers(items, max_pixels=40_000_000, workers=2))
        (started,) = [e for e in logs if e["event"] == "workers_started"]
        assert started["workers"] == 2 and os.getpid() not in started["pids"]
        assert [p.name for p in there] == [p.name for p in here]
        for a, b in zip(here, there, strict=True):
            assert (a.sha256, a.width, a.height, a.error) == (b.sha256, b.width, b.height, b.error), a.name
            if a.candidates is None:
                assert b.candidates is None
            else:
                assert a.candidates.crops.tobytes() == b.candidates.crops.tobytes(), a.name
        assert any(p.error for p in here) and any(p.candidates is not None for p in here)

    def test_cli_records_match_the_in_process_records(self, tmp_path, monkeypatch):
        from digitwatch import classify

        items = self._items(tmp_path)
        assert len(items) >= classify.MIN_FILES_FOR_WORKERS
        r = subprocess.run([sys.executable, "-m", "digitwatch", "classify", "--format", "jsonl", "--workers", "2",
                            *map(str, items)], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert r.returncode == 1, r.stderr  # the non-PNG and the missing file
        monkeypatch.setattr(classify, "MIN_FILES_FOR_WORKERS", 10**9)
        out = io.StringIO()
        failed = classify.classify_paths(items, out=out, fmt="jsonl", model=None, debug_dir=None,
                                             low_confidence=None, recursive=False, max_pixels=40_000_000)
        assert failed == 2
        assert _records(r.stdout) == _records(out.getvalue())
        assert r.stderr.splitlines() == [f"digitwatch: {tmp_path / 'notes.png'}: not a PNG: a text file",
                                         f"digitwatch: {tmp_path / 'missing.png'}: no such file or directory"]
