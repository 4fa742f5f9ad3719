"""Metrics on MNIST's test set and the report images. Pure numpy and OpenCV, so
`evaluate` works with LiteRT alone."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

NUM_CLASSES = 10


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
    accuracy: float
    per_class: list[ClassScore]
    confusion: list[list[int]]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    cm = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    np.add.at(cm, (truth.astype(np.int64), predicted.astype(np.int64)), 1)
    return cm


def evaluate(probabilities: np.ndarray, labels: np.ndarray, *, model: str) -> Evaluation:
    predicted = np.argmax(probabilities, axis=1)
    cm = confusion_matrix(labels, predicted)
    per_class = []
    for d in range(NUM_CLASSES):
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
        accuracy=float(np.mean(predicted == labels)),
        per_class=per_class,
        confusion=cm.tolist(),
    )


def format_table(ev: Evaluation) -> str:
    lines = [
        f"model     {ev.model}",
        f"digits    {ev.count}",
        f"accuracy  {ev.accuracy:.4f}  ({round(ev.accuracy * ev.count)}/{ev.count})",
        "",
        "digit  precision  recall  support",
    ]
    lines += [f"{c.digit:>5}  {c.precision:>9.4f}  {c.recall:>6.4f}  {c.support:>7}" for c in ev.per_class]
    lines += ["", "confusion (rows: true digit, columns: predicted)"]
    lines.append("     " + "".join(f"{d:>6}" for d in range(NUM_CLASSES)))
    lines += [f"{d:>5}" + "".join(f"{v:>6}" for v in row) for d, row in enumerate(ev.confusion)]
    return "\n".join(lines) + "\n"


def confusion_png(ev: Evaluation, path: Path) -> None:
    """A heat map of the confusion matrix with counts, log-scaled so errors show."""
    cell, margin = 56, 40
    cm = np.array(ev.confusion, np.float64)
    size = margin + cell * NUM_CLASSES
    img = np.full((size + 30, size, 3), 255, np.uint8)
    scale = np.log1p(cm) / max(np.log1p(cm.max()), 1e-9)
    for t in range(NUM_CLASSES):
        for p in range(NUM_CLASSES):
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
