"""Metrics on MNIST's test set, on synthetic numbers and non-digits rendered as
realistic scans, and the report images. Pure numpy and OpenCV, so `evaluate`
works with LiteRT alone.

The scan sets are built from MNIST *test* digits (numbers of 1-12 digits) and
drawn non-digits (letters in the Hershey face training never drew letters in,
other seeds), put on pages by the scan renderer (training/scans.py,
so `evaluate --numbers/--non-digits` runs from a source checkout).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from digitwatch.reader.confidence import Thresholds
from digitwatch.reader.contract import DIGITS, REJECT
from digitwatch.training import pngwrite, scans
from digitwatch.training.calibration import Reliability, reliability


@dataclass(frozen=True)
class ClassScore:
    digit: int
    precision: float
    recall: float
    support: int


@dataclass(frozen=True)
class Evaluation:
    """Accuracy, per-class precision/recall and the confusion matrix (rows: truth)."""

    model: str
    count: int
    accuracy: float  # the digit answered (argmax over 0-9, as the result's `digit`) is right
    per_class: list[ClassScore]
    confusion: list[list[int]]
    refused: int = 0  # answered "not a digit" (11-class models): still a digit in `digit`, never ok

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, classes: int = DIGITS) -> np.ndarray:
    """Rows: true digit; columns: predicted class (an 11th column for "not a digit")."""
    cm = np.zeros((DIGITS, classes), np.int64)
    np.add.at(cm, (truth.astype(np.int64), predicted.astype(np.int64)), 1)
    return cm


def evaluate(probabilities: np.ndarray, labels: np.ndarray, *, model: str) -> Evaluation:
    predicted = np.argmax(probabilities, axis=1)
    cm = confusion_matrix(labels, predicted, probabilities.shape[1])
    per_class = []
    for d in range(DIGITS):
        tp = int(cm[d, d])
        predicted_d, actual_d = int(cm[:, d].sum()), int(cm[d].sum())
        per_class.append(
            ClassScore(
                digit=d,
                precision=tp / predicted_d if predicted_d else 0.0,
                recall=tp / actual_d if actual_d else 0.0,
                support=actual_d,
            )
        )
    return Evaluation(
        model=model,
        count=len(labels),
        accuracy=float(np.mean(np.argmax(probabilities[:, :DIGITS], axis=1) == labels)),
        per_class=per_class,
        confusion=cm.tolist(),
        refused=int(np.sum(predicted == REJECT)) if probabilities.shape[1] > REJECT else 0,
    )


def format_table(ev: Evaluation) -> str:
    lines = [
        f"model     {ev.model}",
        f"digits    {ev.count}",
        f"accuracy  {ev.accuracy:.4f}  ({round(ev.accuracy * ev.count)}/{ev.count}, the digit answered)",
        f"refused   {ev.refused}  (answered 'not a digit': status low_confidence)",
        "",
        "digit  precision  recall  support",
    ]
    lines += [f"{c.digit:>5}  {c.precision:>9.4f}  {c.recall:>6.4f}  {c.support:>7}" for c in ev.per_class]
    lines += ["", "confusion (rows: true digit, columns: predicted)"]
    lines.append("     " + "".join(f"{_class_name(d):>6}" for d in range(len(ev.confusion[0]))))
    lines += [f"{d:>5}" + "".join(f"{v:>6}" for v in row) for d, row in enumerate(ev.confusion)]
    return "\n".join(lines) + "\n"


def _class_name(c: int) -> str:
    return "not" if c == REJECT else str(c)


def confusion_png(ev: Evaluation, path: Path) -> None:
    """A heat map of the confusion matrix with counts, log-scaled so errors show."""
    cell, margin = 56, 40
    cm = np.array(ev.confusion, np.float64)
    columns = cm.shape[1]
    size = margin + cell * DIGITS
    width = margin + cell * columns
    img = np.full((size + 30, max(width, 420), 3), 255, np.uint8)
    scale = np.log1p(cm) / max(np.log1p(cm.max()), 1e-9)
    for p in range(DIGITS, columns):
        cv2.putText(img, _class_name(p), (margin + p * cell + 10, 28), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1)
    for t in range(DIGITS):
        for p in range(columns):
            shade = int(255 - 200 * scale[t, p])
            colour = (255, shade, shade) if t == p else (shade, shade, 255)
            x, y = margin + p * cell, margin + t * cell
            cv2.rectangle(img, (x, y), (x + cell - 2, y + cell - 2), colour, -1)
            text = str(int(cm[t, p]))
            cv2.putText(img, text, (x + 6, y + 34), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(img, str(t), (12, margin + t * cell + 34), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1)
        cv2.putText(img, str(t), (margin + t * cell + 20, 28), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1)
    cv2.putText(img, f"rows: true, columns: predicted   accuracy {ev.accuracy:.4f}",
                (8, size + 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.imwrite(str(path), img)


def worst_errors_png(
    images: np.ndarray, probabilities: np.ndarray, labels: np.ndarray, path: Path, *, count: int = 64
) -> int:
    """A grid of the misclassified digits the model was surest about, labelled true->predicted."""
    predicted = np.argmax(probabilities, axis=1)
    wrong = np.flatnonzero(predicted != labels)
    wrong = wrong[np.argsort(-probabilities[wrong, predicted[wrong]])][:count]
    cols, tile = 8, 84
    rows = max(1, (len(wrong) + cols - 1) // cols)
    grid = np.full((rows * (tile + 18), cols * tile), 255, np.uint8)
    for k, i in enumerate(wrong):
        r, c = divmod(k, cols)
        digit = 255 - cv2.resize(images[i], (tile - 4, tile - 4), interpolation=cv2.INTER_NEAREST)
        y, x = r * (tile + 18), c * tile
        grid[y + 2 : y + tile - 2, x + 2 : x + tile - 2] = digit
        label = f"{labels[i]}->{predicted[i]} {probabilities[i, predicted[i]]:.2f}"
        cv2.putText(grid, label, (x + 4, y + tile + 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 0, 1, cv2.LINE_AA)
    cv2.imwrite(str(path), grid)
    return len(wrong)


# ---------------------------------------------------------------- numbers and non-digits on scans


@dataclass(frozen=True)
class Answer:
    """What a reader made of one scan: the text ("" = refused or nothing read),
    the confidence that this whole answer is right, and whether it is marked ok."""

    text: str
    confidence: float
    ok: bool


Reader = Callable[[bytes], Answer]


def single_digit_reader(classifier, threshold: float | Thresholds) -> Reader:
    """Today's path: one digit per scan (load_digit), argmax over the classes; a
    win for "not a digit" is a refusal."""
    from digitwatch.errors import ImageError
    from digitwatch.reader.imaging import load_digit

    single = Thresholds.of(threshold).single  # one digit per scan: always the one-digit threshold

    def read(png: bytes) -> Answer:
        try:
            pixels = load_digit(png).pixels
        except ImageError:
            return Answer("", 0.0, False)
        p = classifier.predict(pixels[None])[0]
        best = int(np.argmax(p))
        if best == REJECT:
            return Answer("", float(p[:REJECT].max()), False)
        return Answer(str(best), float(p[best]), float(p[best]) >= single)

    return read


def number_reader(classifier, threshold: float | Thresholds) -> Reader:
    """The product's path: `reading.read_number` (cuts, one model call, whole-answer
    confidence). The answer is the result line's text and confidence, whatever
    the status: a reading refused as "not a digit" still states its text, with
    the confidence that it is right (calibrated: low)."""
    from digitwatch.errors import ImageError
    from digitwatch.reader.reading import STATUS_OK, read_number

    def read(png: bytes) -> Answer:
        try:
            r = read_number(png, classifier, threshold=threshold)
        except ImageError:
            return Answer("", 0.0, False)
        return Answer(r.text, float(r.confidence), r.status == STATUS_OK)

    return read


def default_reader(classifier, threshold: float | Thresholds) -> tuple[str, Reader]:
    """The number reader when this checkout has one, else the single-digit path."""
    try:
        return "number", number_reader(classifier, threshold)
    except ImportError:
        return "single-digit", single_digit_reader(classifier, threshold)


def page_png(ink: np.ndarray, rng: np.random.Generator, index: int, source: str) -> bytes:
    """Put ink (float, high = ink, drawn at any scale) on a realistic page."""
    variation = scans.VARIATIONS[index % len(scans.VARIATIONS)]
    flavour = pngwrite.FLAVOURS[(index * 7) % len(pngwrite.FLAVOURS)]
    tall = max(ink.shape[0], 1)

    def ink_for(height: int) -> np.ndarray:
        s = height / tall
        interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
        return np.clip(cv2.resize(ink, None, fx=s, fy=s, interpolation=interp), 0, 1)

    return scans.make_scan(ink_for, 0, variation, flavour, rng, source).png


def number_scans(count: int, seed: int, images: np.ndarray, labels: np.ndarray,
                 lengths: tuple[int, int] = (1, 12)) -> list[tuple[bytes, str]]:
    """(png, digits) for numbers made of the given digits (MNIST test for reporting)."""
    from digitwatch.training import synth

    rng = np.random.default_rng(seed)
    out = []
    for i, text in enumerate(synth.number_strings(count, rng, lengths)):
        out.append((page_png(synth.number_ink(text, images, labels, rng), rng, i, "number"), text))
    return out


NON_DIGIT_KINDS = ("letter", "letter_pair", "tick", "cross", "scribble", "shape", "smudge", "specks")


def non_digit_scans(count: int, seed: int, faces: list[int] | None = None) -> list[tuple[bytes, str]]:
    """(png, kind): letters and pairs (by default in the face training never drew
    letters in), pen marks, shapes (a blank form box among them), smudges, specks."""
    from digitwatch.training import synth

    rng = np.random.default_rng(seed)
    kinds = {k.name: k for k in synth.REJECT_KINDS}
    out = []
    for i in range(count):
        name = NON_DIGIT_KINDS[i % len(NON_DIGIT_KINDS)]
        if name.startswith("letter"):
            ink = kinds[name].make(rng, faces or [synth.HELD_OUT_FACE])
        else:
            ink = synth.reject_ink(kinds[name], rng)
        assert ink is not None, name
        out.append((page_png(ink, rng, i, name), name))
    return out


@dataclass(frozen=True)
class ScanReport:
    """What `evaluate` reports on the scan sets (fractions in [0, 1])."""

    model: str
    reader: str
    threshold: Thresholds
    numbers: int
    exact: float
    exact_by_length: dict[int, float]
    numbers_marked_ok: float  # coverage
    ok_accuracy: float  # of number answers marked ok
    wrong_marked_ok: float  # share of all number scans
    non_digits: int
    non_digits_marked_ok: float
    non_digits_marked_ok_by_kind: dict[str, float]
    ece: float
    reliability: Reliability = field(repr=False)
    seconds: float = 0.0
    # Single-digit scans (MNIST test digits, every variation), when asked for:
    digits: int = 0
    digits_right: float = 0.0  # the digit answered is the digit
    digits_marked_ok: float = 0.0
    digits_ok_right: float = 1.0  # of those marked ok
    ece_by_set: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def score_scans(numbers: list[tuple[bytes, str]], non_digits: list[tuple[bytes, str]],
                read: Reader, *, model: str, reader: str, threshold: float | Thresholds,
                digits: Sequence[tuple[bytes, str]] = ()) -> ScanReport:
    """Read every scan and score: exact strings, ok answers, refusals, calibration.
    Calibration is over every answer given (non-empty text): a stated answer's
    confidence against whether it is right (any answer to a non-digit is wrong)."""
    started = time.monotonic()
    num = [(read(png), truth) for png, truth in numbers]
    non = [(read(png), kind) for png, kind in non_digits]
    right = np.array([a.text == t for a, t in num], bool)
    ok = np.array([a.ok for a, _ in num], bool)
    by_length: dict[int, list[bool]] = {}
    for (_, t), r in zip(num, right, strict=True):
        by_length.setdefault(len(t), []).append(bool(r))
    non_ok = np.array([a.ok for a, _ in non], bool)
    by_kind: dict[str, list[bool]] = {}
    for (a, k) in non:
        by_kind.setdefault(k, []).append(a.ok)
    one = [(read(png), truth) for png, truth in digits]
    one_right = np.array([a.text == t for a, t in one], bool)
    one_ok = np.array([a.ok for a, _ in one], bool)
    sets = {
        "numbers": [(a.confidence, a.text == t) for a, t in num if a.text],
        "non_digits": [(a.confidence, False) for a, _ in non if a.text],
        "digits": [(a.confidence, a.text == t) for a, t in one if a.text],
    }
    answered = [x for v in sets.values() for x in v]
    conf = np.array([c for c, _ in answered], np.float64)
    good = np.array([g for _, g in answered], bool)
    rel = reliability(conf, good)
    ece_by_set = {k: reliability(np.array([c for c, _ in v]), np.array([g for _, g in v], bool)).ece
                  for k, v in sets.items() if v}
    n = max(len(num), 1)
    return ScanReport(
        model=model, reader=reader, threshold=Thresholds.of(threshold),
        numbers=len(num), exact=float(right.mean()) if len(num) else 0.0,
        exact_by_length={k: float(np.mean(v)) for k, v in sorted(by_length.items())},
        numbers_marked_ok=float(ok.sum() / n),
        ok_accuracy=float(right[ok].mean()) if ok.any() else 1.0,
        wrong_marked_ok=float((ok & ~right).sum() / n),
        non_digits=len(non), non_digits_marked_ok=float(non_ok.mean()) if len(non) else 0.0,
        non_digits_marked_ok_by_kind={k: float(np.mean(v)) for k, v in sorted(by_kind.items())},
        ece=rel.ece, reliability=rel, seconds=round(time.monotonic() - started, 1),
        digits=len(one), digits_right=float(one_right.mean()) if len(one) else 0.0,
        digits_marked_ok=float(one_ok.mean()) if len(one) else 0.0,
        digits_ok_right=float(one_right[one_ok].mean()) if one_ok.any() else 1.0,
        ece_by_set=ece_by_set,
    )


def format_scan_report(r: ScanReport) -> str:
    lines = [
        f"scan sets  reader {r.reader}, ok when confidence >= {r.threshold}",
        f"numbers    {r.numbers} scans of MNIST test digits, 1-12 digits",
        f"exact      {r.exact:.4f}",
        "by length  " + "  ".join(f"{k}:{v:.3f}" for k, v in r.exact_by_length.items()),
        f"marked ok  {r.numbers_marked_ok:.4f} of numbers (coverage), right {r.ok_accuracy:.4f} of those",
        f"wrong+ok   {r.wrong_marked_ok:.4f} of all number scans",
        f"non-digits {r.non_digits} scans, marked ok {r.non_digits_marked_ok:.4f}",
        "by kind    " + "  ".join(f"{k}:{v:.3f}" for k, v in r.non_digits_marked_ok_by_kind.items()),
        f"ECE        {r.ece:.4f} over {sum(r.reliability.count)} answers ({len(r.reliability.count)} bins); "
        + "  ".join(f"{k}:{v:.4f}" for k, v in r.ece_by_set.items()),
    ]
    if r.digits:
        lines[1:1] = [
            f"digits     {r.digits} single-digit scans of MNIST test digits, every variation",
            f"           right {r.digits_right:.4f}, marked ok {r.digits_marked_ok:.4f}, "
            f"right of those ok {r.digits_ok_right:.4f}",
        ]
    return "\n".join(lines) + "\n"


def reliability_png(rel: Reliability, path: Path, *, title: str = "") -> None:
    """Reliability diagram: per confidence bin, accuracy (bar) against the diagonal,
    with each bin's share of answers underneath."""
    size, margin = 420, 50
    img = np.full((size + 2 * margin + 40, size + 2 * margin, 3), 255, np.uint8)
    x0, y0 = margin, margin + size  # origin at the bottom left

    def at(c: float, a: float) -> tuple[int, int]:
        return int(x0 + c * size), int(y0 - a * size)

    bins = len(rel.count)
    total = max(sum(rel.count), 1)
    for b in range(bins):
        lo, hi = rel.edges[b], rel.edges[b + 1]
        if rel.count[b]:
            cv2.rectangle(img, at(lo, 0), at(hi, rel.accuracy[b]), (200, 140, 60), -1)
            cv2.rectangle(img, at(lo, 0), at(hi, rel.accuracy[b]), (90, 60, 20), 1)
            cv2.circle(img, at((lo + hi) / 2, rel.confidence[b]), 3, (0, 0, 200), -1)
        share = rel.count[b] / total
        bar = (at(hi, 0)[0] - 1, y0 + 8 + int(24 * share**0.5))
        cv2.rectangle(img, (at(lo, 0)[0], y0 + 8), bar, (120, 120, 120), -1)
    cv2.line(img, at(0, 0), at(1, 1), (0, 0, 0), 1, cv2.LINE_AA)
    cv2.rectangle(img, at(0, 0), at(1, 1), (0, 0, 0), 1)
    for v in (0.0, 0.5, 1.0):
        cv2.putText(img, f"{v:.1f}", (at(v, 0)[0] - 10, y0 + 50), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 0, 1, cv2.LINE_AA)
        cv2.putText(img, f"{v:.1f}", (8, at(0, v)[1] + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 0, 1, cv2.LINE_AA)
    cv2.putText(img, f"{title}  ECE {rel.ece:.4f}  (bars: accuracy, dots: mean confidence)",
                (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "confidence", (x0 + size // 2 - 40, y0 + 70), cv2.FONT_HERSHEY_SIMPLEX, 0.45, 0, 1, cv2.LINE_AA)
    cv2.imwrite(str(path), img)


def digit_scans(count: int, seed: int, images: np.ndarray, labels: np.ndarray) -> list[tuple[bytes, str]]:
    """(png, digit) single-digit scans cycling through every variation."""
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(images), count, replace=False)
    out = []
    for i, k in enumerate(pick):
        variation = scans.VARIATIONS[i % len(scans.VARIATIONS)]
        scan = next(scans.mnist_scans(images[k : k + 1], labels[k : k + 1], variation, rng))
        out.append((scan.png, str(scan.label)))
    return out


def evaluate_scans(classifier, mnist, *, numbers: int, non_digits: int, seed: int,
                   threshold: float | Thresholds,
                   report: Path | None = None, digits: int = 0) -> ScanReport:
    """Build the scan sets, read them with the best reader available, score, and
    write reliability.png into `report`."""
    name, read = default_reader(classifier, threshold)
    result = score_scans(
        number_scans(numbers, seed, mnist.x_test, mnist.y_test),
        non_digit_scans(non_digits, seed + 1),
        read, model=classifier.model_id, reader=name, threshold=threshold,
        digits=digit_scans(digits, seed + 2, mnist.x_test, mnist.y_test) if digits else [],
    )
    if report is not None:
        report.mkdir(parents=True, exist_ok=True)
        reliability_png(result.reliability, report / "reliability.png", title=f"{name} reader")
    return result
