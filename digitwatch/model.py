"""Classifiers: one protocol, a LiteRT implementation for the product and a Keras
one for `.keras` files. Only the Keras path imports TensorFlow, and lazily.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from digitwatch.errors import ModelError

SIDE = 28
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "digits.tflite"


class Classifier(Protocol):
    """Maps a batch of normalized digits (N, 28, 28) float32 to probabilities (N, 10)."""

    model_id: str

    def predict(self, digits: np.ndarray) -> np.ndarray: ...


def model_id_for(path: Path) -> str:
    """A short, stable identifier: file name plus the start of its sha256."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return f"{path.name}@{digest[:12]}"


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

    def __init__(self, path: Path, *, threads: int = 2) -> None:
        from ai_edge_litert.interpreter import Interpreter

        try:
            with _quiet_stderr():
                self._interpreter = Interpreter(model_path=str(path), num_threads=threads)
                self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"{path}: cannot load LiteRT model ({exc})") from exc
        inputs = self._interpreter.get_input_details()
        outputs = self._interpreter.get_output_details()
        if len(inputs) != 1 or tuple(inputs[0]["shape"][1:]) != (SIDE, SIDE, 1):
            raise ModelError(f"{path}: expected one (N, 28, 28, 1) input, got {inputs}")
        if len(outputs) != 1 or int(outputs[0]["shape"][-1]) != 10:
            raise ModelError(f"{path}: expected one (N, 10) output")
        self._input = inputs[0]["index"]
        self._output = outputs[0]["index"]
        self._batch = int(inputs[0]["shape"][0])
        # One interpreter is not re-entrant; the daemon calls from one thread,
        # but classify and tests may not.
        self._lock = threading.Lock()
        self.model_id = model_id_for(path)

    def predict(self, digits: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(digits, dtype=np.float32).reshape(-1, SIDE, SIDE, 1)
        with self._lock:
            if x.shape[0] != self._batch:
                # Resizing re-plans memory, so keep the last size: the daemon's
                # batches are usually the same size.
                self._interpreter.resize_tensor_input(self._input, x.shape, strict=False)
                self._interpreter.allocate_tensors()
                self._batch = x.shape[0]
            self._interpreter.set_tensor(self._input, x)
            self._interpreter.invoke()
            return np.array(self._interpreter.get_tensor(self._output))


class KerasClassifier:
    """Runs a .keras model (safe mode) through Keras; imports TensorFlow."""

    def __init__(self, path: Path) -> None:
        from digitwatch.training import load_keras_model

        self._model = load_keras_model(path)
        self.model_id = model_id_for(path)

    def predict(self, digits: np.ndarray) -> np.ndarray:
        x = np.asarray(digits, dtype=np.float32).reshape(-1, SIDE, SIDE, 1)
        return np.asarray(self._model(x, training=False))


def load_classifier(path: Path | None = None) -> Classifier:
    """Pick the implementation by file type; .tflite never touches TensorFlow."""
    path = Path(path) if path is not None else DEFAULT_MODEL
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    if path.suffix == ".tflite":
        return LiteRTClassifier(path)
    if path.suffix == ".keras":
        return KerasClassifier(path)
    raise ModelError(f"{path}: unsupported model type {path.suffix!r} (use .tflite or .keras)")
