"""Classifiers: one protocol, a LiteRT implementation for the product and a Keras
one for `.keras` files. Only the Keras path imports TensorFlow, and lazily.

A model has 10 outputs (digits 0-9) or 11 (index 10 = "not a digit"), the
layout `digitwatch.reader.contract` states. What the
graph outputs and how it is calibrated is read from the model card beside it
(`digits.json`: "outputs" is "probabilities" or "logits", "temperature" the
calibration fitted on held-out data); without a card, the outputs are taken as
probabilities, uncalibrated. Either way `predict` returns probabilities.
A 10-class model's card may name an 11-class companion (`"reject_model":
"reject.tflite"`, beside the card), or a card of its own may name both
(`--model models/digits-reject.json`: `"digit_model"` and `"reject_model"`):
the companion's "not a digit" probability r is put next to the digit model's
own decisions, `[p_digits * (1 - r), r]` (`RejectHeadClassifier`). A pair's
card may also name a pair model (`"pair_model": "pairs.tflite"`, see
contract.py): two touching or overlapping digits read as one picture; the
classifier carries it as `pairs` (None without one).
Logits leave the graph rather than probabilities because an int8 softmax can
only say 255/256 at the top, too coarse to multiply over a 12-digit number.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from digitwatch.errors import ModelError
from digitwatch.reader.confidence import AnswerCalibration
from digitwatch.reader.contract import (
    CLASS_COUNTS,
    DIGITS,
    PAIR_CLASSES,
    PAIR_WIDTH,
    REJECT,
    SIDE,
    to_model_input,
    to_pair_input,
)


# The shipped default: the 10-class digit ensemble with the "not a digit" head,
# calibrated as a pair (models/digits-reject.json).
def _models_dir() -> Path:
    """models/ beside the package in a checkout (and an editable install);
    <prefix>/share/digitwatch/models in an installed one (pyproject data-files)."""
    checkout = Path(__file__).resolve().parents[2] / "models"
    installed = Path(sys.prefix) / "share" / "digitwatch" / "models"
    return checkout if checkout.is_dir() or not installed.is_dir() else installed


MODELS_DIR = _models_dir()
DEFAULT_MODEL = MODELS_DIR / "digits-reject.json"


class Classifier(Protocol):
    """Maps a batch of model inputs (`contract.to_model_input`) to probabilities
    (N, classes): classes is one of `contract.CLASS_COUNTS`."""

    model_id: str
    classes: int
    spec: OutputSpec  # outputs, temperature and recommended threshold from the card

    @property
    def pairs(self) -> Classifier | None:
        """The pair model (contract.py), if the card names one."""

    def predict(self, digits: np.ndarray) -> np.ndarray: ...


def model_id_for(path: Path) -> str:
    """A short, stable identifier: file name plus the start of its sha256."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return f"{path.name}@{digest[:12]}"


@dataclass(frozen=True)
class OutputSpec:
    """How a graph's raw outputs become calibrated probabilities."""

    logits: bool = False
    temperature: float = 1.0
    # The whole-answer confidence below which answers are not ok, chosen with
    # this calibration (tests/bench/fit_answers.py); None when the card has none.
    low_confidence: float | None = None
    # The same for one-digit answers, when the card chose one of its own
    # ("recommended_low_confidence_single"); None: low_confidence for all.
    low_confidence_single: float | None = None
    # The map from a reading's evidence to p(whole answer right), fitted with
    # the same calibration; None: the raw product of the digits' probabilities.
    answers: AnswerCalibration | None = None

    @classmethod
    def for_model(cls, path: Path) -> OutputSpec:
        """Read "outputs" and "temperature" from the card beside the model, if any."""
        card_path = path.with_suffix(".json")
        if not card_path.is_file():
            return cls()
        try:
            card = json.loads(card_path.read_text())
            outputs = card.get("outputs", "probabilities")
            temperature = float(card.get("temperature", 1.0))
            low, single = (_threshold_entry(card, key) for key in
                           ("recommended_low_confidence", "recommended_low_confidence_single"))
            answers = card.get("answer_calibration")
            answers = None if answers is None else AnswerCalibration.from_card(answers)
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            raise ModelError(f"{card_path}: unreadable model card ({exc})") from exc
        if outputs not in ("probabilities", "logits"):
            raise ModelError(f"{card_path}: outputs must be 'probabilities' or 'logits', not {outputs!r}")
        if not (math.isfinite(temperature) and 0.05 <= temperature <= 20):
            raise ModelError(f"{card_path}: temperature {temperature} outside 0.05-20")
        for key, value in (("recommended_low_confidence", low), ("recommended_low_confidence_single", single)):
            if value is not None and not 0.0 <= value <= 1.0:  # NaN is outside too
                raise ModelError(f"{card_path}: {key} {value} outside 0-1")
        if single is not None and low is None:
            raise ModelError(f"{card_path}: recommended_low_confidence_single without recommended_low_confidence")
        return cls(logits=outputs == "logits", temperature=temperature, low_confidence=low,
                   low_confidence_single=single, answers=answers)

    def apply(self, raw: np.ndarray) -> np.ndarray:
        if not self.logits and self.temperature == 1.0:
            return raw
        return to_probabilities(raw, logits=self.logits, temperature=self.temperature)


