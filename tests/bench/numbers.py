"""How well the number reader reads whole numbers, and why it misreads them.

    python -m tests.bench.numbers [--count N] [--lengths 2-6] [--digits validation|test]
        [--hand mnist|font|strokes] [--faces train|held-out] [--seed S] [--failures DIR]

Builds N number scans in several layouts (evenly spaced, uneven, touching,
slightly overlapping, drifting baseline, a broken digit, a ruled line under
the number, and `digitwatch evaluate`'s own composition on its realistic
pages), reads them with the number reader and the shipped model (one
classifier call per batch, as classify does), and prints the exact-string
rate by length and by layout, wrong answers marked ok (at the model card's
threshold with its answer calibration, as classify reads; or --threshold), and why
strings were misread: too many digits (a digit split), too few (two merged),
or the right count with a digit misclassified.

Digits: `validation` are MNIST *training* digits the shipped model never
trained on (data.split_indices(seed=0)); tune on these. `test` is MNIST's
test split: report on it once, never tune on it. Other hands: `font` draws
each digit in a Hershey face (`--faces train`: synth.TRAIN_FACES for tuning,
`held-out`: synth.HELD_OUT_FACE for reporting), `strokes` in
tests/scans.py's drawn-stroke writer.

--failures DIR writes up to --keep PNGs of misread scans: the cleaned ink,
the atoms (alternating colours), the cut columns (red), the chosen digits'
boxes and what each read, and the 28x28 inputs of the chosen digits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from digitwatch.errors import ImageError
from digitwatch.reader import imaging, reading
from digitwatch.reader.confidence import Thresholds
from digitwatch.reader.model import load_classifier
from digitwatch.reader.prepare import threshold_for
from digitwatch.reader.reading import score
from digitwatch.training import pngwrite, scans, synth
from digitwatch.training.data import load_mnist, split_indices
from digitwatch.training.evaluation import page_png

LAYOUTS = ["spaced", "uneven", "touching", "overlap", "drift", "broken", "ruled", "evaluate"]


@dataclass(frozen=True)
class Case:
    png: bytes
    text: str
    layout: str


def _parse_lengths(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    return int(lo), int(hi or lo)


class Hand:
    """Digit ink `height` px tall, from one source."""

    def __init__(self, kind: str, digits: str, faces: str, mnist_dir: Path) -> None:
        self.kind = kind
        self.faces = synth.TRAIN_FACES if faces == "train" else [synth.HELD_OUT_FACE]
        if kind == "mnist":
            mnist = load_mnist(mnist_dir)
            if digits == "validation":
                _, val = split_indices(len(mnist.x_train), seed=0, limit=None)
                self.images, self.labels = mnist.x_train[val], mnist.y_train[val]
            else:
                self.images, self.labels = mnist.x_test, mnist.y_test
            self.by_digit = [np.flatnonzero(self.labels == d) for d in range(10)]

    def digit(self, d: int, height: int, rng: np.random.Generator) -> np.ndarray:
        if self.kind == "mnist":
            pool = self.by_digit[d]
            return scans.ink_from_mnist(self.images[pool[rng.integers(len(pool))]], height)
        if self.kind == "strokes":
            return scans.ink_from_strokes(d, height, rng)
        ink = synth.glyph_ink(str(d), self.faces[rng.integers(len(self.faces))], rng)
        return _at_height(ink, height)

    def number(self, text: str, rng: np.random.Generator) -> np.ndarray:
        """The whole number as `digitwatch evaluate` composes it (fonts: typeset as one string)."""
        if self.kind == "mnist":
            return synth.number_ink(text, self.images, self.labels, rng)
        if self.kind == "font":
            return synth.glyph_ink(text, self.faces[rng.integers(len(self.faces))], rng)
        return scans.ink_from_parts([self.digit(int(c), 80, rng) for c in text], 80, rng, spacing=(-0.05, 0.3))


def _at_height(ink: np.ndarray, height: int) -> np.ndarray:
    ys, xs = np.nonzero(ink > 0.05)
    ink = ink[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    s = height / ink.shape[0]
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    return np.clip(cv2.resize(ink, (max(1, round(ink.shape[1] * s)), height), interpolation=interp), 0, 1)


def make_cases(hand: Hand, count: int, lengths: tuple[int, int], seed: int,
               layouts: list[str] = LAYOUTS, variation: str | None = None) -> list[Case]:
    rng = np.random.default_rng(seed)
    out = []
    lo, hi = lengths
    variation_for = variation
    for i in range(count):
        layout = layouts[i % len(layouts)]
        n = lo + (i // len(layouts)) % (hi - lo + 1)
        text = "".join(str(int(d)) for d in rng.integers(10, size=n))
        if layout == "evaluate":
            png = page_png(hand.number(text, rng), rng, i, "number")
        else:
            height = int(rng.integers(28, 90))
            parts = [hand.digit(int(c), height, rng) for c in text]
            kw = dict(scans.LAYOUTS["spaced" if layout in ("broken", "ruled") else layout])
            if layout == "broken":
                kw["broken"] = int(rng.integers(n))
            ink = scans.ink_from_parts(parts, height, rng, **kw)
            if layout == "ruled":
                png = scans.ruled_page(ink, int(rng.integers(0, 3)))
            else:
                variation = variation_for or scans.VARIATIONS[i % len(scans.VARIATIONS)]
                flavour = pngwrite.FLAVOURS[(i * 7) % len(pngwrite.FLAVOURS)]
                png = scans.number_scan(ink, text, variation, flavour, rng, layout).png
        out.append(Case(png, text, layout))
    return out


def read_cases(classifier, cases: list[Case], threshold: float | Thresholds, batch: int = 32,
               forced: list | None = None) -> list[reading.Reading | None]:
    """The reader's path: candidates of a batch of files, one model call, decide per file.
    `forced` (a list) also gets each scan's best reading of the true length:
    whether the cuts held the right answer and only the scoring missed it."""
    out: list[reading.Reading | None] = []
    for start in range(0, len(cases), batch):
        cands: list[reading.Candidates | None] = []
        for c in cases[start : start + batch]:
            try:
                cands.append(reading.read_scan(imaging.decode_gray(c.png)))
            except ImageError:
                cands.append(None)
        ok = iter(score(classifier, [c for c in cands if c is not None]))
        for c in cands:
            if c is None:
                out.append(None)
                if forced is not None:
                    forced.append(None)
                continue
            probs, pair_probs = next(ok)
            calibration = classifier.spec.answers
            out.append(reading.decide(c, probs, pair_probs=pair_probs, threshold=threshold, calibration=calibration))
            if forced is not None:
                n = len(cases[len(out) - 1].text)
                forced.append(reading.decide(c, probs, pair_probs=pair_probs, threshold=threshold,
                                             constraints=reading.Constraints(n, n), calibration=calibration))
    return out


def scored(classifier, cases: list[Case], batch: int = 32) -> list[tuple]:
    """(candidates, probabilities) per scan (None for no ink), for re-deciding
    under other priors without cutting or classifying again."""
    out: list[tuple] = []
    for start in range(0, len(cases), batch):
        for c in cases[start : start + batch]:
            try:
                cands = reading.read_scan(imaging.decode_gray(c.png))
            except ImageError:
                out.append((None, None, None))
                continue
            out.append((cands, *score(classifier, [cands])[0]))
    return out


def grid(classifier, cases: list[Case], pairs: list[tuple], spec: str, threshold: float | Thresholds) -> None:
    """Exact rate and wrong-marked-ok for each combination of prior constants:
    `spec` like "CUT_COST=1,2,3 WIDTH_COST=6,10 WIDE_DIGIT=0.8,0.9"."""
    import dataclasses
    import itertools

    axes = [(k, [float(v) for v in vals.split(",")]) for k, _, vals in (t.partition("=") for t in spec.split())]
    saved = {k: getattr(reading, k) for k, _ in axes}
    try:
        for combo in itertools.product(*(vals for _, vals in axes)):
            for (k, _), v in zip(axes, combo, strict=True):
                setattr(reading, k, {False: v, True: saved[k][True]} if k == "CUT_COST" else v)
            exact = wrong_ok = ok = 0
            for c, (cands, probs, pair_probs) in zip(cases, pairs, strict=True):
                if cands is None:
                    continue
                if cands.shape is not None:
                    cands = dataclasses.replace(cands, prior=reading.shape_prior(cands.shape))
                if cands.cut is not None and "LONE_CUT" in saved:
                    cut = np.where(cands.cut > 1, reading.LONE_CUT, cands.cut).astype(np.float32)
                    cands = dataclasses.replace(cands, cut=cut)
                r = reading.decide(cands, probs, pair_probs=pair_probs, threshold=threshold,
                                   calibration=classifier.spec.answers)
                exact += r.text == c.text
                wrong_ok += r.text != c.text and r.status == "ok"
                ok += r.status == "ok"
            label = " ".join(f"{k}={v}" for (k, _), v in zip(axes, combo, strict=True))
            print(f"{label}: exact {100 * exact / len(cases):.1f}%  marked ok {100 * ok / len(cases):.1f}%  "
                  f"wrong ok {100 * wrong_ok / len(cases):.2f}%")
    finally:
        for k, v in saved.items():
            setattr(reading, k, v)


def kind_of(truth: str, read: str | None) -> str:
    if read is None:
        return "no ink"
    if read == truth:
        return "exact"
    if len(read) > len(truth):
        return "too many (split)"
    if len(read) < len(truth):
        return "too few (merged)"
    return "digit misclassified"


# ---------------------------------------------------------------- pictures of failures


@contextmanager
def _captured():
    """Record the reader's atoms and chosen path (for pictures only)."""
    seen: dict = {}
    atoms_fn, path_fn, finish_fn = reading._atoms, reading._path, imaging.work_region

    def atoms(*a, **kw):
        out = atoms_fn(*a, **kw)
        seen["atoms"] = out
        return out

    def path(*a, **kw):
        out = path_fn(*a, **kw)
        seen["path"] = out
        return out

    def work_region(*a, **kw):
        out = finish_fn(*a, **kw)
        seen["work"] = out
        return out

    reading._atoms, reading._path, imaging.work_region = atoms, path, work_region
    try:
        yield seen
    finally:
        reading._atoms, reading._path, imaging.work_region = atoms_fn, path_fn, finish_fn


