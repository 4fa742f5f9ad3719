"""Calibration: a temperature fitted on held-out data, the expected calibration
error (ECE), reliability bins and the confidence threshold. Pure numpy.

A temperature T rescales logits (softmax(z / T)); it changes confidences, never
which class wins, so accuracy is untouched. It is fitted by minimizing the
negative log-likelihood of the true labels on data the model was not trained
on, and stored in the model card where `digitwatch.reader.model` applies it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ECE_BINS = 15


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def log_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """Probabilities back to logits (up to a constant per row)."""
    return np.log(np.clip(np.asarray(probabilities, np.float64), 1e-12, 1.0))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    p = softmax(logits, temperature)[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(p, 1e-12, 1.0))))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, *, low: float = 0.05, high: float = 10.0) -> float:
    """The T minimizing NLL, by golden-section search on log T (NLL is unimodal in T)."""
    labels = np.asarray(labels, np.int64)
    a, b = np.log(low), np.log(high)
    g = (np.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = nll(logits, labels, np.exp(c)), nll(logits, labels, np.exp(d))
    for _ in range(60):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = nll(logits, labels, np.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = nll(logits, labels, np.exp(d))
    return float(np.exp((a + b) / 2))


@dataclass(frozen=True)
class Reliability:
    """Per confidence bin: how many answers, their mean confidence, how many were right."""

    edges: list[float]
    count: list[int]
    confidence: list[float]
    accuracy: list[float]
    ece: float


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> Reliability:
    """Equal-width bins over [0, 1]; ECE = sum over bins of |accuracy - confidence| x share."""
    confidence = np.asarray(confidence, np.float64)
    correct = np.asarray(correct, bool)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # The last bin is closed at 1.0: a confidence of exactly 1 belongs in it.
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    count, conf, acc = [], [], []
    ece = 0.0
    n = max(len(confidence), 1)
    for b in range(bins):
        sel = which == b
        k = int(sel.sum())
        count.append(k)
        conf.append(float(confidence[sel].mean()) if k else 0.0)
        acc.append(float(correct[sel].mean()) if k else 0.0)
        ece += k / n * abs(acc[-1] - conf[-1])
    return Reliability(edges=edges.tolist(), count=count, confidence=conf, accuracy=acc, ece=float(ece))


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    return reliability(confidence, correct, bins).ece


def threshold_for_precision(confidence: np.ndarray, correct: np.ndarray, precision: float = 0.995) -> float:
    """The lowest threshold t such that the answers with confidence >= t are right
    at least `precision` of the time: the most coverage at that precision.
    Above 1 when no threshold reaches it."""
    confidence = np.asarray(confidence, np.float64)
    correct = np.asarray(correct, bool)
    order = np.argsort(-confidence, kind="stable")
    c, ok = confidence[order], correct[order]
    kept = np.arange(1, len(c) + 1)
    # Only cut between distinct confidences: ties are kept or dropped together.
    last_of_value = np.r_[c[1:] != c[:-1], True]
    good = (np.cumsum(ok) / kept >= precision) & last_of_value
    if not good.any():
        return 1.0 + 1e-9
    return float(c[np.flatnonzero(good)[-1]])