def _threshold_entry(card: dict, key: str) -> float | None:
    """A card's threshold: a number or absent (JSON `true` is not 1.0)."""
    value = card.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{key} must be a number, not {value!r}")
    return float(value)


def to_probabilities(raw: np.ndarray, *, logits: bool, temperature: float = 1.0) -> np.ndarray:
    """Softmax of logits / T; for probability outputs, the same on their logs."""
    z = np.asarray(raw, np.float64)
    if not logits:
        z = np.log(np.clip(z, 1e-7, 1.0))
    z = z / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def _check_classes(path: Path, count: int) -> int:
    if count not in CLASS_COUNTS:
        raise ModelError(f"{path}: expected one (N, {DIGITS}) or (N, {DIGITS + 1}) output, got {count} classes")
    return count


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """LiteRT's C++ runtime prints an INFO banner straight to fd 2 when it
    builds its CPU delegate; that would break the one-line-per-error promise.
    Failures still surface as Python exceptions."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class LiteRTClassifier:
    """Runs a .tflite model through LiteRT; safe to share between threads."""

    def __init__(self, path: Path, *, threads: int = 2, spec: OutputSpec | None = None,
                 pair_model: bool = False) -> None:
        """`pair_model`: the file is a pair model (contract.py), not a digit model."""
        from ai_edge_litert.interpreter import Interpreter

        try:
            with _quiet_stderr():
                self._interpreter = Interpreter(model_path=str(path), num_threads=threads)
                self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"{path}: cannot load LiteRT model ({exc})") from exc
        inputs = self._interpreter.get_input_details()
        outputs = self._interpreter.get_output_details()
        width = PAIR_WIDTH if pair_model else SIDE
        if len(inputs) != 1 or tuple(inputs[0]["shape"][1:]) != (SIDE, width, 1):
            raise ModelError(f"{path}: expected one (N, {SIDE}, {width}, 1) input, got {inputs}")
        if len(outputs) != 1:
            raise ModelError(f"{path}: expected one (N, {DIGITS}) or (N, {DIGITS + 1}) output, got {len(outputs)}")
        if pair_model and int(outputs[0]["shape"][-1]) != PAIR_CLASSES:
            raise ModelError(f"{path}: a pair model has {PAIR_CLASSES} outputs, not {outputs[0]['shape'][-1]}")
        self.classes = PAIR_CLASSES if pair_model else _check_classes(path, int(outputs[0]["shape"][-1]))
        self._prepare = to_pair_input if pair_model else to_model_input
        self.pairs: LiteRTClassifier | None = None
        self.spec = spec if spec is not None else OutputSpec.for_model(path)
        self._input = inputs[0]["index"]
        self._output = outputs[0]["index"]
        self._batch = int(inputs[0]["shape"][0])
        # One interpreter is not re-entrant; the daemon calls from one thread,
        # but classify and tests may not.
        self._lock = threading.Lock()
        self.model_id = model_id_for(path)

    def predict(self, digits: np.ndarray) -> np.ndarray:
        x = self._prepare(digits)
        with self._lock:
            if x.shape[0] != self._batch:
                # Resizing re-plans memory, so keep the last size: the daemon's
                # batches are usually the same size.
                self._interpreter.resize_tensor_input(self._input, x.shape, strict=False)
                self._interpreter.allocate_tensors()
                self._batch = x.shape[0]
            self._interpreter.set_tensor(self._input, x)
            self._interpreter.invoke()
            raw = np.array(self._interpreter.get_tensor(self._output))
        return self.spec.apply(raw)


class KerasClassifier:
    """Runs a .keras model (safe mode) through Keras; imports TensorFlow."""

    def __init__(self, path: Path) -> None:
        self._model = load_keras_model(path)
        self.classes = _check_classes(path, int(self._model.output_shape[-1]))
        self.spec = OutputSpec.for_model(path)
        self.model_id = model_id_for(path)
        self.pairs = None

    def predict(self, digits: np.ndarray) -> np.ndarray:
        x = to_model_input(digits)
        return self.spec.apply(np.asarray(self._model(x, training=False)))


def load_keras_model(path: Path):
    """Load a .keras file in safe mode (no arbitrary code from the file); imports Keras."""
    if path.suffix != ".keras":
        raise ModelError(f"{path}: only .keras (and .tflite) models are accepted, not {path.suffix}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    try:
        return keras.saving.load_model(path, safe_mode=True, compile=False)
    except Exception as exc:  # Keras raises many types for bad files
        raise ModelError(f"{path}: cannot load Keras model ({exc})") from exc


class RejectHeadClassifier:
    """A 10-class digit model with an 11-class companion's "not a digit" head:
    (N, 11) = [p_digits * (1 - r), r]. The digit model keeps its own digit
    decisions (argmax over 0-9 is unchanged); the companion only says how
    likely the crop is not a digit at all. Calibrated by each model's card."""

    classes = DIGITS + 1

    def __init__(self, digits: Classifier, reject: Classifier, spec: OutputSpec | None = None,
                 pairs: LiteRTClassifier | None = None) -> None:
        if digits.classes != DIGITS or reject.classes != DIGITS + 1:
            raise ModelError(
                f"a reject head pairs a 10-class digit model with an 11-class companion, "
                f"not {digits.classes} and {reject.classes} classes"
            )
        self.digits, self.reject = digits, reject
        # The pair's threshold: from its own card, else from the digit model's.
        self.spec = spec if spec is not None else digits.spec
        self.pairs = pairs
        self.model_id = f"{digits.model_id}+{reject.model_id}" + (f"+{pairs.model_id}" if pairs else "")

    def predict(self, digits: np.ndarray) -> np.ndarray:
        return combine(self.digits.predict(digits), self.reject.predict(digits))