def failure_png(classifier, case: Case, threshold: float | Thresholds, path: Path) -> None:
    with _captured() as seen:
        cands = reading.read_scan(imaging.decode_gray(case.png))
        [(probs, pair_probs)] = score(classifier, [cands])
        r = reading.decide(cands, probs, pair_probs=pair_probs, threshold=threshold,
                           calibration=classifier.spec.answers)
    work = seen["work"]
    mask = work.mask.astype(bool)
    h, w = mask.shape
    img = np.full((h, w, 3), 255, np.uint8)
    img[mask] = (170, 170, 170)
    colours = [(200, 80, 0), (0, 150, 0), (160, 0, 160), (0, 120, 200)]
    atoms = seen.get("atoms")
    if atoms is not None:
        for k, a in enumerate(atoms[0]):
            img[a.astype(bool)] = colours[k % len(colours)]
    chosen = seen.get("path", list(range(len(cands.spans))) if cands.atoms == 1 else [])
    chosen = [k for k in chosen if k < len(cands.spans)]  # rows past the candidates are a pair's (not drawn)
    top = np.argsort(-probs[:, :10], axis=1)
    for k in chosen:
        i, j = cands.spans[k]
        if atoms is None:
            x, y, bw, bh = cv2.boundingRect(work.mask)
        else:
            m = np.zeros_like(work.mask)
            for a in atoms[0][i:j]:
                m |= a
            x, y, bw, bh = cv2.boundingRect(m)
        cv2.rectangle(img, (x, y), (x + bw - 1, y + bh - 1), (0, 0, 255), 1)
        cv2.putText(img, f"{top[k, 0]} {probs[k, top[k, 0]]:.2f}/{top[k, 1]}", (x, max(10, y - 2)),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 255), 1)
    crops = [cv2.resize((255 - 255 * cands.crops[k]).astype(np.uint8), (56, 56), interpolation=cv2.INTER_NEAREST)
             for k in chosen]
    strip = np.full((70, max(w, 60 * max(1, len(crops)))), 255, np.uint8)
    for n, c in enumerate(crops):
        strip[4:60, 60 * n : 60 * n + 56] = c
    strip = cv2.cvtColor(strip, cv2.COLOR_GRAY2BGR)
    if strip.shape[1] > w:
        img = cv2.copyMakeBorder(img, 0, 0, 0, strip.shape[1] - w, cv2.BORDER_CONSTANT, value=(255, 255, 255))
    head = np.full((24, img.shape[1], 3), 255, np.uint8)
    cv2.putText(head, f"{case.layout}: {case.text} read {r.text} conf {r.confidence:.2f} {r.status}",
                (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    cv2.imwrite(str(path), np.vstack([head, img, strip]))


# ---------------------------------------------------------------- report


def summarize(cases: list[Case], results: list, threshold: float | Thresholds, forced: list) -> dict:
    by_len: dict[int, list[bool]] = defaultdict(list)
    by_layout: dict[str, list[bool]] = defaultdict(list)
    kinds: Counter = Counter()
    kinds_by_layout: dict[str, Counter] = defaultdict(Counter)
    wrong_ok = ok = 0
    for c, r, f in zip(cases, results, forced, strict=True):
        text = None if r is None else r.text
        right = text == c.text
        by_len[len(c.text)].append(right)
        by_layout[c.layout].append(right)
        kind = kind_of(c.text, text)
        if kind.startswith("too") and f is not None and f.text == c.text:
            kind += ", right count reads right"
        kinds[kind] += 1
        kinds_by_layout[c.layout][kind] += 1
        if r is not None and r.status == "ok":
            ok += 1
            wrong_ok += not right
    n = len(cases)
    return {
        "scans": n,
        "exact": round(kinds["exact"] / n, 4),
        "by_length": {k: round(float(np.mean(v)), 4) for k, v in sorted(by_len.items())},
        "by_layout": {k: round(float(np.mean(v)), 4) for k, v in by_layout.items()},
        "failures": {k: v for k, v in kinds.items() if k != "exact"},
        "failures_by_layout": {lay: {k: v for k, v in c.items() if k != "exact"} for lay, c in kinds_by_layout.items()},
        "marked_ok": round(ok / n, 4),
        "wrong_marked_ok": round(wrong_ok / n, 4),
        "threshold": str(threshold),
    }


def format_summary(s: dict) -> str:
    lines = [f"scans {s['scans']}  exact {100 * s['exact']:.1f}%  marked ok {100 * s['marked_ok']:.1f}%  "
             f"wrong marked ok {100 * s['wrong_marked_ok']:.2f}% (threshold {s['threshold']})"]
    lines.append("by length: " + "  ".join(f"{k}: {100 * v:.1f}%" for k, v in s["by_length"].items()))
    lines.append("by layout: " + "  ".join(f"{k}: {100 * v:.1f}%" for k, v in s["by_layout"].items()))
    lines.append("failures:  " + "  ".join(f"{k}: {v}" for k, v in sorted(s["failures"].items())))
    for lay, c in s["failures_by_layout"].items():
        if c:
            lines.append(f"  {lay:9s} " + "  ".join(f"{k}: {v}" for k, v in sorted(c.items())))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=400)
    ap.add_argument("--lengths", default="2-6")
    ap.add_argument("--digits", choices=["validation", "test"], default="validation")
    ap.add_argument("--hand", choices=["mnist", "font", "strokes"], default="mnist")
    ap.add_argument("--faces", choices=["train", "held-out"], default="train")
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variation", default=None, help="every page this tests/scans.py variation (default: all in turn)")
    ap.add_argument("--threshold", type=float, default=None, help="default: the model card's, as classify")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--mnist", type=Path, default=Path("/work/shared/datasets/mnist"))
    ap.add_argument("--failures", type=Path, default=None)
    ap.add_argument("--keep", type=int, default=30)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--grid", default=None, help='re-decide under prior constants, e.g. "CUT_COST=1,3 WIDTH_COST=6,10"')
    args = ap.parse_args(argv)
    cv2.setNumThreads(1)
    hand = Hand(args.hand, args.digits, args.faces, args.mnist)
    classifier = load_classifier(args.model)
    threshold = threshold_for(classifier, args.threshold)
    t0 = time.process_time()
    cases = make_cases(hand, args.count, _parse_lengths(args.lengths), args.seed, args.layouts.split(","),
                       args.variation)
    t1 = time.process_time()
    if args.grid:
        grid(classifier, cases, scored(classifier, cases), args.grid, threshold)
        return 0
    forced: list = []
    results = read_cases(classifier, cases, threshold, forced=forced)
    t2 = time.process_time()
    s = summarize(cases, results, threshold, forced)
    s["cpu_ms_per_scan_read"] = round(1000 * (t2 - t1) / len(cases), 2)
    print(json.dumps(s) if args.json else format_summary(s) + f"\nread CPU {s['cpu_ms_per_scan_read']} ms/scan "
          f"(rendering {1000 * (t1 - t0) / len(cases):.1f})")
    if args.failures is not None:
        args.failures.mkdir(parents=True, exist_ok=True)
        kept = 0
        for i, (c, r) in enumerate(zip(cases, results, strict=True)):
            if r is not None and r.text != c.text and kept < args.keep:
                failure_png(classifier, c, threshold, args.failures / f"{i:04d}-{c.layout}.png")
                kept += 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
