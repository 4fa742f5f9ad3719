"""`digitwatch evaluate`: the scan-set scoring on known answers, and a small real run."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from digitwatch.training.evaluation import Answer, score_scans
from tests.conftest import run_cli


class TestScoring:
    """The figures computed from answers whose rightness is known."""

    def test_known_answers(self):
        numbers = [(b"a", "12"), (b"b", "345"), (b"c", "7"), (b"d", "89")]
        non_digits = [(b"x", "letter"), (b"y", "tick")]
        answers = {
            b"a": Answer("12", 0.99, True),    # right, ok
            b"b": Answer("346", 0.97, True),   # wrong, ok
            b"c": Answer("7", 0.40, False),    # right, not ok
            b"d": Answer("", 0.0, False),      # refused
            b"x": Answer("4", 0.95, True),     # a letter read as a digit, ok
            b"y": Answer("", 0.0, False),      # a tick refused
        }
        r = score_scans(numbers, non_digits, answers.__getitem__, model="m", reader="r", threshold=0.5)
        assert r.exact == pytest.approx(0.5)
        assert r.exact_by_length == {1: 1.0, 2: 0.5, 3: 0.0}
        assert r.numbers_marked_ok == pytest.approx(0.5)
        assert r.ok_accuracy == pytest.approx(0.5)
        assert r.wrong_marked_ok == pytest.approx(0.25)
        assert r.non_digits_marked_ok == pytest.approx(0.5)
        assert r.non_digits_marked_ok_by_kind == {"letter": 1.0, "tick": 0.0}
        # Four answers given: 0.99 right, 0.97 wrong, 0.40 right, 0.95 wrong.
        assert sum(r.reliability.count) == 4
        expected = abs(0.40 - 1) * 0.25 + abs((0.95 + 0.97 + 0.99) / 3 - 1 / 3) * 0.75
        assert r.ece == pytest.approx(expected)

    def test_single_digit_set(self):
        digits = [(b"p", "3"), (b"q", "5"), (b"r", "8"), (b"s", "1")]
        answers = {
            b"p": Answer("3", 0.99, True),   # right, ok
            b"q": Answer("5", 0.60, False),  # right, not ok
            b"r": Answer("3", 0.97, True),   # wrong, ok
            b"s": Answer("17", 0.20, False),  # read as two digits: wrong
        }
        r = score_scans([], [], answers.__getitem__, model="m", reader="r", threshold=0.9, digits=digits)
        assert (r.digits, r.digits_right, r.digits_marked_ok, r.digits_ok_right) == (4, 0.5, 0.5, 0.5)
        assert set(r.ece_by_set) == {"digits"} and r.ece_by_set["digits"] == pytest.approx(r.ece)


@pytest.mark.system
class TestEvaluateCommand:
    """A small real run through the CLI, the shipped model and rendered scans."""

    def test_small_run_writes_reliability_diagram(self, mnist_dir, tmp_path):
        out = tmp_path / "report"
        proc = run_cli("evaluate", "--data", str(mnist_dir), "--numbers", "24", "--non-digits", "16",
                       "--report", str(out), "--format", "json", timeout=300)
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        scans = doc["scans"]
        assert scans["numbers"] == 24 and scans["non_digits"] == 16
        assert sorted(int(k) for k in scans["exact_by_length"]) == list(range(1, 13))
        assert 0.0 <= scans["ece"] <= 1.0
        assert sum(scans["reliability"]["count"]) <= 40
        for name in ("confusion.png", "reliability.png", "worst_errors.png"):
            img = cv2.imread(str(out / name))
            assert img is not None and img.shape[0] > 200
            assert (img < 128).mean() > 0.005 and (img > 200).mean() > 0.3  # drawn on, not blank

    def test_sizes_zero_skips_the_scan_sets(self, mnist_dir):
        proc = run_cli("evaluate", "--data", str(mnist_dir), "--numbers", "0", "--non-digits", "0")
        assert proc.returncode == 0, proc.stderr
        assert "accuracy" in proc.stdout and "scan sets" not in proc.stdout
        assert np.isfinite(float(proc.stdout.split("accuracy")[1].split()[0]))


def test_accuracy_is_the_digit_answered_and_refusals_are_counted():
    """With 11 classes, a digit the model calls "not a digit" still stands in
    the result's `digit` (argmax over 0-9): accuracy scores that, refused counts them."""
    from digitwatch.training.evaluation import evaluate

    probs = np.zeros((3, 11))
    probs[0, 3] = 1.0  # right
    probs[1, [4, 10]] = [0.3, 0.7]  # refused, digit right
    probs[2, [5, 10]] = [0.2, 0.8]  # refused, digit wrong
    ev = evaluate(probs, np.array([3, 4, 6]), model="m")
    assert ev.accuracy == pytest.approx(2 / 3) and ev.refused == 2
    assert ev.confusion[4][10] == 1 and ev.confusion[6][10] == 1
