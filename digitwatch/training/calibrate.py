"""Fit the model's temperature on held-out realistic scans and write it into
the model card.

    digitwatch train --step temperature --data DIR --model runs/r1/digits.tflite [--digits N] [--write]

The calibration set is data the model never trained on and the evaluation
never reports on: MNIST *training* digits of the validation split (same seed
as the card, so never trained on) rendered as scans of every variation,
Hershey-font digits and drawn non-digits from seeds training did not use, all
through the real decode + normalize + classify path. The temperature minimizes
the negative log-likelihood there; the threshold is the lowest confidence at
which answers marked ok are still right at least --precision of the time
(single-digit answers: argmax over the digits, refused when "not a digit" wins),
reported only: the whole-answer map and the card's threshold are fitted by
training/answers.py (`--step answers`), after the temperature.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from digitwatch.errors import ImageError
from digitwatch.reader.contract import REJECT
from digitwatch.reader.imaging import load_digit
from digitwatch.reader.model import load_classifier
from digitwatch.training import calibration, scans, synth
from digitwatch.training.data import load_mnist, split_indices
from digitwatch.training.evaluation import page_png


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


def calibration_set(card: dict, digits: int, seed: int = 4242,
                    data: Path | None = None) -> tuple[list[bytes], np.ndarray]:
    mnist = load_mnist(data)
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


def run(model: Path, digits: int, precision: float, data: Path | None = None) -> dict:
    card_path = model.with_suffix(".json")
    card = json.loads(card_path.read_text())
    classifier = load_classifier(model)
    pngs, labels = calibration_set(card, digits, data=data)
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
    return {
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


def main(argv: list[str] | None = None, command: str = "") -> None:
    """`digitwatch train --step temperature`: argv are the step's own options."""
    ap = argparse.ArgumentParser(prog="digitwatch train --step temperature")
    ap.add_argument("--data", type=Path, help="MNIST as an IDX folder or mnist.npz.")
    ap.add_argument("--model", type=Path, default=Path("models/digits.tflite"))
    ap.add_argument("--digits", type=int, default=3000)
    ap.add_argument("--precision", type=float, default=0.997)
    ap.add_argument("--write", action="store_true", help="Store the temperature in the card.")
    args = ap.parse_args(argv)
    report = run(args.model, args.digits, args.precision, data=args.data)
    print(json.dumps(report, indent=2))
    if args.write:
        card_path = args.model.with_suffix(".json")
        card = json.loads(card_path.read_text())
        # The whole-answer map and threshold are the answers step's:
        # a threshold on single-digit probabilities is not one on its scale.
        card["temperature"] = report["temperature"]
        card["calibration"] = {k: v for k, v in report.items() if k != "model"}
        card["calibration"]["command"] = command or "digitwatch train --step temperature " + " ".join(argv or [])
        card_path.write_text(json.dumps(card, indent=2) + "\n")


if __name__ == "__main__":
    main()
