"""Segmentation cases of the number reader: real PNGs (MNIST *test* digits
composed by tests/scans.py) through the shipped model, the path classify and
the daemon take. Each asserts a rate over a small seeded batch.

The constants behind these were tuned on MNIST-train validation digits
(`python -m tests.bench.numbers`), never on these scans.
"""

from __future__ import annotations

import numpy as np

from digitwatch import imaging, reading
from digitwatch.pipeline import classify_batch, prepare_bytes
from tests import scans


def read_all(classifier, pngs: list[bytes]) -> list:
    items = [prepare_bytes(f"{i}.png", png, 0.0, max_pixels=40_000_000) for i, png in enumerate(pngs)]
    return classify_batch(classifier, items, low_confidence=0.5)


def score(classifier, items: list[tuple[bytes, str]]) -> tuple[int, int, list]:
    """(read exactly, wrong but marked ok, the misreads)."""
    results = read_all(classifier, [png for png, _ in items])
    exact = sum(r.text == t for r, (_, t) in zip(results, items, strict=True))
    wrong_ok = sum(r.text != t and r.status == "ok" for r, (_, t) in zip(results, items, strict=True))
    misreads = [(t, r.text, r.status) for r, (_, t) in zip(results, items, strict=True) if r.text != t]
    return exact, wrong_ok, misreads


def numbers(mnist, seed: int, count: int, length, **kw) -> list[tuple[bytes, str]]:
    rng = np.random.default_rng(seed)
    return [(s.png, s.text) for s in scans.mnist_number_scans(mnist.x_test, mnist.y_test, count, length, rng, **kw)]


class TestPieces:
    def test_a_lifted_pen_piece_stays_with_its_digit(self, classifier, mnist):
        """A 5 or 7 inside a number, broken where the pen lifted: its bar is
        shorter than a digit, yet it belongs to the digit under it (it was
        dropped, and the 7 read as 1)."""
        rng = np.random.default_rng(31)
        pool = np.flatnonzero(np.isin(mnist.y_test, [5, 7]))
        items = []
        for _ in range(20):
            n = int(rng.integers(3, 6))
            idx = list(rng.choice(len(mnist.x_test), n, replace=False))
            at = int(rng.integers(n))
            idx[at] = int(rng.choice(pool))
            ink = scans.ink_from_number([mnist.x_test[i] for i in idx], int(rng.integers(40, 90)), rng, broken=at)
            png = scans.number_scan(ink, "", "clean", "gray8", rng, "broken").png
            items.append((png, "".join(str(int(mnist.y_test[i])) for i in idx)))
        exact, wrong_ok, misreads = score(classifier, items)
        assert exact >= 18 and wrong_ok <= 1, misreads

    def test_a_number_cropped_tight_to_the_page(self, classifier, mnist):
        """A field cut from a form: the digits touch the page's edges. They
        are digits, not a page frame (most such numbers lost digits, and
        were marked ok)."""
        exact, wrong_ok, misreads = score(classifier, numbers(mnist, 25, 20, (3, 5), variation="large"))
        assert exact >= 18 and wrong_ok <= 1, misreads


class TestCuts:
    def test_touching_pairs(self, classifier, mnist):
        exact, wrong_ok, misreads = score(classifier, numbers(mnist, 21, 20, (2, 4), layout="touching"))
        assert exact >= 16 and wrong_ok <= 1, misreads

    def test_overlapping_digits(self, classifier, mnist):
        """Neighbours overlapping by 5-15% of a digit's height: no straight
        column parts them; a cut path drifting around the strokes can."""
        exact, wrong_ok, misreads = score(classifier, numbers(mnist, 22, 20, (2, 4), layout="overlap"))
        assert exact >= 10 and wrong_ok <= 2, misreads

    def test_uneven_spacing(self, classifier, mnist):
        exact, wrong_ok, misreads = score(classifier, numbers(mnist, 23, 20, (3, 6), layout="uneven"))
        assert exact >= 17 and wrong_ok <= 1, misreads

    def test_ruled_line_under_the_number(self, classifier, mnist):
        rng = np.random.default_rng(26)
        items = []
        for k in range(12):
            idx = rng.choice(len(mnist.x_test), 4, replace=False)
            ink = scans.ink_from_number([mnist.x_test[i] for i in idx], 50, rng)
            items.append((scans.ruled_page(ink, k % 3), "".join(str(int(mnist.y_test[i])) for i in idx)))
        exact, wrong_ok, misreads = score(classifier, items)
        assert exact >= 11 and wrong_ok == 0, misreads

    def test_twelve_digits(self, classifier, mnist):
        exact, wrong_ok, misreads = score(classifier, numbers(mnist, 28, 12, 12))
        assert exact >= 10 and wrong_ok <= 1, misreads


class TestDecide:
    def test_ink_no_candidate_covers_is_not_a_digit(self):
        """Atoms whose crops all came out empty leave no reading of the whole
        ink: that is "not a digit", not an IndexError for the whole batch."""
        crop = np.zeros((1, imaging.SIDE, imaging.SIDE), np.float32)
        cands = reading.Candidates(crop, ((1, 2),), np.zeros(1, np.float32), 3, np.zeros(1, np.float32))
        probs = np.full((1, 10), 0.1)
        r = reading.decide(cands, probs)
        assert r.status == "low_confidence" and r.reason == reading.REASON_NOT_DIGIT and r.text == ""

    def test_one_digit_blob_is_read_as_a_single_digit(self, mnist):
        """The fast path: one digit-like blob gives exactly the single-digit input."""
        rng = np.random.default_rng(40)
        batch = list(scans.mnist_scans(mnist.x_test[:8], mnist.y_test[:8], "realistic", rng))
        fast = 0
        for s in batch:
            gray = imaging.decode_gray(s.png)
            cands = reading.read_scan(gray)
            if cands.atoms == 1 and len(cands.spans) == 1:
                fast += 1
                np.testing.assert_array_equal(cands.crops[0], imaging.normalize(gray))
        assert fast >= 6
