"""The whole answer's confidence: a fitted map from what the reader knows about
its answer to the probability that the answer is right.

The raw product of the digits' probabilities is not that probability: a
digit model is sure of itself on a letter, a 12-digit string multiplies twelve
near-ones into a near-one, and a cut the model barely preferred looks as sure
as a gap in the ink. So the reader describes its answer with a few numbers
(`Evidence`) and a logistic map fitted on held-out scans (tests/bench/
calibrate.py: MNIST-train validation digits as single digits and numbers,
synthetic non-digits) turns them into a probability. The map lives in the
model card ("answer_calibration"), beside the temperature that calibrates the
single-digit probabilities, because it belongs to that model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from digitwatch.reader.contract import DIGITS, REJECT

FLOOR = -20.0  # log-probabilities below this say nothing more
LOGIT_CAP = 12.0  # |logit| above this says nothing more
# The longest answers the map is fitted on (tests/bench/fit_answers.py reads
# numbers of 2-12 digits). A logistic map extrapolates without bound: a
# 50-digit string of sure digits came out 0.9985 and ok. Beyond this length
# the reader takes the smaller of the map and the raw product of the digits'
# probabilities, which only falls as the string grows.
MAX_FITTED_LENGTH = 12
# No fitted weight comes near this; a card beyond it is corrupt or hostile
# (1e308 weights turn the sum into inf - inf = nan, a NaN confidence line).
MAX_WEIGHT = 1e6
# The reject head gives real digits small "not a digit" probabilities that
# vary from scan to scan and say little; ranking digits by them costs
# coverage (measured with tests/bench/fit_answers.py: single digits marked ok
# at 99.7% precision 94.7% -> 96.7%), so below 12% (log-odds -2) they count as 12%.
REJECT_FLOOR = -2.0

# Log-odds rather than log-probabilities where sureness matters: near 1 a
# log-probability is ~0 for 0.99 and 0.99999 alike, its log-odds are 4.6 and 11.5.
FEATURES = (
    "sum_log_digit",  # sum over the digits of log p(digit | a digit)
    "min_digit_logit",  # log-odds of the least sure digit
    "max_reject_logit",  # the strongest "not a digit", at least REJECT_FLOOR (the floor without that class)
    "certainty_logit",  # log-odds of this cut's share among all cuts of the same ink
    "shape_prior",  # sum of the candidates' shape priors (0: digit-like)
    "log_length",  # log of the number of digits
)


# Which way each feature may move the probability (+1 up, -1 down, 0 either):
# a surer digit, a weaker "not a digit", a surer cut, a more digit-like shape
# never make an answer less likely right. Fitted freely, collinear features
# came out against their sense (sum_log_digit -0.27 beside min_digit_logit
# +1.04), a map that extrapolates badly; `fit` holds such weights at 0.
SIGNS = (1, 1, -1, 1, 1, 0)


def _logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-12, 1 - 1e-12)
    return np.clip(np.log(p) - np.log1p(-p), -LOGIT_CAP, LOGIT_CAP)


@dataclass(frozen=True)
class Evidence:
    """What the reader knows about one answer, as FEATURES in that order."""

    values: tuple[float, ...]

    @classmethod
    def of(cls, probs: np.ndarray, path: list[int] | tuple[int, ...], *, log_certainty: float = 0.0,
           prior: float = 0.0) -> Evidence:
        """Evidence for the answer reading rows `path` of `probs` (10 or 11 classes;
        class 10 = not a digit), each row's digit being its most probable one."""
        rows = np.asarray(probs, np.float64)[list(path)]
        digits = rows[:, :DIGITS]
        q = digits.max(axis=1) / np.maximum(digits.sum(axis=1), 1e-12)  # p(digit | a digit)
        log_digit = np.maximum(np.log(np.maximum(q, 1e-300)), FLOOR)
        reject_logit = REJECT_FLOOR
        if rows.shape[1] > REJECT:
            reject_logit = max(float(np.max(_logit(rows[:, REJECT]))), REJECT_FLOOR)
        return cls((
            float(max(log_digit.sum(), FLOOR)),
            float(_logit(q.min())),
            reject_logit,
            float(_logit(math.exp(min(0.0, log_certainty)))),
            float(max(prior, FLOOR)),
            math.log(len(rows)),
        ))


