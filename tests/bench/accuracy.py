"""Accuracy on generated realistic scans, per variation and per source.

    python -m tests.bench.accuracy [--per-variation N] [--model FILE] [--out DIR]

MNIST test digits (never trained on) are rendered into scans of every
variation and PNG flavour; digits from other sources (drawn strokes, stroke
fonts, UCI 8x8) likewise. Each page goes through the real decode + normalize
+ classify path.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from digitwatch.contract import REJECT
from digitwatch.data import load_mnist
from digitwatch.errors import ImageError
from digitwatch.imaging import load_digit
from digitwatch.model import load_classifier
from tests import scans
from tests.conftest import MNIST_DIR


def score(classifier, batch: list[scans.Scan]) -> tuple[int, int, int, int]:
    """(correct, errors, total, refused) for a list of scans; with an 11-class
    model a digit answered "not a digit" is refused, and not correct."""

    def prep(scan):
        try:
            return load_digit(scan.png).pixels
        except ImageError:
            return None

    with ThreadPoolExecutor(2) as pool:
        digits = list(pool.map(prep, batch))
    ok = [i for i, d in enumerate(digits) if d is not None]
    correct = refused = 0
    if ok:
        probs = classifier.predict(np.stack([digits[i] for i in ok]))
        correct = int(sum(int(np.argmax(p)) == batch[i].label for p, i in zip(probs, ok, strict=True)))
        refused = int(np.sum(np.argmax(probs, axis=1) == REJECT))
    return correct, len(batch) - len(ok), len(batch), refused


def run(per_variation: int, model: Path | None, seed: int = 7) -> dict:
    classifier = load_classifier(model)
    mnist = load_mnist(MNIST_DIR)
    rng = np.random.default_rng(seed)
    rows = []
    started = time.monotonic()
    for variation in scans.VARIATIONS:
        idx = rng.choice(len(mnist.x_test), per_variation, replace=False)
        batch = list(scans.mnist_scans(mnist.x_test[idx], mnist.y_test[idx], variation, rng))
        c, e, n, r = score(classifier, batch)
        rows.append({"source": "mnist", "variation": variation, "correct": c, "errors": e, "total": n,
                     "refused": r})
    for source in ("strokes", "font", "uci"):
        batch = list(scans.other_scans(per_variation * 2, source, rng))
        c, e, n, r = score(classifier, batch)
        rows.append({"source": source, "variation": "all", "correct": c, "errors": e, "total": n,
                     "refused": r})
    mn = [r for r in rows if r["source"] == "mnist"]
    other = [r for r in rows if r["source"] in ("strokes", "font")]
    summary = {
        "mnist_scans": sum(r["correct"] for r in mn) / sum(r["total"] for r in mn),
        "other_writers": sum(r["correct"] for r in other) / sum(r["total"] for r in other),
        "model": classifier.model_id,
        "seconds": round(time.monotonic() - started, 1),
    }
    return {"rows": rows, "summary": summary}


def format_rows(report: dict) -> str:
    lines = ["| source | variation | accuracy | errors | refused | n |", "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(
            f"| {r['source']} | {r['variation']} | {r['correct'] / r['total']:.1%} | {r['errors']} "
            f"| {r['refused']} | {r['total']} |"
        )
    s = report["summary"]
    lines.append(f"\nMNIST scans overall: {s['mnist_scans']:.2%}; other writers (strokes+font): "
                 f"{s['other_writers']:.2%}; model {s['model']}; {s['seconds']} s")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-variation", type=int, default=300)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    report = run(args.per_variation, args.model)
    print(format_rows(report))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "accuracy.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
