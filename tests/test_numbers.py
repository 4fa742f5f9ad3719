"""Reading whole numbers and refusing what is not one: real PNGs (MNIST *test*
digits composed by tests/scans.py) through the shipped model.

Small seeded sets, each asserting what a good model must do on most of them
(the model in models/ may change; these hold for today's 10-class model and
for a model with a "not a digit" class).
"""

from __future__ import annotations

import csv
import io
import json

import cv2
import numpy as np
import pytest

from digitwatch.errors import NoInkError
from digitwatch.reader import reading
from digitwatch.reader.prepare import classify_batch, prepare_bytes
from digitwatch.training import pngwrite, scans
from tests.conftest import run_cli

OLD_CSV_COLUMNS = ["file", "digit", "confidence", "status", "error", "sha256", "width", "height",
                   "model", "latency_ms"]


def read_all(classifier, pngs: list[bytes], **constraints) -> list:
    """The path classify and the daemon take: prepare each file, one batched model
    call, the model card's calibration and threshold (the defaults)."""
    items = [prepare_bytes(f"{i}.png", png, 0.0, max_pixels=40_000_000) for i, png in enumerate(pngs)]
    return classify_batch(classifier, items, low_confidence=None, **constraints)


def score(classifier, number_scans: list[scans.NumberScan]) -> tuple[int, int, list]:
    """(read exactly, wrong but marked ok, the misreads) over a set of scans."""
    results = read_all(classifier, [s.png for s in number_scans])
    exact = sum(r.text == s.text for r, s in zip(results, number_scans, strict=True))
    wrong_ok = sum(r.text != s.text and r.status == "ok" for r, s in zip(results, number_scans, strict=True))
    misreads = [(s.text, r.text, r.status, round(r.confidence or 0, 2))
                for r, s in zip(results, number_scans, strict=True) if r.text != s.text]
    return exact, wrong_ok, misreads


def numbers(mnist, seed: int, count: int, length, **kw) -> list[scans.NumberScan]:
    rng = np.random.default_rng(seed)
    return list(scans.mnist_number_scans(mnist.x_test, mnist.y_test, count, length, rng, **kw))


def has_reject_class(classifier) -> bool:
    probe = classifier.predict(np.zeros((1, 28, 28), np.float32))
    return probe.shape[1] > reading.REJECT


