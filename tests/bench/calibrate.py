"""Fit the model's temperature and choose the low-confidence threshold on held-out
realistic scans, and write both into the model card.

    python -m tests.bench.calibrate --model runs/r1/digits.tflite [--digits N] [--write]

The calibration set is data the model never trained on and the evaluation
never reports on: MNIST *training* digits of the validation split (same seed
as the card, so never trained on) rendered as scans of every variation,
Hershey-font digits and drawn non-digits from seeds training did not use, all
through the real decode + normalize + classify path. The temperature minimizes
the negative log-likelihood there; the threshold is the lowest confidence at
which answers marked ok are still right at least --precision of the time
(single-digit answers: argmax over the digits, refused when "not a digit" wins).
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from digitwatch import calibration, evaluation, synth
from digitwatch.contract import REJECT
from digitwatch.data import load_mnist, split_indices
from digitwatch.errors import ImageError
from digitwatch.evaluation import page_png
from digitwatch.imaging import load_digit
from digitwatch.model import LiteRTClassifier, OutputSpec, RejectHeadClassifier, load_classifier
from tests import scans
from tests.conftest import MNIST_DIR


def _pixels(pngs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    def prep(png):
        try:
            return load_digit(png).pixels
        except ImageError:
            return None

    with ThreadPoolExecutor(2) as pool:
        out = list(pool.map(prep, pngs))
    keep = np.array([o is not None for o in out])
    return np.stack([o for o in out if o is not None]), keep


def calibration_set(card: dict, digits: int, seed: int = 4242) -> tuple[list[bytes], np.ndarray]:
    mnist = load_mnist(MNIST_DIR)
    train_idx, val_idx = split_indices(len(mnist.x_train), seed=card.get("seed", 0), limit=None)
    rng = np.random.default_rng(seed)
    pick = rng.choice(val_idx, min(digits, len(val_idx)), replace=False)
    pngs, labels = [], []
    for i, idx in enumerate(pick):
        variation = scans.VARIATIONS[i % len(scans.VARIATIONS)]
        scan = next(scans.mnist_scans(mnist.x_train[idx : idx + 1], mnist.y_train[idx : idx + 1], variation, rng))
        pngs.append(scan.png)
        labels.append(scan.label)
    fonts, font_labels = synth.font_digits(digits // 4, rng)
    del fonts  # drawn again as ink below, so they go through the page renderer
    for i, d in enumerate(font_labels):
        ink = synth.glyph_ink(str(int(d)), synth.FACES[rng.integers(len(synth.FACES))], rng)
        pngs.append(page_png(ink, rng, i, "font"))
        labels.append(int(d))
    # Non-digits, compositions from the validation digits only.
    val_images, val_labels = mnist.x_train[val_idx], mnist.y_train[val_idx]
    weights = np.array([k.weight for k in synth.REJECT_KINDS])
    for i in range(digits // 2):
        kind = synth.REJECT_KINDS[rng.choice(len(weights), p=weights / weights.sum())]
        ink = synth.reject_ink(kind, rng, val_images, val_labels)
        pngs.append(page_png(ink, rng, i, kind.name))
        labels.append(REJECT)
    return pngs, np.array(labels)


def answers(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(answered, confidence, right) of single-digit answers."""
    best = probs.argmax(1)
    answered = best != REJECT if probs.shape[1] > REJECT else np.ones(len(best), bool)
    digit = probs[:, :10].argmax(1)
    confidence = probs[np.arange(len(probs)), digit]
    return answered, confidence, digit == labels