@dataclass(frozen=True)
class Thresholds:
    """The confidence an answer needs to be ok: one for one-digit answers and
    one for longer ones. They answer different bars (answers marked ok right
    at least 99.5% of the time; wrong numbers marked ok at most 1% of number
    scans), and one threshold for both let the numbers' bar set the single
    digits' (tests/bench/fit_answers.py chooses both)."""

    single: float
    number: float

    @classmethod
    def of(cls, value: float | Thresholds) -> Thresholds:
        """A plain number is the threshold for every answer."""
        return value if isinstance(value, Thresholds) else cls(float(value), float(value))

    def for_length(self, digits: int) -> float:
        return self.single if digits <= 1 else self.number

    def __str__(self) -> str:
        if self.single == self.number:
            return f"{self.number:.3f}"
        return f"{self.single:.3f} (one digit) / {self.number:.3f} (longer)"


@dataclass(frozen=True)
class AnswerCalibration:
    """p(answer right) = sigmoid(bias + weights . evidence)."""

    weights: tuple[float, ...]
    bias: float

    def probability(self, evidence: Evidence) -> float:
        z = self.bias + sum(w * v for w, v in zip(self.weights, evidence.values, strict=True))
        if math.isnan(z):  # cannot happen with a card from_card accepted; never report NaN
            return 0.0
        return 1.0 / (1.0 + math.exp(-min(max(z, -50.0), 50.0)))

    def to_card(self) -> dict:
        return {"features": list(FEATURES), "weights": [round(w, 6) for w in self.weights],
                "bias": round(self.bias, 6)}

    @classmethod
    def from_card(cls, entry: object) -> AnswerCalibration:
        """Raises ValueError unless `entry` is a well-formed card entry for FEATURES."""
        if not isinstance(entry, dict):
            raise ValueError("answer_calibration must be an object")
        if entry.get("features") != list(FEATURES):
            raise ValueError(f"answer_calibration features must be {list(FEATURES)}")
        weights, bias = entry.get("weights"), entry.get("bias")
        if not isinstance(weights, list) or len(weights) != len(FEATURES):
            raise ValueError(f"answer_calibration needs {len(FEATURES)} weights")
        values = [*weights, bias]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise ValueError("answer_calibration weights and bias must be finite numbers")
        if any(abs(v) > MAX_WEIGHT for v in values):
            raise ValueError(f"answer_calibration weights and bias must be within +-{MAX_WEIGHT:g}")
        return cls(tuple(float(w) for w in weights), float(bias))  # type: ignore[arg-type]  # checked above


def fit(evidence: list[Evidence], right: np.ndarray, *, ridge: float = 1e-3, rounds: int = 50,
        signs: tuple[int, ...] = SIGNS) -> AnswerCalibration:
    """Logistic regression by Newton's method (a small ridge keeps separable
    data finite): the map whose probabilities best explain `right`, with each
    weight on the side `signs` allows. A weight fitted against its sign is
    held at 0 and the rest refitted (an active set), until all agree."""
    x = np.array([e.values for e in evidence], np.float64)
    y = np.asarray(right, np.float64)
    free = list(range(x.shape[1]))
    while True:
        w = _newton(x[:, free], y, ridge, rounds)
        wrong = [(signs[f] * w[k + 1], f) for k, f in enumerate(free) if signs[f] * w[k + 1] < 0]
        if not wrong:
            break
        free.remove(min(wrong)[1])  # the worst offender first: removing it may mend the others
    weights = np.zeros(x.shape[1])
    weights[free] = w[1:]
    return AnswerCalibration(tuple(float(v) for v in weights), float(w[0]))


def _newton(x: np.ndarray, y: np.ndarray, ridge: float, rounds: int) -> np.ndarray:
    """[bias, weights...] of the ridge-penalized logistic fit."""
    x1 = np.column_stack([np.ones(len(x)), x])
    w = np.zeros(x1.shape[1])
    penalty = ridge * len(x) * np.eye(x1.shape[1])
    penalty[0, 0] = 0.0  # the bias is not shrunk
    for _ in range(rounds):
        p = 1.0 / (1.0 + np.exp(-np.clip(x1 @ w, -50, 50)))
        grad = x1.T @ (p - y) + penalty @ w
        hess = (x1 * (p * (1 - p))[:, None]).T @ x1 + penalty
        step = np.linalg.solve(hess + 1e-9 * np.eye(len(w)), grad)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return w