class TestLayouts:
    """Numbers as forms hold them: spaced, uneven, touching, drifting, broken, long."""

    def test_spaced_numbers_of_2_to_6_digits(self, classifier, mnist):
        exact, wrong_ok, misreads = score(classifier, numbers(mnist, 1, 10, (2, 6)))
        assert exact >= 9 and wrong_ok == 0, misreads

    def test_uneven_spacing(self, classifier, mnist):
        exact, wrong_ok, misreads = score(classifier, numbers(mnist, 2, 10, (3, 6), layout="uneven"))
        assert exact >= 9 and wrong_ok == 0, misreads

    def test_drifting_baseline(self, classifier, mnist):
        exact, wrong_ok, misreads = score(classifier, numbers(mnist, 3, 10, (3, 6), layout="drift"))
        assert exact >= 8 and wrong_ok <= 1, misreads

    def test_touching_pairs_are_split(self, classifier, mnist):
        exact, wrong_ok, misreads = score(classifier, numbers(mnist, 4, 10, 2, layout="touching"))
        assert exact >= 7 and wrong_ok <= 2, misreads

    def test_broken_digit_is_one_digit(self, classifier, mnist):
        """A digit broken in two by a pen lift (a 5 whose bar floats free) reads as one digit."""
        exact, wrong_ok, misreads = score(classifier, numbers(mnist, 5, 10, 1, broken=True))
        assert exact >= 8 and wrong_ok <= 1, misreads

    def test_broken_digit_inside_a_number(self, classifier, mnist):
        exact, wrong_ok, misreads = score(classifier, numbers(mnist, 6, 10, (3, 5), broken=True))
        assert exact >= 8 and wrong_ok <= 1, misreads

    def test_twelve_digit_strings(self, classifier, mnist):
        exact, wrong_ok, misreads = score(classifier, numbers(mnist, 7, 6, 12))
        assert exact >= 5 and wrong_ok == 0, misreads

    def test_realistic_pages(self, classifier, mnist):
        """Paper tone, uneven light, noise, blur, specks, ruled lines: combined at random."""
        exact, wrong_ok, misreads = score(classifier, numbers(mnist, 8, 10, (2, 6), variation="realistic"))
        assert exact >= 9 and wrong_ok == 0, misreads

    def test_ruled_line_under_the_number(self, classifier, mnist):
        """A form's line right under the digits, across the page, is not read."""
        rng = np.random.default_rng(9)
        pngs, texts = [], []
        for k in range(6):
            idx = rng.choice(len(mnist.x_test), 4, replace=False)
            ink = scans.ink_from_number([mnist.x_test[i] for i in idx], 50, rng)
            page = np.ones((ink.shape[0] + 80, ink.shape[1] + 120), np.float32)
            page[30 : 30 + ink.shape[0], 60 : 60 + ink.shape[1]] -= ink
            y = 30 + ink.shape[0] + (k % 3)  # just under the baseline, or grazing it
            page[y : y + 3, :] = np.minimum(page[y : y + 3, :], 0.35)
            pngs.append(pngwrite.encode_flavour(np.repeat(page[..., None], 3, 2), None, "rgb8"))
            texts.append("".join(str(int(mnist.y_test[i])) for i in idx))
        results = read_all(classifier, pngs)
        exact = sum(r.text == t for r, t in zip(results, texts, strict=True))
        assert exact >= 5, [(t, r.text) for r, t in zip(results, texts, strict=True)]

    def test_single_digits_keep_their_digit(self, classifier, mnist):
        """`digit` keeps its meaning: the digit when exactly one was read."""
        rng = np.random.default_rng(10)
        batch = list(scans.mnist_scans(mnist.x_test[:12], mnist.y_test[:12], "realistic", rng))
        results = read_all(classifier, [s.png for s in batch])
        assert all(r.digit == s.label and r.text == str(s.label) for r, s in zip(results, batch, strict=True))
        # The digit's own probability is the model's; the confidence is the calibrated whole answer.
        for r, s in zip(results, batch, strict=True):
            crops = prepare_bytes("x", s.png, 0.0, max_pixels=40_000_000).candidates.crops
            assert len(r.digits) == 1
            if len(crops) == 1:  # the fast path: the digit's probability is the model's own
                assert r.digits[0][1] == pytest.approx(float(classifier.predict(crops)[0, r.digit]), abs=1e-5)
        multi = read_all(classifier, [numbers(mnist, 11, 1, 3)[0].png])[0]
        assert multi.digit is None and len(multi.text) == 3