def whole_answers(classifier, count: int, precision: float, seed: int = 5151) -> dict:
    """Numbers of 1-12 validation digits and non-digits (training faces, other
    seeds) through the number reader: the whole-answer ECE and the threshold."""
    mnist = load_mnist(MNIST_DIR)
    _, val_idx = split_indices(len(mnist.x_train), seed=0, limit=None)
    numbers = evaluation.number_scans(count, seed, mnist.x_train[val_idx], mnist.y_train[val_idx])
    non_digits = evaluation.non_digit_scans(count // 2, seed + 1, faces=synth.TRAIN_FACES)
    read = evaluation.number_reader(classifier, 0.0)
    conf, right, number = [], [], []
    for png, truth in numbers + non_digits:
        a = read(png)
        if a.text:
            conf.append(a.confidence)
            right.append(a.text == truth)  # a non-digit's truth is its kind: never equal
            number.append(truth.isdigit())
    conf_a, right_a = np.array(conf), np.array(right, bool)
    threshold = calibration.threshold_for_precision(conf_a, right_a, precision)
    ok = conf_a >= threshold
    return {
        "number_scans": len(numbers),
        "non_digit_scans": len(non_digits),
        "answers": len(conf),
        "ece": calibration.expected_calibration_error(conf_a, right_a),
        "low_confidence": threshold,
        "ok_right": float(right_a[ok].mean()) if ok.any() else 1.0,
        "numbers_marked_ok": float(ok[np.array(number, bool)].sum() / max(len(numbers), 1)),
        "non_digits_marked_ok": float(ok[~np.array(number, bool)].sum() / max(len(non_digits), 1)),
    }


def run(model: Path, digits: int, precision: float, numbers: int = 0) -> dict:
    card_path = model.with_suffix(".json")
    card = json.loads(card_path.read_text())
    classifier = load_classifier(model)
    pngs, labels = calibration_set(card, digits)
    x, keep = _pixels(pngs)
    labels = labels[keep]
    probs = classifier.predict(x)
    t_card = float(card.get("temperature", 1.0))
    z = calibration.log_probabilities(probs)  # = logits / t_card, up to a constant per row
    t_rel = calibration.fit_temperature(z, labels)
    refit = calibration.softmax(z, t_rel)
    right_all = probs.argmax(1) == labels
    answered, conf, right = answers(refit, labels)
    threshold = calibration.threshold_for_precision(conf[answered], right[answered], precision)
    ok = answered & (conf >= threshold)
    is_digit = labels != REJECT
    whole = {}
    if numbers:
        if isinstance(classifier, RejectHeadClassifier):
            tuned = classifier  # a pair: each half is calibrated by its own card, as served
        else:
            spec = OutputSpec.for_model(model)
            tuned = LiteRTClassifier(model, spec=OutputSpec(logits=spec.logits, temperature=t_card * t_rel))
        whole = whole_answers(tuned, numbers, precision)
    return {
        "whole_answers": whole,
        "model": classifier.model_id,
        "scans": int(len(pngs)),
        "normalized": int(keep.sum()),
        "digits": int(is_digit.sum()),
        "non_digits": int((~is_digit).sum()),
        "accuracy_11way": float(right_all.mean()),
        "temperature_before": t_card,
        "temperature": t_card * t_rel,
        "ece_before": calibration.expected_calibration_error(probs.max(1), right_all),
        "ece_after": calibration.expected_calibration_error(refit.max(1), refit.argmax(1) == labels),
        "precision_target": precision,
        "low_confidence": threshold,
        "ok_right": float(right[ok].mean()) if ok.any() else 1.0,
        "digits_marked_ok": float(ok[is_digit].mean()),
        "non_digits_marked_ok": float(ok[~is_digit].mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=Path("models/digits.tflite"))
    ap.add_argument("--digits", type=int, default=3000)
    ap.add_argument("--precision", type=float, default=0.997)
    ap.add_argument("--numbers", type=int, default=600, help="Number scans for the whole-answer threshold.")
    ap.add_argument("--write", action="store_true", help="Store temperature and threshold in the card.")
    args = ap.parse_args()
    report = run(args.model, args.digits, args.precision, args.numbers)
    print(json.dumps(report, indent=2))
    if args.write:
        card_path = args.model.with_suffix(".json")
        card = json.loads(card_path.read_text())
        card["temperature"] = report["temperature"]
        card["recommended_low_confidence"] = (report["whole_answers"] or report)["low_confidence"]
        card["calibration"] = {k: v for k, v in report.items() if k != "model"}
        card["calibration"]["command"] = "python -m tests.bench.calibrate " + " ".join(
            f"--{k} {v}" for k, v in (
                ("model", args.model), ("digits", args.digits), ("precision", args.precision),
                ("numbers", args.numbers),
            )
        ) + " --write"
        card_path.write_text(json.dumps(card, indent=2) + "\n")


if __name__ == "__main__":
    main()
