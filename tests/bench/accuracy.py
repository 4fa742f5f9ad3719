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

from digitwatch.errors import ImageError
from digitwatch.reader.confidence import Thresholds
from digitwatch.reader.imaging import decode_gray
from digitwatch.reader.model import load_classifier
from digitwatch.reader.prepare import threshold_for
from digitwatch.reader.reading import REASON_NOT_DIGIT, decide, read_scan
from digitwatch.reader.reading import score as score_scans
from digitwatch.results import STATUS_OK
from digitwatch.training import scans
from digitwatch.training.data import load_mnist
from tests.conftest import MNIST_DIR


def score(classifier, batch: list[scans.Scan], threshold: float | Thresholds) -> dict:
    """What the product answers for each scan, through the real path (decode,
    clean, cut, one model call, reading.decide with the card's calibration):
    right = the result's `digit` is the label (a scan read as several digits,
    or as none, is wrong); ok = status ok at `threshold`."""

    def prep(scan):
        try:
            return read_scan(decode_gray(scan.png))
        except ImageError:
            return None

    with ThreadPoolExecutor(2) as pool:
        cands = list(pool.map(prep, batch))
    good = [i for i, c in enumerate(cands) if c is not None]
    right = ok = ok_right = refused = 0
    if good:
        for i, (probs, pair_probs) in zip(good, score_scans(classifier, [cands[i] for i in good]), strict=True):
            r = decide(cands[i], probs, pair_probs=pair_probs, threshold=threshold,
                       calibration=classifier.spec.answers)
            hit = r.digit == batch[i].label
            right += hit
            ok += r.status == STATUS_OK
            ok_right += hit and r.status == STATUS_OK
            refused += r.reason == REASON_NOT_DIGIT
    return {"correct": right, "errors": len(batch) - len(good), "total": len(batch), "refused": refused,
            "ok": ok, "ok_right": ok_right}


SETS = {"mnist": "MNIST test scans", "other": "other writers (strokes, fonts)",
        "low_res": "low resolution (MNIST test digits binned to 8x8)"}


def run(per_variation: int, model: Path | None, seed: int = 7, threshold: float | None = None) -> dict:
    classifier = load_classifier(model)
    thresholds = threshold_for(classifier, threshold)  # as classify: the card's, per answer length
    mnist = load_mnist(MNIST_DIR)
    rng = np.random.default_rng(seed)
    rows = []
    started = time.monotonic()
    for variation in scans.VARIATIONS:
        idx = rng.choice(len(mnist.x_test), per_variation, replace=False)
        batch = list(scans.mnist_scans(mnist.x_test[idx], mnist.y_test[idx], variation, rng))
        rows.append({"source": "mnist", "set": "mnist", "variation": variation, **score(classifier, batch, thresholds)})
    for source in ("strokes", "font"):
        batch = list(scans.other_scans(per_variation * 2, source, rng))
        rows.append({"source": source, "set": "other", "variation": "all", **score(classifier, batch, thresholds)})
    idx = rng.choice(len(mnist.x_test), per_variation * 2, replace=False)
    batch = list(scans.low_res_scans(mnist.x_test[idx], mnist.y_test[idx], rng))
    rows.append({"source": "low_res", "set": "low_res", "variation": "all", **score(classifier, batch, thresholds)})
    sets = {}
    for name in SETS:
        mine = [r for r in rows if r["set"] == name]
        total, ok = sum(r["total"] for r in mine), sum(r["ok"] for r in mine)
        sets[name] = {
            "accuracy": sum(r["correct"] for r in mine) / total,
            "marked_ok": ok / total,
            "ok_right": sum(r["ok_right"] for r in mine) / ok if ok else 1.0,
            "refused": sum(r["refused"] for r in mine),
            "total": total,
        }
    summary = {
        "mnist_scans": sets["mnist"]["accuracy"],
        "other_writers": sets["other"]["accuracy"],
        "sets": sets,
        "threshold": str(thresholds),
        "model": classifier.model_id,
        "seconds": round(time.monotonic() - started, 1),
    }
    return {"rows": rows, "summary": summary}


def format_rows(report: dict) -> str:
    lines = ["| source | variation | accuracy | marked ok | ok right | errors | refused | n |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(
            f"| {r['source']} | {r['variation']} | {r['correct'] / r['total']:.1%} | {r['ok'] / r['total']:.1%} "
            f"| {r['ok_right'] / max(r['ok'], 1):.2%} | {r['errors']} | {r['refused']} | {r['total']} |"
        )
    s = report["summary"]
    lines += ["", f"Per set (model {s['model']}, low-confidence threshold {s['threshold']}; {s['seconds']} s):",
              "| set | accuracy | marked ok | answers marked ok right | refused as not a digit | n |",
              "|---|---|---|---|---|---|"]
    for name, title in SETS.items():
        v = s["sets"][name]
        lines.append(f"| {title} | {v['accuracy']:.2%} | {v['marked_ok']:.2%} | {v['ok_right']:.2%} "
                     f"| {v['refused']} | {v['total']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-variation", type=int, default=300)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--threshold", type=float, help="low-confidence threshold (default: the card's)")
    args = ap.parse_args()
    report = run(args.per_variation, args.model, threshold=args.threshold)
    print(format_rows(report))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "accuracy.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