class TestRefusal:
    """What is not a digit string is never status ok."""

    def test_blank_box_is_no_ink(self, classifier):
        rng = np.random.default_rng(12)
        for _ in range(5):
            ink = scans.ink_from_mark("box", int(rng.integers(40, 90)), rng)
            scan = scans.number_scan(ink, "", "clean", "gray8", rng, "box")
            [result] = read_all(classifier, [scan.png])
            assert result.status == "error" and "no ink" in result.error

    def test_digits_inside_a_form_box_are_read(self, classifier, mnist):
        rng = np.random.default_rng(13)
        idx = rng.choice(len(mnist.x_test), 3, replace=False)
        ink = scans.ink_from_number([mnist.x_test[i] for i in idx], 50, rng, spacing=(0.2, 0.3))
        page = np.ones((ink.shape[0] + 120, ink.shape[1] + 160), np.float32)
        page[60 : 60 + ink.shape[0], 80 : 80 + ink.shape[1]] -= ink
        cv2.rectangle(page, (40, 25), (page.shape[1] - 40, page.shape[0] - 25), 0.2, 3)
        [result] = read_all(classifier, [pngwrite.encode_flavour(np.repeat(page[..., None], 3, 2), None, "rgb8")])
        assert result.text == "".join(str(int(mnist.y_test[i])) for i in idx)

    def test_blank_page_is_still_an_error(self, classifier):
        with pytest.raises(NoInkError):
            reading.read_number(pngwrite.encode(np.full((200, 300), 245, np.uint8), pngwrite.GRAY), classifier)

    @pytest.mark.parametrize("kind", ["letters", "tick", "cross", "scribble"])
    def test_letters_and_marks_are_not_ok(self, classifier, kind):
        assert has_reject_class(classifier), "the default model refuses with its 'not a digit' class"
        rng = np.random.default_rng(14)
        pngs = []
        for _ in range(20):
            if kind == "letters":
                # Not the letters that are written like digits (B 8, G 6, T 7, Z 2; README):
                # those are read as the digit, on purpose.
                ink = scans.ink_from_text("ACEFHKLMNPRUVWXY"[int(rng.integers(16))], 60, rng)
            else:
                ink = scans.ink_from_mark(kind, 60, rng)
            pngs.append(scans.number_scan(ink, "", "clean", "gray8", rng, kind).png)
        results = read_all(classifier, pngs)
        marked_ok = [r.text for r in results if r.status == "ok"]
        assert len(marked_ok) <= 1, marked_ok

    def test_letters_that_cut_like_two_digits_are_not_ok(self, classifier):
        """V, n, u, N and % are one blob whose strokes cut like two digits ("11",
        "17", "96"); the pair model, shown the whole blob, says it is not two
        digits. Before that counted, 7 of these 60 (training faces) were ok."""
        from digitwatch.training import evaluation, synth

        rng = np.random.default_rng(21)
        pngs = [evaluation.page_png(synth.glyph_ink("VnuN%"[i % 5], synth.TRAIN_FACES[i % 4], rng), rng, i, "letter")
                for i in range(60)]
        results = read_all(classifier, pngs)
        two = [r for r in results if len(r.text) == 2]
        assert len(two) >= 20  # most are read as two digits...
        assert not [r.text for r in two if r.status == "ok"]  # ...and none of those is ok
        assert all(r.reason == reading.REASON_NOT_DIGIT for r in two if r.status != "ok"
                   and r.confidence >= 0.965)

    def test_a_date_with_slashes_is_not_read_ok(self, classifier):
        """A date ("12/05", "3/11/26") is digits and slashes: a slash standing
        taller than the digits and leaning was read as a 1 and ok ("12105":
        30 of these 40). It is "not a digit" now (1 of 40 still ok)."""
        from digitwatch.training import evaluation, synth

        rng = np.random.default_rng(31)
        pngs = []
        for i in range(40):
            date = f"{rng.integers(1, 32)}/{rng.integers(1, 13):02d}" + (f"/{rng.integers(10, 100)}" if i % 2 else "")
            ink = synth.glyph_ink(date, synth.TRAIN_FACES[i % len(synth.TRAIN_FACES)], rng)
            pngs.append(evaluation.page_png(ink, rng, i, "number"))
        results = read_all(classifier, pngs)
        marked_ok = [r.text for r in results if r.status == "ok"]
        assert len(marked_ok) <= 2, marked_ok

    def test_a_percentage_is_not_read_ok(self, classifier):
        """"83%": the % sign's strokes cut like two digits ("8396", ok: 20 of
        these 40). The pair model, shown the sign whole, says it is not two
        digits: the answer is "not a digit" now (2 of 40 still ok)."""
        from digitwatch.training import evaluation, synth

        rng = np.random.default_rng(32)
        pngs = [evaluation.page_png(synth.glyph_ink(f"{rng.integers(1, 100)}%", synth.TRAIN_FACES[i % 4], rng),
                                    rng, i, "number") for i in range(40)]
        results = read_all(classifier, pngs)
        marked_ok = [r.text for r in results if r.status == "ok"]
        assert len(marked_ok) <= 3, marked_ok

    def test_brackets_and_marks_of_punctuation_are_not_ok(self, classifier):
        """( ) [ ] { } ! ? alone, in a face the reject head never saw: each read
        as a sure 1 (or 7) and ok until they were drawn among its non-digits
        (36 of these 40 ok before, 3 now; a / or a | stays a 1, on purpose)."""
        from digitwatch.training import evaluation, synth

        rng = np.random.default_rng(33)
        pngs = [evaluation.page_png(synth.glyph_ink("()[]{}!?"[i % 8], synth.HELD_OUT_FACE, rng), rng, i, "letter")
                for i in range(40)]
        marked_ok = [r.text for r in read_all(classifier, pngs) if r.status == "ok"]
        assert len(marked_ok) <= 4, marked_ok

    def test_a_second_line_of_digits_is_never_left_out_and_ok(self, classifier, mnist):
        """Two numbers on two lines: the reader reads one row; the other line
        was left out and the answer ok (13 of these 40: "4519" over "346" read
        "346", ok at 0.99). Digit-sized writing left out of the row read makes
        the answer low_confidence with its own reason; the same numbers on one
        line each keep theirs."""
        rng = np.random.default_rng(4)
        two, one = [], []
        for _ in range(40):
            lines = []
            for _ in range(2):
                idx = rng.choice(len(mnist.x_test), int(rng.integers(2, 5)), replace=False)
                lines.append(scans.ink_from_number([mnist.x_test[k] for k in idx], 50, rng, spacing=(0.15, 0.4)))
            gap = int(rng.integers(10, 60))
            width = max(ink.shape[1] for ink in lines) + 80
            page = np.ones((sum(ink.shape[0] for ink in lines) + gap + 80, width), np.float32)
            y = 40
            for ink in lines:
                x = 40 + int(rng.integers(0, width - 80 - ink.shape[1] + 1))
                page[y : y + ink.shape[0], x : x + ink.shape[1]] -= ink
                single = np.ones((ink.shape[0] + 80, width), np.float32)
                single[40 : 40 + ink.shape[0], x : x + ink.shape[1]] -= ink
                one.append(scans.gray_png(single))
                y += ink.shape[0] + gap
            two.append(scans.gray_png(page))
        results = read_all(classifier, two)
        assert not [r.text for r in results if r.status == "ok"]
        assert sum(r.reason == reading.REASON_UNREAD for r in results) >= 10
        assert not [r.text for r in read_all(classifier, one) if r.reason == reading.REASON_UNREAD]

    @pytest.mark.xfail(strict=True, reason="known: heavy or blurred paper noise alone can form a stroke read as a "
                       "sure 1 (2 of these 60 pages, before this test and after); open in the issue notes")
    def test_paper_noise_alone_is_never_ok(self, classifier):
        """Pages of paper and noise alone (tones, uneven light, blur): no answer
        may be ok. Found by the attack pass: 2 of 60 read "1", ok at 0.99."""
        from digitwatch.training.scans import gray_png

        rng = np.random.default_rng(0)
        pngs = []
        for i in range(60):
            h, w = rng.integers(40, 900, 2)
            g = np.full((h, w), rng.uniform(0.3, 0.95), np.float32)
            g += rng.normal(0, rng.uniform(0.005, 0.08), (h, w)).astype(np.float32)
            if i % 3 == 0:
                g *= np.linspace(0.6, 1, w)[None].astype(np.float32)
            if i % 4 == 0:
                g = cv2.GaussianBlur(g, (0, 0), rng.uniform(0.5, 3))
            pngs.append(gray_png(np.clip(g, 0, 1)))
        assert not [r.text for r in read_all(classifier, pngs) if r.status == "ok"]

    def test_a_filled_mark_is_not_a_digit(self, classifier, mnist):
        """A blacked-in form bubble or dot was read as a sure "0" and ok (0.96)
        by both models; alone or beside a number, it is not a digit. Real
        digits as bold as MNIST's boldest stay digits."""
        pages, rng = [], np.random.default_rng(23)
        for r in (12, 25, 40, 55):
            page = np.full((240, 320), 250, np.uint8)
            cv2.circle(page, (160, 120), r, 20, -1)
            pages.append(pngwrite.encode(page, pngwrite.GRAY))
        ink = scans.ink_from_number([mnist.x_test[i] for i in range(3)], 60, rng, spacing=(0.3, 0.4))
        page = np.ones((ink.shape[0] + 80, ink.shape[1] + 160), np.float32)
        page[40 : 40 + ink.shape[0], 40 : 40 + ink.shape[1]] -= ink
        cv2.circle(page, (ink.shape[1] + 100, 40 + ink.shape[0] // 2), 22, 0.05, -1)
        pages.append(pngwrite.encode(np.round(np.clip(page, 0, 1) * 255).astype(np.uint8), pngwrite.GRAY))
        for result in read_all(classifier, pages):
            assert result.status == "low_confidence" and result.reason == reading.REASON_NOT_DIGIT, result
        bold = mnist.x_test[:500]
        assert not any(reading._filled(d / 255.0) for d in bold)

    def test_worst_valid_pages_are_never_ok(self, classifier):
        """Pages that are valid PNGs but no writing: half black (a lid left
        open), a checkerboard, 50% dither, one dark pixel, a 4x4 page, a solid
        block. Each is an error line or not ok, never a crash or a digit."""
        yy, xx = np.mgrid[0:120, 0:160]
        half = np.full((120, 160), 255, np.uint8)
        half[:, :80] = 0
        pixel = np.full((120, 160), 255, np.uint8)
        pixel[60, 80] = 0
        block = np.full((120, 160), 255, np.uint8)
        block[30:90, 50:95] = 0
        tiny = np.full((4, 4), 255, np.uint8)
        tiny[1:3, 1:3] = 0
        pages = [half, half.T.copy(), (((yy + xx) % 2) * 255).astype(np.uint8),
                 (((yy // 4 + xx // 4) % 2) * 255).astype(np.uint8),
                 (np.random.default_rng(5).random((120, 160)) < 0.5).astype(np.uint8) * 255, pixel, tiny, block]
        results = read_all(classifier, [pngwrite.encode(p, pngwrite.GRAY) for p in pages])
        assert [r.status for r in results if r.status == "ok"] == [], results

    def test_hostile_form_marks_are_never_ok(self, classifier):
        """The worst valid pages for the box, ring and wall handling: 200 rings
        each round a dot in one row, 2,000 walls between two rules, 15 nested
        boxes, 5 nested rings, an empty 40x40 grid, a box whose walls are
        thicker than its hole. Each is an error line or not ok, never a crash
        and never a digit string marked ok (the reader before rings were
        dropped read the nested rings "60", ok at 0.997; each page reads in
        0.5 s of CPU at most, measured)."""
        pages = []
        g = np.full((120, 200 * 60), 255, np.uint8)
        for i in range(200):
            cv2.circle(g, (30 + 60 * i, 60), 25, 0, 2)
            cv2.circle(g, (30 + 60 * i, 60), 8, 0, -1)
        pages.append(g)
        g = np.full((100, 8000), 255, np.uint8)
        g[20:22], g[80:82], g[20:82, ::4] = 0, 0, 0
        pages.append(g)
        g = np.full((400, 400), 255, np.uint8)
        for k in range(0, 180, 12):
            cv2.rectangle(g, (10 + k, 10 + k), (390 - k, 390 - k), 0, 2)
        pages.append(g)
        g = np.full((400, 400), 255, np.uint8)
        for r in (180, 140, 100, 60, 20):
            cv2.circle(g, (200, 200), r, 0, 3)
        pages.append(g)
        g = np.full((1200, 1200), 255, np.uint8)
        g[::30], g[:, ::30] = 0, 0
        pages.append(g)
        g = np.full((300, 300), 255, np.uint8)
        cv2.rectangle(g, (20, 20), (280, 280), 0, 40)
        pages.append(g)
        results = read_all(classifier, [pngwrite.encode(p, pngwrite.GRAY) for p in pages])
        assert len(results) == len(pages) and [r for r in results if r.status == "ok"] == [], results

    def test_reject_class_means_not_a_digit(self):
        """With an 11-class model, a candidate whose most probable class is
        'not a digit' makes the reading not ok, whatever its digit probabilities."""
        crop = np.zeros((1, 28, 28), np.float32)
        cands = reading.Candidates(crop, ((0, 1),), np.zeros(1, np.float32), 1)
        probs = np.array([[0.0] * 4 + [0.45] + [0.0] * 5 + [0.55]])
        r = reading.decide(cands, probs)
        assert r.status == "low_confidence" and r.reason == reading.REASON_NOT_DIGIT
        ten = reading.decide(cands, probs[:, :10] / 0.45)
        assert ten.status == "ok" and ten.text == "4"

    def test_far_too_wide_mark_is_not_a_digit(self, classifier):
        """One stroke far wider than tall that no cut explains: shape evidence alone."""
        page = np.ones((160, 400), np.float32)
        cv2.ellipse(page, (200, 80), (150, 30), 0, 0, 360, 0.1, 6)
        [result] = read_all(classifier, [pngwrite.encode(np.round(page * 255).astype(np.uint8), pngwrite.GRAY)])
        assert result.status != "ok", result


class TestConstraints:
    """--expect digit and --length: anything that does not fit is not ok."""

    def test_expect_digit_refuses_a_number(self, classifier, mnist):
        batch = numbers(mnist, 15, 4, 3)
        for r in read_all(classifier, [s.png for s in batch], expect="digit"):
            assert r.status == "low_confidence" and r.reason.startswith("expected 1 digit")

    def test_expect_digit_accepts_a_digit(self, classifier, mnist):
        rng = np.random.default_rng(16)
        batch = list(scans.mnist_scans(mnist.x_test[20:26], mnist.y_test[20:26], "clean", rng))
        results = read_all(classifier, [s.png for s in batch], expect="digit")
        assert [r.digit for r in results] == [s.label for s in batch]
        assert all(r.status == "ok" for r in results)

    def test_length_refuses_other_lengths(self, classifier, mnist):
        batch = numbers(mnist, 17, 4, 3)
        for r in read_all(classifier, [s.png for s in batch], length="5"):
            assert r.status == "low_confidence" and r.reason.startswith("expected 5 digits"), r
        for r in read_all(classifier, [s.png for s in batch], length="5-7"):
            assert r.status == "low_confidence" and r.reason.startswith("expected 5-7 digits"), r

    def test_length_range_accepts_fitting_numbers(self, classifier, mnist):
        batch = numbers(mnist, 18, 6, (3, 4))
        results = read_all(classifier, [s.png for s in batch], length="3-4")
        assert sum(r.text == s.text and r.status == "ok" for r, s in zip(results, batch, strict=True)) >= 5

    @pytest.mark.parametrize(("expect", "length", "bounds"), [
        (None, None, (1, reading.MAX_DIGITS)), ("number", "5", (5, 5)), (None, "4-6", (4, 6)),
        ("digit", None, (1, 1)), ("digit", "1", (1, 1)),
    ])
    def test_parsing(self, expect, length, bounds):
        c = reading.constraints_for(expect, length)
        assert (c.min_len, c.max_len) == bounds

    @pytest.mark.parametrize(("expect", "length"), [
        ("letters", None), (None, "x"), (None, "6-4"), (None, "0"), (None, "1-2-3"), ("digit", "3"),
    ])
    def test_bad_constraints_are_refused(self, expect, length):
        with pytest.raises(ValueError):
            reading.constraints_for(expect, length)


class TestOutputs:
    """The CLI's records: CSV grows only at the end, JSON carries per-digit confidences."""

    @pytest.fixture()
    def files(self, mnist, tmp_path):
        batch = numbers(mnist, 19, 2, 4) + numbers(mnist, 20, 1, 1)
        paths = []
        for i, s in enumerate(batch):
            p = tmp_path / f"n{i}-{s.text}.png"
            p.write_bytes(s.png)
            paths.append(p)
        return paths

    def test_csv_columns_appended_at_the_end(self, files):
        r = run_cli("classify", *map(str, files), "--format", "csv")
        assert r.returncode == 0, r.stderr
        header = r.stdout.splitlines()[0].split(",")
        assert header[: len(OLD_CSV_COLUMNS)] == OLD_CSV_COLUMNS
        assert header[len(OLD_CSV_COLUMNS) :] == ["text", "reason"]
        rows = list(csv.DictReader(io.StringIO(r.stdout)))
        assert [row["text"] for row in rows] == [f.stem.split("-")[1] for f in files]
        assert rows[-1]["digit"] == rows[-1]["text"] and rows[0]["digit"] == ""

    def test_json_per_digit_confidences(self, files):
        r = run_cli("classify", *map(str, files), "--format", "jsonl")
        assert r.returncode == 0, r.stderr
        for line, f in zip(r.stdout.splitlines(), files, strict=True):
            row = json.loads(line)
            assert row["text"] == f.stem.split("-")[1]
            assert [d["digit"] for d in row["digits"]] == [int(c) for c in row["text"]]
            assert all(0.0 <= d["confidence"] <= 1.0 for d in row["digits"])
            assert 0.0 <= row["confidence"] <= 1.0

    def test_cli_constraints(self, files):
        r = run_cli("classify", str(files[0]), "--format", "jsonl", "--expect", "digit")
        row = json.loads(r.stdout)
        assert r.returncode == 0 and row["status"] == "low_confidence" and row["reason"].startswith("expected 1")
        r = run_cli("classify", str(files[0]), "--format", "jsonl", "--length", "6")
        assert json.loads(r.stdout)["reason"].startswith("expected 6 digits")
        assert run_cli("classify", str(files[0]), "--length", "six").returncode == 2

    @pytest.mark.system
    def test_watch_routes_refusals_to_review(self, files, tmp_path):
        """The daemon sends what does not fit (here: --expect digit) to review/."""
        inbox = tmp_path / "in"
        inbox.mkdir()
        for f in files:
            (inbox / f.name).write_bytes(f.read_bytes())
        out = tmp_path / "out"
        r = run_cli("watch", "--once", "--inbox", str(inbox), "--processed", str(out / "processed"),
                    "--failed", str(out / "failed"), "--review", str(out / "review"),
                    "--results", str(out / "results.jsonl"), "--format", "jsonl", "--expect", "digit",
                    "--log-format", "json", timeout=180)
        assert r.returncode == 0, r.stderr
        rows = {json.loads(line)["file"]: json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()}
        reviewed = {p.name for p in (out / "review").rglob("*.png")}
        processed = {p.name for p in (out / "processed").rglob("*.png")}
        assert reviewed == {f.name for f in files[:2]} and processed == {files[2].name}
        assert rows[files[2].name]["digits"][0]["digit"] == int(files[2].stem.split("-")[1])

    @pytest.mark.system
    def test_watch_reads_overlapping_digits_with_the_pair_model(self, classifier, mnist, tmp_path):
        """The daemon's worker processes carry the pair pictures to the pair
        model: its lines for overlapping digits match the in-process reading
        (text and confidence), most are read exactly, and `model` names the
        pair model."""
        batch = numbers(mnist, 41, 10, 2, layout="overlap")
        inbox = tmp_path / "in"
        inbox.mkdir()
        for i, s in enumerate(batch):
            (inbox / f"o{i}.png").write_bytes(s.png)
        out = tmp_path / "out"
        r = run_cli("watch", "--once", "--inbox", str(inbox), "--processed", str(out / "processed"),
                    "--failed", str(out / "failed"), "--results", str(out / "results.jsonl"),
                    "--format", "jsonl", "--log-format", "json", timeout=180)
        assert r.returncode == 0, r.stderr
        rows = {json.loads(line)["file"]: json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()}
        here = read_all(classifier, [s.png for s in batch])
        assert len(rows) == len(batch)
        for i, want in enumerate(here):
            row = rows[f"o{i}.png"]
            assert row["text"] == want.text and row["confidence"] == pytest.approx(want.confidence, abs=1e-4)
            assert "+pairs.tflite@" in row["model"]
        assert sum(rows[f"o{i}.png"]["text"] == s.text for i, s in enumerate(batch)) >= 8
