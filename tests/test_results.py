"""Result rendering and the results file."""

from __future__ import annotations

import csv
import io
import json

import pytest

from digitwatch.results import (
    DAEMON_COLUMNS,
    Result,
    ResultsFile,
    csv_line,
    defuse,
    display_name,
    json_line,
)


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

    def test_contains(self, tmp_path):
        f = ResultsFile(tmp_path / "r.jsonl", "jsonl")
        line = json_line(result("a"), DAEMON_COLUMNS)
        assert not f.contains(line)
        f.append([line])
        assert f.contains(line)