def combine(p_digits: np.ndarray, p_reject: np.ndarray) -> np.ndarray:
    """[p_digits * (1 - r), r] with r the companion's "not a digit" probability."""
    p = np.asarray(p_digits, np.float32)[:, :DIGITS]
    r = np.clip(np.asarray(p_reject, np.float32)[:, REJECT : REJECT + 1], 0.0, 1.0)
    return np.concatenate([p * (1.0 - r), r], axis=1)


def write_whole(path: Path, data: str | bytes) -> None:
    """Write a model file or card whole or not at all: a temporary file beside
    it, fsynced, renamed over it. A file cut short by a power loss or a full
    disk would stop every daemon that loads it (an unreadable model or card is
    refused at start); the old one stays instead."""
    replace_whole(path, lambda tmp: tmp.write_text(data) if isinstance(data, str) else tmp.write_bytes(data))


def replace_whole(path: Path, write: Callable[[Path], object]) -> None:
    """`write` a temporary file beside `path` (same suffix: Keras insists on
    .keras), fsync it, rename it over `path`; whatever happens, no temporary
    file is left. One left by a killed writer, or planted there (a link to a
    file elsewhere, which writing would follow), is removed first."""
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        tmp.unlink(missing_ok=True)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _card_entry(card_path: Path, key: str) -> Path | None:
    """The .tflite file a card names under `key`, in the card's own folder;
    None without card or entry."""
    if not card_path.is_file():
        return None
    try:
        name = json.loads(card_path.read_text()).get(key)
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelError(f"{card_path}: unreadable model card ({exc})") from exc
    if name is None:
        return None
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise ModelError(f"{card_path}: {key} must be a file name beside the card, not {name!r}")
    named = card_path.parent / name
    if named.suffix != ".tflite" or not named.is_file():
        raise ModelError(f"{card_path}: {key} {name!r} is not a .tflite file beside the card")
    return named


def _load_pair_card(card_path: Path, threads: int) -> RejectHeadClassifier:
    """A card of its own for a pair: "digit_model" and "reject_model" (each
    calibrated by its own card) and the pair's "recommended_low_confidence"."""
    digits, reject = _card_entry(card_path, "digit_model"), _card_entry(card_path, "reject_model")
    if digits is None or reject is None:
        raise ModelError(f"{card_path}: a model card given as --model names digit_model and reject_model")
    spec = OutputSpec.for_model(card_path)
    pairs = _card_entry(card_path, "pair_model")
    return RejectHeadClassifier(LiteRTClassifier(digits, threads=threads), LiteRTClassifier(reject, threads=threads),
                                OutputSpec(low_confidence=spec.low_confidence,
                                           low_confidence_single=spec.low_confidence_single, answers=spec.answers),
                                pairs=LiteRTClassifier(pairs, pair_model=True, threads=threads)
                                if pairs is not None else None)


def load_classifier(path: Path | None = None, *, threads: int = 2) -> Classifier:
    """Pick the implementation by file type; .tflite never touches TensorFlow.
    A .tflite whose card names a reject companion, or a pair's .json card,
    loads as the pair."""
    path = Path(path) if path is not None else DEFAULT_MODEL
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    if path.suffix == ".tflite":
        companion = _card_entry(path.with_suffix(".json"), "reject_model")
        if companion is None:
            return LiteRTClassifier(path, threads=threads)
        return RejectHeadClassifier(LiteRTClassifier(path, threads=threads),
                                    LiteRTClassifier(companion, threads=threads))
    if path.suffix == ".keras":
        return KerasClassifier(path)
    if path.suffix == ".json":
        return _load_pair_card(path, threads)
    raise ModelError(f"{path}: unsupported model type {path.suffix!r} (use .tflite, .keras or a pair's .json card)")
